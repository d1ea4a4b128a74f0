"""BERTScore with the shipped all-MiniLM-L6-v2 and with other local model folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.evaluation import BERTScoreSpec
from kubetune.trainer.evaluate import EvaluationError
from kubetune.trainer.scoring.bertscore import (
    EmbeddingModel,
    bert_score,
    builtin_model_path,
    pair_scores,
    resolve_embedding_model,
)

REFERENCE = "The meeting was moved to Friday afternoon."


@pytest.fixture(scope="module")
def minilm() -> EmbeddingModel:
    return resolve_embedding_model(None)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer BERT with the MiniLM tokenizer, as a plain local folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("builtin://all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_default_is_the_shipped_model_at_its_last_layer(minilm: EmbeddingModel) -> None:
    assert minilm.uri == "builtin://all-minilm-l6-v2"
    assert (minilm.path / "model.safetensors").is_file()
    assert (minilm.layer, minilm.total_layers) == (6, 6)


def test_identical_text_scores_one(minilm: EmbeddingModel) -> None:
    out = bert_score([REFERENCE, "2031-04-07"], [REFERENCE, "2031-04-07"], None, log=print)
    assert set(out) == {"BERTScoreP", "BERTScoreR", "BERTScoreF1"}
    for value in out.values():
        assert value == pytest.approx(1.0, abs=1e-5)


def test_paraphrase_beats_unrelated(minilm: EmbeddingModel) -> None:
    candidates = ["The meeting has been rescheduled for Friday afternoon.", "Bananas are yellow."]
    paraphrase, unrelated = pair_scores(candidates, [REFERENCE] * 2, minilm)
    assert paraphrase[2] > unrelated[2] + 0.3


def test_closer_answers_score_higher(minilm: EmbeddingModel) -> None:
    # One wrong digit keeps every other token; a sentence shares only the year's pieces;
    # an unrelated answer shares nothing.
    candidates = ["2031-04-07", "2031-04-08", "The date is April 7, 2031.", "I like turtles."]
    f1 = [s[2] for s in pair_scores(candidates, ["2031-04-07"] * 4, minilm)]
    assert f1 == sorted(f1, reverse=True)
    assert f1[0] == pytest.approx(1.0, abs=1e-5)
    assert f1[3] < 0.3


def test_precision_and_recall_follow_what_is_covered(minilm: EmbeddingModel) -> None:
    # Precision matches each candidate token, recall each reference token: a fragment of the
    # reference is precise but incomplete, the reference plus extra text is the opposite.
    fragment, padded = pair_scores(
        ["Friday afternoon", REFERENCE + " Please bring the quarterly sales figures."],
        [REFERENCE] * 2,
        minilm,
    )
    assert fragment[0] > fragment[1]
    assert padded[1] > padded[0]


def test_empty_answers_and_empty_input(minilm: EmbeddingModel) -> None:
    scores = pair_scores(["", "  ", "2031-04-07"], ["2031-04-07", "", ""], minilm)
    assert scores == [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]
    logged: list[str] = []
    assert bert_score([], [], None, log=logged.append) == {}
    assert logged == []


def test_mismatched_lengths_are_a_bug(minilm: EmbeddingModel) -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        pair_scores(["a", "b"], ["a"], minilm)


def test_unknown_builtin_is_refused_with_the_field() -> None:
    with pytest.raises(EvaluationError, match=r"evaluation\.bertScore\.modelUri") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri="builtin://bert-large"))
    assert err.value.reason == Reason.INVALID_SPEC
    assert "builtin://all-minilm-l6-v2" in str(err.value)


def test_missing_folder_is_refused_with_the_field(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"evaluation\.bertScore\.modelUri") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri=str(tmp_path / "nowhere")))
    assert err.value.reason == Reason.SOURCE_NOT_FOUND
    assert "spec.model" not in str(err.value)


def test_hub_model_offline_names_the_field(tmp_path: Path) -> None:
    spec = BERTScoreSpec(model_uri="hf://sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(EvaluationError, match=r"^evaluation\.bertScore\.modelUri hf://") as err:
        resolve_embedding_model(spec, cache_dir=tmp_path)
    assert err.value.reason == Reason.DOWNLOAD_FAILED


def test_a_uri_of_another_kind_is_refused() -> None:
    with pytest.raises(EvaluationError, match="is not a model URI") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri="https://example.com/model"))
    assert err.value.reason == Reason.INVALID_SPEC


def test_local_folder_defaults_to_its_last_layer(tiny_bert_dir: Path) -> None:
    model = resolve_embedding_model(BERTScoreSpec(model_uri=str(tiny_bert_dir)))
    assert (model.path, model.layer, model.total_layers) == (tiny_bert_dir, 3, 3)
    out = bert_score(
        ["a cat on a mat", "2031-04-07"],
        ["a cat on a mat", "2031-04-07"],
        BERTScoreSpec(model_uri=f"file://{tiny_bert_dir}", num_layers=2),
        log=print,
    )
    assert out["BERTScoreF1"] == pytest.approx(1.0, abs=1e-5)


def test_the_chosen_layer_is_the_one_compared(tiny_bert_dir: Path) -> None:
    pair = (["a cat on a mat"], ["the dog under the table"])
    by_layer = {
        layer: pair_scores(*pair, EmbeddingModel(str(tiny_bert_dir), tiny_bert_dir, layer, 3))
        for layer in (1, 3)
    }
    assert by_layer[1] != by_layer[3]


def test_a_tokenizer_without_start_and_end_tokens_is_refused(tiny_model_dir: Path) -> None:
    # A causal LM's tokenizer: bert-score would drop real tokens as if they were [CLS]/[SEP].
    with pytest.raises(EvaluationError, match="start and end tokens") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri=str(tiny_model_dir)))
    assert "evaluation.bertScore.modelUri" in str(err.value)


def test_too_many_layers_are_refused(tiny_bert_dir: Path) -> None:
    spec = BERTScoreSpec(model_uri=str(tiny_bert_dir), num_layers=4)
    with pytest.raises(EvaluationError, match=r"evaluation\.bertScore\.numLayers \(4\)"):
        resolve_embedding_model(spec)


def test_pickle_only_folder_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(EvaluationError, match="safetensors only") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri=str(folder)))
    assert err.value.reason == Reason.PICKLE_REFUSED
    assert "evaluation.bertScore.modelUri" in str(err.value)


def test_remote_code_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvaluationError, match="never runs") as err:
        resolve_embedding_model(BERTScoreSpec(model_uri=str(folder)))
    assert err.value.reason == Reason.MODEL_NEEDS_REMOTE_CODE
