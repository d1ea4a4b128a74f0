"""Faster training paths that keep the results of the plain Hugging Face stack.

`choose_attention` picks the attention implementation a model is loaded with from
`training.fastPaths.attention`; for packed rows on a GPU that is `kubetune_varlen`
(attention.py): per-document attention through torch's variable-length FlashAttention
kernel, without the dense mask transformers' SDPA path builds.
"""

from kubetune.trainer.fastpath.selection import (
    ATTENTION_NAME,
    AttentionChoice,
    attention_choice,
    choose_attention,
)

__all__ = ["ATTENTION_NAME", "AttentionChoice", "attention_choice", "choose_attention"]
