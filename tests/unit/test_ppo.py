"""PPO's arithmetic against values worked out by hand on small fixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import RLHFSpec
from kubetune.trainer.alignment.ppo import ppo_settings
from kubetune.trainer.alignment.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from kubetune.trainer.alignment.ppo_rollouts import response_mask
from kubetune.trainer.models import TrainingSetupError


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_masked_mean_ignores_masked_positions() -> None:
    values = t([[1, 2, 3], [4, 5, 6]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)


def test_masked_whiten_uses_valid_tokens_only() -> None:
    # Valid values 1 and 3: mean 2, population variance ((1-2)² + (3-2)²) / 2 = 1.
    whitened = masked_whiten(t([[1, 3, 100]]), t([[1, 1, 0]]))
    assert whitened.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_gae_with_gamma_one_and_lambda_095() -> None:
    advantages, returns = gae(t([[0, 0, 1]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]]), 1.0, 0.95)
    # δ2 = 1 + 0 - 0.3 = 0.7                      A2 = 0.7
    # δ1 = 0 + 0.3 - 0.4 = -0.1                   A1 = -0.1 + 0.95 · 0.7 = 0.565
    # δ0 = 0 + 0.4 - 0.5 = -0.1                   A0 = -0.1 + 0.95 · 0.565 = 0.43675
    assert advantages.tolist()[0] == pytest.approx([0.43675, 0.565, 0.7])
    assert returns.tolist()[0] == pytest.approx([0.43675 + 0.5, 0.565 + 0.4, 0.7 + 0.3])


def test_gae_bootstraps_zero_after_the_last_valid_token() -> None:
    # The padding's huge reward and value must not leak into the response.
    rewards = t([[0, 2, 999], [0, 0, 1]])
    values = t([[1.0, 0.5, 999], [0.5, 0.4, 0.3]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, 0.9, 0.5)
    # Row 0: δ1 = 2 + 0.9 · 0 - 0.5 = 1.5            A1 = 1.5
    #        δ0 = 0 + 0.9 · 0.5 - 1.0 = -0.55        A0 = -0.55 + 0.9 · 0.5 · 1.5 = 0.125
    assert advantages.tolist()[0] == pytest.approx([0.125, 1.5, 0.0])
    assert returns.tolist()[0] == pytest.approx([1.125, 2.0, 0.0])
    # Row 1 (no padding): δ = [0.9·0.4 - 0.5, 0.9·0.3 - 0.4, 1 - 0.3] = [-0.14, -0.13, 0.7]
    a2 = 0.7
    a1 = -0.13 + 0.45 * a2
    a0 = -0.14 + 0.45 * a1
    assert advantages.tolist()[1] == pytest.approx([a0, a1, a2])


def test_kl_estimators() -> None:
    logprobs, ref_logprobs = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    # k1 = log(0.5 / 0.25) = log 2; k3 with ρ = 0.25 / 0.5: (0.5 - 1) - log 0.5.
    assert kl_per_token(logprobs, ref_logprobs).item() == pytest.approx(math.log(2))
    k3 = kl_per_token(logprobs, ref_logprobs, "k3").item()
    assert k3 == pytest.approx(-0.5 + math.log(2))
    assert kl_per_token(ref_logprobs, logprobs, "k3").item() > 0  # k3 is never negative


def test_shaped_rewards_put_the_score_on_the_last_valid_token() -> None:
    logprobs = t([[-1, -1, -1], [-2, -2, 0]])
    ref_logprobs = t([[-1.5, -1, -0.5], [-1, -2, 5]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = shaped_rewards(t([[1.0, -2.0]])[0], logprobs, ref_logprobs, mask, kl_coef=0.1)
    # Row 0: k1 = [0.5, 0, -0.5] → -0.1·k1 = [-0.05, 0, 0.05]; score 1 on token 2.
    # Row 1: k1 = [-1, 0, (masked)] → [0.1, 0, 0]; score -2 on token 1, the last valid one.
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 1.05])
    assert rewards.tolist()[1] == pytest.approx([0.1, -2.0, 0.0])


def test_policy_loss_clips_only_where_the_ratio_leaves_the_range() -> None:
    ratios = [1.5, 1.1, 0.5, 1.5, 3.0]
    advantages = t([[1, 1, -1, -2, 100]])
    mask = t([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5, dtype=torch.float64)
    new = t([[math.log(r) for r in ratios]]).requires_grad_()
    loss, clip_fraction, approx_kl = policy_loss(new, old, advantages, mask, clip_range=0.2)
    # Token 0: A = 1,  ρ = 1.5 → max(-1.5, -1.2) = -1.2   clipped (no gain beyond 1.2)
    # Token 1: A = 1,  ρ = 1.1 → max(-1.1, -1.1) = -1.1   inside the range
    # Token 2: A = -1, ρ = 0.5 → max(0.5, 0.8)   = 0.8    clipped
    # Token 3: A = -2, ρ = 1.5 → max(3.0, 2.4)   = 3.0    the unclipped term is worse: kept
    # Token 4 is masked.
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 3.0) / 4)
    assert clip_fraction.item() == pytest.approx(2 / 4)
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in ratios[:4]) / 4
    assert approx_kl.item() == pytest.approx(expected_kl)
    loss.backward()
    assert new.grad is not None
    # Clipped and masked tokens get no gradient; the others get -A·ρ / 4.
    assert new.grad.tolist()[0] == pytest.approx([0.0, -1.1 / 4, 0.0, 2 * 1.5 / 4, 0.0])


def test_policy_loss_without_change_is_minus_the_mean_advantage() -> None:
    logprobs = t([[-1.0, -2.0, -3.0]])
    loss, clip_fraction, approx_kl = policy_loss(
        logprobs, logprobs, t([[1.0, 3.0, 50.0]]), t([[1, 1, 0]]), clip_range=0.2
    )
    assert loss.item() == pytest.approx(-2.0)
    assert clip_fraction.item() == 0.0
    assert approx_kl.item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors() -> None:
    new = t([[1.0, 0.6, 0.0, 9.0]])
    old = t([[0.5, 0.5, 0.5, 0.5]])
    returns = t([[1.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clip_fraction = value_loss(new, old, returns, mask, value_clip_range=0.2)
    # Token 0: (1.0 - 1)² = 0, clipped value 0.7: (0.7 - 1)² = 0.09 → 0.09  (clipped)
    # Token 1: moved 0.1, within the range: (0.6 - 0)² = 0.36 both    → 0.36
    # Token 2: (0 - 1)² = 1, clipped value 0.3: (0.3 - 1)² = 0.49     → 1.0
    # Token 3 is masked.
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.36 + 1.0) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        # KL twice the target: error clipped to +0.2 → β · (1 + 0.2 · 100 / 10000).
        pytest.param(12.0, 0.1 * 1.002, id="above-target-raises"),
        # KL half the target: error -0.5 clipped to -0.2 → β · (1 - 0.002).
        pytest.param(3.0, 0.1 * 0.998, id="below-target-lowers"),
        # KL 10% above: error 0.1 → β · (1 + 0.1 · 0.01).
        pytest.param(6.6, 0.1 * 1.001, id="small-error-proportional"),
        pytest.param(6.0, 0.1, id="on-target-keeps"),
    ],
)
def test_adaptive_kl_controller(kl: float, expected: float) -> None:
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(kl, n_steps=100)
    assert controller.value == pytest.approx(expected)


def test_adaptive_kl_controller_moves_steadily_towards_the_target() -> None:
    above = AdaptiveKLController(0.1, target=6.0, horizon=1_000)
    below = AdaptiveKLController(0.1, target=6.0, horizon=1_000)
    for _ in range(50):
        above.update(20.0, n_steps=64)
        below.update(1.0, n_steps=64)
    # Each batch multiplies β by 1 ± 0.2 · 64 / 1000 (the error is clipped to ±0.2).
    assert above.value == pytest.approx(0.1 * 1.0128**50)  # ≈ 0.189
    assert below.value == pytest.approx(0.1 * 0.9872**50)  # ≈ 0.053
    fixed = FixedKLController(0.1)
    fixed.update(20.0, n_steps=64)
    assert fixed.value == 0.1


def test_response_mask_ends_at_the_first_eos() -> None:
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2], [5, 9, 6, 2]])
    assert response_mask(response, [2, 9]).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
    ]


def test_ppo_settings_parse_the_decimal_fields() -> None:
    settings = ppo_settings(
        RLHFSpec.model_validate(
            {
                "klCoefficient": "0.02",
                "klTarget": "6",
                "generation": {"maxNewTokens": 16, "temperature": "0.7", "topP": "0.9"},
                "ppo": {"clipRange": "0.1", "gamma": "0.99", "ppoEpochs": 2},
            }
        )
    )
    assert (settings.kl_coefficient, settings.kl_target) == (0.02, 6.0)
    assert (settings.max_new_tokens, settings.temperature, settings.top_p) == (16, 0.7, 0.9)
    assert (settings.clip_range, settings.gamma, settings.lam, settings.ppo_epochs) == (
        0.1,
        0.99,
        0.95,
        2,
    )
    assert ppo_settings(RLHFSpec()).kl_target is None


def test_ppo_settings_report_every_problem_with_its_field() -> None:
    spec = RLHFSpec.model_validate(
        {
            "algorithm": "GRPO",
            "klTarget": "0",
            "generation": {"temperature": "0"},
            "ppo": {"clipRange": "0"},
        }
    )
    with pytest.raises(TrainingSetupError) as raised:
        ppo_settings(spec)
    assert raised.value.reason == Reason.INVALID_SPEC
    message = str(raised.value)
    for field in (
        "alignment.rlhf.algorithm",
        "alignment.rlhf.klTarget",
        "alignment.rlhf.generation.temperature",
        "alignment.rlhf.ppo.clipRange",
    ):
        assert field in message
