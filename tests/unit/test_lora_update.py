"""The LoRA update inside one GEMM: the same outputs and gradients as PEFT's layer, and
PEFT's own forward for every case it does not cover."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from kubetune.trainer.fastpath.lora_update import LoraUpdate, apply_fused_update

TARGETS = ["q_proj", "v_proj", "up_proj"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.v_proj = nn.Linear(24, 24, bias=False)
        self.up_proj = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(torch.tanh(self.v_proj(torch.tanh(self.q_proj(x)))))


def pair(dropout: float = 0.0, **options: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, **options)
    model = get_peft_model(Tiny(), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # PEFT starts B at zero: the update would vanish
    fused = copy.deepcopy(model)
    assert apply_fused_update(fused) == len(TARGETS)
    return model, fused


Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


def run(model: nn.Module, x: torch.Tensor, seed: int = 1) -> Result:
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return out.detach(), grads


def assert_same(a: Result, b: Result, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=atol)
    assert a[1].keys() == b[1].keys()
    assert any("lora_A" in k for k in a[1])
    assert any("lora_B" in k for k in a[1])
    for key in a[1]:
        torch.testing.assert_close(a[1][key], b[1][key], atol=atol, rtol=atol, msg=key)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


def test_fused_layers_give_peft_outputs_and_gradients_in_fp32() -> None:
    model, fused = pair()
    assert_same(run(model, X), run(fused, X), atol=1e-5)


def test_with_dropout_the_same_masks_give_the_same_results() -> None:
    model, fused = pair(dropout=0.3)
    model.train()
    fused.train()
    assert_same(run(model, X, seed=7), run(fused, X, seed=7), atol=1e-5)
    # a different seed draws other masks: the comparison above can tell them apart
    other = run(fused, X, seed=8)
    assert not torch.allclose(other[0], run(model, X, seed=7)[0])


def test_under_bf16_autocast_the_results_are_as_close_to_fp64_as_peft() -> None:
    model, fused = pair()
    truth = run(copy.deepcopy(model).double(), X.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_result, fused_result = run(model, X), run(fused, X)
    assert fused_result[0].dtype == torch.bfloat16

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).norm() / want.norm()).item()

    pairs = [("output", peft_result[0], fused_result[0], truth[0])]
    pairs += [(k, peft_result[1][k], fused_result[1][k], v) for k, v in truth[1].items()]
    for name, peft_value, fused_value, want in pairs:
        peft_error, fused_error = error(peft_value, want), error(fused_value, want)
        assert fused_error < 0.03, name  # bf16 rounding: measured 0.006-0.016
        assert fused_error < 1.5 * peft_error + 0.005, (name, peft_error, fused_error)


def test_the_gemm_is_the_update_peft_computes() -> None:
    result = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight_b = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)

    def update(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return LoraUpdate.apply(r, a, b, 2.5)

    assert torch.autograd.gradcheck(update, (result, h, weight_b))
    torch.testing.assert_close(update(result, h, weight_b), result + h @ weight_b.T * 2.5)


def test_disabled_merged_and_switched_adapters_run_peft_forward() -> None:
    model, fused = pair()
    with model.disable_adapter(), fused.disable_adapter():
        assert torch.equal(model(X), fused(X))
    for m in (model, fused):
        torch.manual_seed(5)
        m.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
        m.set_adapter("other")
    assert_same(run(model, X), run(fused, X), atol=1e-5)
    fused.base_model.merge_adapter()
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(X), fused(X))


def test_mixed_adapter_batches_and_dora_keep_peft_forward() -> None:
    model, fused = pair()
    model.eval()
    fused.eval()
    names = ["default", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(model(X, adapter_names=names), fused(X, adapter_names=names))
    dora, dora_fused = pair(use_dora=True)
    assert_same(run(dora, X), run(dora_fused, X), atol=1e-6)


def test_merge_and_save_see_the_same_model() -> None:
    model, fused = pair()
    assert fused.state_dict().keys() == model.state_dict().keys()
    merged = model.merge_and_unload()
    merged_fused = fused.merge_and_unload()
    for (name, a), (_, b) in zip(
        merged.state_dict().items(), merged_fused.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert all(type(m) is nn.Linear for m in (merged_fused.q_proj, merged_fused.up_proj))


@pytest.mark.parametrize("times", [1, 2])
def test_fusing_twice_changes_nothing_more(times: int) -> None:
    model, fused = pair()
    for _ in range(times):
        assert apply_fused_update(fused) == 0
    assert_same(run(model, X), run(fused, X), atol=1e-5)
