"""Bytes of activations that one decoder layer keeps for the backward pass, per token.

The counts follow what PyTorch autograd saves in Hugging Face's Llama-style decoder under
bf16 autocast (Korthikanti et al. 2022 count the same way for GPT; their 34·s·b·h bytes per
layer becomes the sums below for gated MLPs, grouped-query attention and fp32 RMSNorm), with
a fused attention kernel (SDPA / FlashAttention / varlen: no s² term; k and v are counted at
query width because SDPA with a mask expands grouped heads). With h the hidden size, q the
query width (heads x head_dim), I the MLP width:

- frozen base (LoRA, QLoRA, prefix, prompt): every RMSNorm keeps an fp32 copy of its input
  (4h each); attention keeps q, k, v and its output (8q); the MLP keeps gate, act(gate) and up
  (6I). A frozen linear keeps nothing (autograd saves its input only for a weight gradient).
- LoRA adds, per adapted module of input width d: the dropout mask (1 byte) and the bf16
  input of lora_A (2 bytes): 3d (2d without dropout).
- full fine-tuning also keeps each linear's input and the norms' normalized inputs:
  norms 8h each (10h with fp32 master weights, whose residual stream is fp32), attention 10q,
  MLP 8I, plus 2h.
- working set of the layer being differentiated: the MLP's input gradients (4I) and, for
  LoRA on a bf16 base, PEFT's fp32 cast of the widest adapted input plus its dropout output
  (8d; 4d without dropout). QLoRA under autocast skips that cast.

The trainer's GPU fast paths keep less. Liger's fused kernels (`fused_kernels`) save an RMSNorm's
bf16 input instead of an fp32 copy (2h less per norm) and SwiGLU's gate and up without the
activation (2I less); measured 45.7 KB per token per layer on Llama-3.1-8B LoRA (formula:
44.0 KB) and 24.5 KB on 1B full fine-tuning (formula: 24.6 KB). Lean adapters (no fp32 input
cast) shrink the working set to the bf16 dropout output (2d; nothing without dropout).

Measured on an H200 (torch 2.11, transformers 5.17, peft 0.21, see docs/calc.md): Llama-3.2-1B
LoRA all-linear keeps 143.3 KB per token per layer (formula: 143.4 KB), Llama-3.1-8B 261.5 KB
(formula: 268.3 KB), 1B full fine-tuning with fp32 master weights 131.7 KB (formula: 131.1 KB).
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.calc.architectures import Architecture
from kubetune.calc.lora import resolve_target_modules


@dataclass(frozen=True)
class LayerActivations:
    """Per-token bytes of one decoder layer.

    Attributes:
        saved: what the layer keeps for its backward pass (all layers keep this without
            gradient checkpointing; only the layer being recomputed with it).
        working: extra bytes while the layer is differentiated (gradients of its widest
            tensors, PEFT's fp32 input casts).
        layer_input: the layer's input, which gradient checkpointing keeps for every layer.
        attention_scores_per_token: bytes per token per unit of sequence length kept by an
            eager (non-fused) attention: heads x 4; 0 for fused kernels.
    """

    saved: int
    working: int
    layer_input: int
    attention_scores_per_token: int = 0


def layer_activations(
    arch: Architecture,
    *,
    full: bool,
    fp32_master: bool,
    lora_modules: tuple[str, ...] = (),
    lora_dropout: bool = True,
    quantized_base: bool = False,
    eager_attention: bool = False,
    fused_kernels: bool = False,
    lean_adapters: bool = False,
) -> LayerActivations:
    """Activation bytes per token of one decoder layer (bf16/fp16 autocast).

    Args:
        arch: the model.
        full: every weight is trained (full fine-tuning).
        fp32_master: full fine-tuning keeps fp32 weights under bf16 autocast.
        lora_modules: module names LoRA adapts (`all-linear` allowed).
        lora_dropout: LoRA dropout above zero.
        quantized_base: QLoRA (bitsandbytes layers do not cast inputs to fp32).
        eager_attention: attention without a fused kernel (keeps the score matrices).
        fused_kernels: Liger's RMSNorm and SwiGLU kernels replace the model's.
        lean_adapters: LoRA layers skip PEFT's fp32 input cast.
    """
    h, q, inter = arch.hidden_size, arch.q_dim, arch.intermediate_size
    qk_norm = arch.q_dim + arch.kv_dim if arch.has_qk_norm else 0
    working = 4 * inter
    if full:
        norm_bytes = 10 * h if fp32_master else 8 * h
        saved = arch.norms_per_layer * norm_bytes + 6 * qk_norm + 10 * q + 8 * inter + 2 * h
        layer_input = 4 * h if fp32_master else 2 * h
    else:
        saved = arch.norms_per_layer * 4 * h + 4 * qk_norm + 8 * q + 6 * inter
        layer_input = 2 * h
        shapes = arch.linear_shapes()
        adapted = [m for m in resolve_target_modules(lora_modules) if m in shapes]
        per_input = 3 if lora_dropout else 2
        saved += sum(per_input * shapes[m][0] for m in adapted)
        if adapted and not quantized_base:
            widest = max(shapes[m][0] for m in adapted)
            if lean_adapters:
                working += 2 * widest if lora_dropout else 0
            else:
                working += (8 if lora_dropout else 4) * widest
    if fused_kernels:
        saved -= arch.norms_per_layer * 2 * h + 2 * inter
    scores = 4 * arch.num_heads if eager_attention else 0
    return LayerActivations(saved, working, layer_input, scores)
