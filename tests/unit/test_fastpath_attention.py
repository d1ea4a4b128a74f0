"""Per-document attention for packed rows (`kubetune_varlen`) on the CPU: a packed row must
give what each document gives alone, padded batches and generation what SDPA gives, and
the attention choice must follow `training.fastPaths.attention`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.training import AttentionKernel, FastPaths
from kubetune.trainer import fastpath
from kubetune.trainer.fastpath import attention
from kubetune.trainer.fastpath.documents import Documents, offsets_from_position_ids
from kubetune.trainer.models import TrainingSetupError

LENGTHS = [5, 11, 3, 8]
VARLEN_NAME = fastpath.ATTENTION_NAME
VOCAB = 256


def _config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in Llama 3
        "max_position_embeddings": 128,
        "pad_token_id": 0,
    }
    return LlamaConfig(**{**fields, **overrides})


def _model(impl: str, seed: int = 0, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    attention.register_attention()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(**overrides), attn_implementation=impl)


def _packed_row(lengths: list[int] = LENGTHS) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return ids, positions, offsets


def _alone(model: Any, ids: torch.Tensor, positions: torch.Tensor, offsets: list[int]) -> Any:
    pieces = [
        model(input_ids=ids[:, a:b], position_ids=positions[:, a:b]).logits
        for a, b in itertools.pairwise(offsets)
    ]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize(
    ("positions", "batch", "expected"),
    [
        pytest.param([[0, 1, 2, 0, 1]], 1, [0, 3, 5], id="restarts"),
        pytest.param([[0, 1, 2, 3]], 1, [0, 4], id="one-document"),
        pytest.param([[0, 1, 2, 0, 0, 0]], 1, [0, 3, 4, 5, 6], id="trailing-padding"),
        pytest.param([[7, 8, 9, 0, 1]], 1, [0, 3, 5], id="not-starting-at-zero"),
        pytest.param([[0, 1, 2]], 2, [0, 3, 6], id="rows-broadcast"),
        pytest.param([[0, 1, 0], [0, 1, 2]], 2, [0, 2, 3, 6], id="packed-rows"),
    ],
)
def test_documents_start_at_rows_and_where_positions_restart(
    positions: list[list[int]], batch: int, expected: list[int]
) -> None:
    assert offsets_from_position_ids(torch.tensor(positions), batch).tolist() == expected


@pytest.mark.parametrize("use_cache", [True, False], ids=["with-cache", "no-cache"])
def test_packed_row_gives_each_document_what_it_gets_alone(use_cache: bool) -> None:
    model = _model(fastpath.ATTENTION_NAME).eval()
    ids, positions, offsets = _packed_row()
    with torch.no_grad():
        alone = _alone(model, ids, positions, offsets)
        packed = model(input_ids=ids, position_ids=positions, use_cache=use_cache).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_packed_row_under_inference_mode() -> None:
    model = _model(fastpath.ATTENTION_NAME).eval()
    ids, positions, offsets = _packed_row()
    with torch.inference_mode():
        alone = _alone(model, ids, positions, offsets)
        packed = model(input_ids=ids, position_ids=positions.clone()).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_sdpa_lets_documents_leak_without_its_dense_mask() -> None:
    """The control: SDPA builds no document mask when the model runs with a cache (the
    default of a forward call), so the packed row differs from the documents alone."""
    model = _model("sdpa").eval()
    ids, positions, offsets = _packed_row()
    with torch.no_grad():
        alone = _alone(model, ids, positions, offsets)
        packed = model(input_ids=ids, position_ids=positions).logits
    assert (packed - alone).abs().max().item() > 1e-2


def test_trl_padding_free_batch_gives_the_loss_of_sdpas_dense_mask() -> None:
    """TRL's padding-free collator passes cu_seq_lens/max_length; the loss equals the one of
    SDPA with transformers' per-document mask (the slow path this replaces)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    generator = torch.Generator().manual_seed(2)
    examples = [
        {"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in LENGTHS
    ]
    batch = collator(examples)
    assert "cu_seq_lens_q" in batch
    losses = {}
    for impl in ("sdpa", fastpath.ATTENTION_NAME):
        model = _model(impl).eval()
        with torch.no_grad():
            losses[impl] = model(**batch, use_cache=False).loss
    torch.testing.assert_close(losses[fastpath.ATTENTION_NAME], losses["sdpa"])


def test_gradients_of_a_packed_row_are_the_sum_over_its_documents() -> None:
    model = _model(fastpath.ATTENTION_NAME).train()
    ids, positions, offsets = _packed_row()

    def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")

    labels = ids.masked_fill(positions == 0, -100)  # no prediction across documents
    token_loss(model(input_ids=ids, position_ids=positions).logits, labels).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for a, b in itertools.pairwise(offsets):
        logits = model(input_ids=ids[:, a:b], position_ids=positions[:, a:b]).logits
        token_loss(logits, ids[:, a:b]).backward()
    assert len(packed) == len(list(model.parameters()))
    for name, grad in packed.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4)


def test_lora_model_keeps_documents_apart_and_trains() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(fastpath.ATTENTION_NAME),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so they change the output
            torch.nn.init.normal_(param, std=0.02)
    ids, positions, offsets = _packed_row()
    model.eval()
    with torch.no_grad():
        alone = _alone(model, ids, positions, offsets)
        packed = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    model.train()
    model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_padded_batches_and_generation_match_sdpa() -> None:
    ours, sdpa = _model(fastpath.ATTENTION_NAME).eval(), _model("sdpa").eval()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as for generation
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        expected = sdpa(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()])
        options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        generated = ours.generate(input_ids=ids, attention_mask=mask, **options)
        assert torch.equal(generated, sdpa.generate(input_ids=ids, attention_mask=mask, **options))


