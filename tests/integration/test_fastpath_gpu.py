"""`kubetune_varlen` on a CUDA GPU in bf16: torch's varlen kernel must agree with the
per-document SDPA reference, and a packed row of a model with Llama-3.1-8B attention
dimensions must give what each document gives alone, up to bf16 noise, through the fast
kernel (not the reference loop). Prints the measured differences."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B attention


def _lengths(total: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(int(min(2048, max(32, rng.lognormvariate(math.log(350), 0.8)))))
    return out


def _offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def test_varlen_kernel_matches_the_per_document_reference() -> None:
    from kubetune.trainer.fastpath import attention
    from kubetune.trainer.fastpath.documents import Documents

    assert attention.varlen_kernel_available(), "torch's varlen_attn should run on this GPU"
    lengths = _lengths(4096)
    total = sum(lengths)
    offsets = _offsets(lengths)
    documents = Documents(
        torch.tensor(offsets, dtype=torch.int32, device="cuda"), max(lengths), tuple(offsets)
    )
    generator = torch.Generator(device="cuda").manual_seed(0)

    def leaf(heads: int) -> torch.Tensor:
        x = torch.randn(1, heads, total, HEAD_DIM, device="cuda", generator=generator)
        return x.to(torch.bfloat16).requires_grad_(True)

    q, k, v = leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)
    grad = torch.randn(1, total, HEADS, HEAD_DIM, device="cuda", generator=generator)
    scale = HEAD_DIM**-0.5

    fast = attention.varlen_attention(q, k, v, documents, scale, (-1, 0))
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad.to(fast.dtype))
    # Reference in fp32 from the same bf16 inputs.
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = attention.per_document_attention(q32, k32, v32, documents, scale, (-1, 0))
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad)

    # Largest difference relative to the largest reference value, for the output and the
    # gradients of q, k and v.
    pairs = [(fast, ref), *zip(fast_grads, ref_grads, strict=True)]
    errors = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in pairs]
    print(
        f"\nvarlen (bf16) vs per-document SDPA (fp32): {len(lengths)} docs, {total} tokens; "
        "max|diff| / max|ref| of out, dq, dk, dv: " + ", ".join(f"{e:.2e}" for e in errors)
    )
    assert max(errors) < 2e-2


def _model(impl: str) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kubetune.trainer.fastpath.attention import register_attention

    register_attention()
    config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=4096,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=32000,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation=impl
        ).eval()


def test_packed_row_matches_documents_alone_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.trainer.fastpath import attention

    def no_reference(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the per-document loop ran instead of the varlen kernel")

    lengths = _lengths(16000)
    offsets = _offsets(lengths)
    ids = torch.randint(0, 32000, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    diffs = {}
    for impl in ("kubetune_varlen", "sdpa"):
        model = _model(impl)
        with torch.no_grad():
            alone = torch.cat(
                [
                    model.model(
                        input_ids=ids[:, a:b], position_ids=positions[:, a:b]
                    ).last_hidden_state
                    for a, b in itertools.pairwise(offsets)
                ],
                dim=1,
            ).float()
            if impl == "kubetune_varlen":
                with monkeypatch.context() as patch:
                    patch.setattr(attention, "per_document_attention", no_reference)
                    packed = model.model(input_ids=ids, position_ids=positions).last_hidden_state
                diffs[impl] = (packed.float() - alone).abs().max().item()
            else:  # the baseline's noise (dense mask) and its leak (no mask, with a cache)
                dense = model.model(input_ids=ids, position_ids=positions, use_cache=False)
                leak = model.model(input_ids=ids, position_ids=positions, use_cache=True)
                diffs["sdpa dense mask"] = (
                    (dense.last_hidden_state.float() - alone).abs().max().item()
                )
                diffs["sdpa no mask"] = (leak.last_hidden_state.float() - alone).abs().max().item()
        del model
        torch.cuda.empty_cache()
    print(
        f"\npacked row of {len(lengths)} docs ({sum(lengths)} tokens), max|packed - alone| of "
        f"the last hidden state: " + ", ".join(f"{k} {v:.4g}" for k, v in diffs.items())
    )
    assert diffs["kubetune_varlen"] < max(0.1, 2 * diffs["sdpa dense mask"])
    assert diffs["sdpa no mask"] > 10 * diffs["kubetune_varlen"]


def test_trl_padding_free_loss_matches_sdpa_in_bf16() -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rng = random.Random(1)
    examples = [
        {"input_ids": [rng.randrange(3, 32000) for _ in range(n)]} for n in _lengths(4000, 1)
    ]
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collator(examples).items()
    }
    losses = {}
    for impl in ("sdpa", "kubetune_varlen"):
        model = _model(impl).train()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses[impl] = loss.item()
        del model
        torch.cuda.empty_cache()
    print(f"\nTRL padding-free batch loss: {losses}")
    assert abs(losses["sdpa"] - losses["kubetune_varlen"]) < 1e-2


def test_fused_kernels_and_lean_adapters_keep_the_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Liger's kernels (as the trainer applies them) and LoRA layers without PEFT's fp32
    input cast give the plain path's loss and adapter gradients, up to bf16 noise."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama import modeling_llama
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from kubetune.trainer.fastpath import kernels

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches these
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rng = random.Random(2)
    examples = [
        {"input_ids": [rng.randrange(3, 32000) for _ in range(n)]} for n in _lengths(4000, 2)
    ]
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collator(examples).items()
    }
    losses, grads = {}, {}
    for variant in ("plain", "fused + lean"):
        model = _model("kubetune_varlen").train()
        if variant != "plain":
            kernels.apply_fused_kernels(model)
            assert "Liger" in type(model.model.layers[0].mlp).__name__ or "liger" in (
                model.model.layers[0].mlp.forward.__module__
            )
        config = LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        torch.manual_seed(1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        if variant != "plain":
            assert kernels.apply_lean_adapters(peft_model) > 0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(**batch, use_cache=False).loss
        loss.backward()
        losses[variant] = loss.item()
        grads[variant] = {
            n: p.grad.float().clone()
            for n, p in peft_model.named_parameters()
            if p.requires_grad and p.grad is not None
        }
        del model, peft_model
        torch.cuda.empty_cache()
    plain, fast = grads["plain"], grads["fused + lean"]
    assert plain.keys() == fast.keys()
    assert len(plain) > 0
    worst = max(((plain[n] - fast[n]).norm() / plain[n].norm()).item() for n in plain)
    print(f"\nloss plain/fused+lean: {losses}; worst relative gradient difference {worst:.4f}")
    assert abs(losses["plain"] - losses["fused + lean"]) < 1e-2
    assert worst < 0.05
