"""A packed DPO batch (every chosen and rejected sequence in one row) gives TRL's loss, its
gradients and its logged metrics as the padded batch does: a tiny Llama with a LoRA policy,
fp32 on CPUs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.preference_packing import OWNER_KEY, pack, packed_collator, packed_forward

LOSS_TYPES = ["sigmoid", "ipo", "sigmoid_norm"]
"""sigmoid sums each sequence's log-probabilities; ipo and sigmoid_norm also count each
sequence's completion tokens through `completion_mask`."""


def rows() -> list[dict[str, str]]:
    """Lopsided pairs: short next to long answers, prompts of different lengths."""
    words = ("the", "a", "model", "answer", "data", "train", "test", "short", "long")

    def text(n: int, shift: int) -> str:
        return " ".join(words[(i * 7 + shift) % len(words)] for i in range(n))

    return [
        {"prompt": text(3 + i, i), "chosen": text(2 + 5 * i, i + 1), "rejected": text(9 - i, i + 2)}
        for i in range(4)
    ]


def trainer_for(
    tiny_model_dir: Path, tmp: Path, loss_type: str, attention: str = "sdpa", cuda: bool = False
) -> Any:
    """fp32 on CPUs; with `cuda`, bf16 on the GPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir),
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation=attention,
    )
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a policy that differs from the base model
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    args = DPOConfig(
        output_dir=str(tmp),
        per_device_train_batch_size=4,
        max_length=48,
        loss_type=[loss_type],
        use_cpu=not cuda,
        report_to=[],
        bf16=cuda,
    )
    if cuda:  # one process on one GPU (the Trainer would wrap several in nn.DataParallel)
        _ = args.device
        args._n_gpu = 1
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    trainer = DPOTrainer(
        model=policy,
        args=args,
        train_dataset=Dataset.from_list(rows()),
        processing_class=tokenizer,
    )
    # TRL keeps a frozen copy of a given adapter ("ref") as the reference: move the policy
    # away from it, so that the rewards and their margin are not zero.
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B.default" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    trainer.model.train()
    return trainer


def loss_and_gradients(trainer: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {
        name: p.grad.detach().clone()
        for name, p in trainer.model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return loss.item(), gradients


def test_pack_puts_the_sequences_end_to_end() -> None:
    import torch

    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4], [6, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
        "completion_mask": torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]),
        "ref_chosen_logps": torch.tensor([-1.0, -2.0]),
    }
    packed = pack(padded)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 6]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]
    assert packed[OWNER_KEY].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert packed["attention_mask"].tolist() == [[1] * 10]
    assert packed["completion_mask"].tolist() == [
        [0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert packed["ref_chosen_logps"].tolist() == [-1.0, -2.0]


@pytest.mark.parametrize(
    ("loss_type", "attention"),
    [*((loss, "sdpa") for loss in LOSS_TYPES), ("sigmoid", "kubetune_varlen")],
)
def test_a_packed_batch_trains_like_the_padded_one(
    tmp_path: Path, tiny_model_dir: Path, loss_type: str, attention: str
) -> None:
    """SDPA keeps the sequences apart through transformers' per-document mask,
    `kubetune_varlen` through the position ids it reads (on CPUs: its per-document loop,
    the reference of the GPU kernel)."""
    import torch

    from kubetune.trainer.fastpath.attention import register_attention

    register_attention()
    trainer = trainer_for(tiny_model_dir, tmp_path, loss_type, attention)
    examples = [trainer.train_dataset[i] for i in range(4)]
    padded = trainer.data_collator(examples)
    packed = packed_collator(trainer.data_collator)(examples)
    # The point of packing: no padding positions.
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    expected_loss, expected = loss_and_gradients(trainer, padded)
    expected_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert expected_metrics["rewards/margins"] != 0  # the policy is not its reference
    with packed_forward(trainer.model, trainer.ref_model):
        loss, gradients = loss_and_gradients(trainer, packed)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert gradients.keys() == expected.keys()
    assert any(g.abs().max() > 0 for g in expected.values())
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy"):
        assert metrics[name] == pytest.approx(expected_metrics[name], rel=1e-5, abs=1e-6), name
    for name in ("logits/chosen", "mean_token_accuracy"):
        assert metrics[name] == pytest.approx(expected_metrics[name], rel=1e-4, abs=1e-6), name


def test_without_the_hooks_a_packed_batch_fails(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A packed batch cannot silently train without the hooks that make it one row per
    sequence: TRL's per-sequence labels do not fit the packed row."""
    trainer = trainer_for(tiny_model_dir, tmp_path, "sigmoid")
    examples = [trainer.train_dataset[i] for i in range(4)]
    packed = packed_collator(trainer.data_collator)(examples)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        trainer.compute_loss(trainer.model, packed)


def test_reference_log_probs_of_a_packed_batch_match(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What `precomputeReferenceLogProbs` computes (TRL's compute_ref_log_probs, also run on
    the evaluation set at evaluation time)."""
    import torch

    trainer = trainer_for(tiny_model_dir, tmp_path, "sigmoid")
    examples = [trainer.train_dataset[i] for i in range(4)]
    padded = trainer.data_collator(examples)
    packed = packed_collator(trainer.data_collator)(examples)
    expected = trainer.compute_ref_log_probs(trainer.model, padded)
    with packed_forward(trainer.model, trainer.ref_model):
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, packed)
    torch.testing.assert_close(chosen, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, expected[1], rtol=1e-5, atol=1e-5)
    assert chosen.shape == (4,)


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_on_a_gpu_the_varlen_kernel_trains_a_packed_batch_like_padded_sdpa(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on the GPU: the packed row through torch's varlen kernel (not the per-document
    loop) against the padded batch through SDPA. Prints the measured differences."""
    from kubetune.trainer.fastpath import attention

    def no_reference(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the per-document loop ran instead of the varlen kernel")

    attention.register_attention()
    padded_trainer = trainer_for(tiny_model_dir, tmp_path / "sdpa", "sigmoid", "sdpa", cuda=True)
    packed_trainer = trainer_for(
        tiny_model_dir, tmp_path / "varlen", "sigmoid", attention.ATTENTION_NAME, cuda=True
    )
    examples = [padded_trainer.train_dataset[i] for i in range(4)]
    padded = padded_trainer._prepare_inputs(padded_trainer.data_collator(examples))
    packed = packed_collator(packed_trainer.data_collator)(examples)
    packed = packed_trainer._prepare_inputs(packed)
    assert packed["input_ids"].is_cuda

    expected_loss, expected = loss_and_gradients(padded_trainer, padded)
    monkeypatch.setattr(attention, "per_document_attention", no_reference)
    with packed_forward(packed_trainer.model, packed_trainer.ref_model):
        loss, gradients = loss_and_gradients(packed_trainer, packed)

    assert gradients.keys() == expected.keys()
    relative = {
        name: ((gradients[name].float() - g.float()).norm() / g.float().norm()).item()
        for name, g in expected.items()
        if g.abs().max() > 0
    }
    assert relative
    worst = max(relative, key=relative.__getitem__)
    print(
        f"\npacked (varlen kernel) against padded (SDPA), bf16: loss {loss:.7f} / "
        f"{expected_loss:.7f}, largest relative gradient difference {relative[worst]:.3g} "
        f"({worst})"
    )
    assert abs(expected_loss - math.log(2)) > 3e-4  # the policy is not its reference
    assert loss == pytest.approx(expected_loss, abs=1e-4)
    assert relative[worst] < 0.1, worst