def test_sliding_window_matches_a_dense_windowed_mask() -> None:
    window = attention.attention_window(causal=True, sliding_window=3)
    assert window == (2, 0)
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 12, 8, generator=generator)
    k = torch.randn(1, 2, 12, 8, generator=generator)
    v = torch.randn(1, 2, 12, 8, generator=generator)
    documents = Documents(torch.tensor([0, 7, 12], dtype=torch.int32), 7)
    out = attention.per_document_attention(q, k, v, documents, 8**-0.5, window)
    i = torch.arange(12)
    same_doc = (i[:, None] < 7) == (i[None, :] < 7)
    mask = same_doc & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_boundaries_are_derived_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(fastpath.ATTENTION_NAME, num_hidden_layers=3).eval()
    calls = []
    derive = attention.documents_from_position_ids

    def counting(*args: Any) -> Documents:
        calls.append(args)
        return derive(*args)

    monkeypatch.setattr(attention, "documents_from_position_ids", counting)
    ids, positions, _ = _packed_row()
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
        model(input_ids=ids, position_ids=positions.clone())
    assert len(calls) == 2


def test_soft_capping_is_refused_with_the_field_to_change() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"training\.fastPaths\.attention to SDPA"):
        attention.document_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_model_folder_loads_with_the_chosen_implementation(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    name = fastpath.choose_attention(
        FastPaths(attention=AttentionKernel.VARLEN), cuda=False, packed=True
    ).name
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name)
    assert model.config._attn_implementation == fastpath.ATTENTION_NAME


@pytest.mark.parametrize(
    ("kernel", "cuda", "packed", "varlen_runs", "expected"),
    [
        pytest.param(AttentionKernel.AUTO, True, True, True, VARLEN_NAME, id="auto-gpu"),
        pytest.param(AttentionKernel.AUTO, True, True, False, "sdpa", id="auto-no-kernel"),
        pytest.param(AttentionKernel.AUTO, True, False, True, "sdpa", id="auto-padded"),
        pytest.param(AttentionKernel.AUTO, False, True, False, "sdpa", id="auto-cpu"),
        pytest.param(AttentionKernel.SDPA, True, True, True, "sdpa", id="sdpa"),
        pytest.param(AttentionKernel.EAGER, False, True, False, "eager", id="eager"),
        pytest.param(AttentionKernel.VARLEN, False, True, False, VARLEN_NAME, id="varlen-cpu"),
        pytest.param(AttentionKernel.VARLEN, True, False, True, VARLEN_NAME, id="varlen-gpu"),
    ],
)
def test_attention_choice(
    monkeypatch: pytest.MonkeyPatch,
    kernel: AttentionKernel,
    cuda: bool,
    packed: bool,
    varlen_runs: bool,
    expected: str,
) -> None:
    monkeypatch.setattr(attention, "varlen_kernel_available", lambda: varlen_runs)
    choice = fastpath.attention_choice(FastPaths(attention=kernel), cuda, packed)
    assert choice.name == expected
    assert choice.reason


@pytest.mark.parametrize(
    ("kernel", "cuda", "message"),
    [
        pytest.param(AttentionKernel.FLEX, True, "Flex is not available", id="flex"),
        pytest.param(AttentionKernel.VARLEN, True, "Varlen needs", id="varlen-unavailable"),
    ],
)
def test_choices_that_cannot_run_are_refused(
    monkeypatch: pytest.MonkeyPatch, kernel: AttentionKernel, cuda: bool, message: str
) -> None:
    monkeypatch.setattr(attention, "varlen_kernel_available", lambda: False)
    with pytest.raises(TrainingSetupError, match=message) as raised:
        fastpath.choose_attention(FastPaths(attention=kernel), cuda=cuda, packed=True)
    assert raised.value.reason == Reason.INVALID_SPEC
    assert "training.fastPaths.attention" in str(raised.value)


@pytest.mark.parametrize("as_dict", [False, True], ids=["config", "config-json"])
def test_soft_capping_architectures_keep_sdpa_or_are_refused(
    monkeypatch: pytest.MonkeyPatch, as_dict: bool
) -> None:
    from transformers import Gemma2Config

    monkeypatch.setattr(attention, "varlen_kernel_available", lambda: True)
    config: Any = Gemma2Config().to_dict() if as_dict else Gemma2Config()
    auto = fastpath.attention_choice(None, cuda=True, packed=True, model_config=config)
    assert auto.name == "sdpa"
    assert "soft-caps" in auto.reason
    with pytest.raises(TrainingSetupError, match="Varlen: gemma2 soft-caps"):
        fastpath.choose_attention(
            FastPaths(attention=AttentionKernel.VARLEN), True, True, model_config=config
        )


def test_padded_stages_run_on_sdpa_and_packed_ones_keep_varlen(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.api.v1alpha1.alignment import StageSpec, StageType
    from kubetune.trainer.stages import _stage_attention

    name = fastpath.choose_attention(
        FastPaths(attention=AttentionKernel.VARLEN), cuda=False, packed=True
    ).name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with _stage_attention(model, StageSpec(type=StageType.SFT), True):
        assert model.config._attn_implementation == fastpath.ATTENTION_NAME
    with _stage_attention(model, StageSpec(type=StageType.DPO), True):  # packed pairs
        assert model.config._attn_implementation == fastpath.ATTENTION_NAME
    for stage, packed in ((StageType.DPO, False), (StageType.KTO, True)):
        with _stage_attention(model, StageSpec(type=stage), packed):
            assert model.config._attn_implementation == "sdpa"
            assert base.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == fastpath.ATTENTION_NAME
