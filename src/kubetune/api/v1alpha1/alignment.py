"""Stages of a FineTuneJob and the settings of the alignment stages."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StrictInt

from kubetune.api.base import ApiModel, Decimal, Fraction
from kubetune.api.v1alpha1.dataset import DatasetSpec
from kubetune.api.v1alpha1.training import StageTrainingOverrides


class StageType(str, Enum):
    """A training stage. Each consumes the previous stage's output."""

    SFT = "SFT"
    DPO = "DPO"
    ORPO = "ORPO"
    KTO = "KTO"
    SIMPO = "SimPO"
    REWARD_MODEL = "RewardModel"
    RLHF = "RLHF"


PREFERENCE_STAGES = (
    StageType.DPO,
    StageType.ORPO,
    StageType.KTO,
    StageType.SIMPO,
    StageType.REWARD_MODEL,
)


class StageSpec(ApiModel):
    """One stage of the chain, e.g. {type: SFT} then {type: DPO, dataset: {…}}."""

    type: StageType
    """SFT, DPO, ORPO, KTO, SimPO, RewardModel or RLHF."""

    dataset: DatasetSpec | None = None
    """Data for this stage instead of spec.dataset (e.g. preference pairs for DPO)."""

    training: StageTrainingOverrides | None = None
    """Hyperparameters this stage sets differently from spec.training."""


class DPOLossType(str, Enum):
    """DPO loss variant."""

    SIGMOID = "Sigmoid"
    IPO = "IPO"
    HINGE = "Hinge"
    ROBUST = "Robust"
    EXO_PAIR = "EXOPair"
    NCA_PAIR = "NCAPair"
    BCO_PAIR = "BCOPair"
    SPPO_HARD = "SPPOHard"
    AOT = "AOT"
    AOT_PAIR = "AOTPair"
    APO_ZERO = "APOZero"
    APO_DOWN = "APODown"
    DISCOPOP = "DiscoPOP"


class DPOSpec(ApiModel):
    """Direct preference optimization. With LoRA/QLoRA the reference is the base model
    with the adapter disabled (no second copy in memory)."""

    beta: Decimal = "0.1"
    """Strength of the KL penalty towards the reference model."""

    loss_type: DPOLossType = DPOLossType.SIGMOID
    """Loss variant (Sigmoid is the original DPO)."""

    label_smoothing: Fraction = "0"
    """Assumed label noise (conservative / robust DPO)."""

    precompute_reference_log_probs: bool = False
    """Compute the reference log-probabilities once before training (saves memory and time
    per step at the cost of a first pass)."""


class ORPOSpec(ApiModel):
    """Odds-ratio preference optimization (no reference model)."""

    beta: Decimal = "0.1"
    """Weight of the odds-ratio term."""


class KTOSpec(ApiModel):
    """Kahneman-Tversky optimization on desirable / undesirable examples."""

    beta: Decimal = "0.1"
    """Strength of the KL penalty towards the reference model."""

    desirable_weight: Decimal = "1.0"
    """Weight of desirable examples."""

    undesirable_weight: Decimal = "1.0"
    """Weight of undesirable examples."""


class SimPOSpec(ApiModel):
    """Simple preference optimization (length-normalized, no reference model)."""

    beta: Decimal = "2.0"
    """Reward scale."""

    gamma_beta_ratio: Decimal = "0.5"
    """Target reward margin divided by beta."""


class RewardModelSpec(ApiModel):
    """Reward model training: a sequence-classification head with a pairwise loss."""

    center_rewards_coefficient: Decimal | None = None
    """Penalty that keeps rewards centred on zero (e.g. "0.01")."""

    eval_fraction: Fraction = "0.1"
    """Share of the preference pairs held out to measure pairwise accuracy."""


class RLHFAlgorithm(str, Enum):
    """Reinforcement-learning algorithm of the RLHF stage."""

    PPO = "PPO"
    RLOO = "RLOO"
    GRPO = "GRPO"


class RolloutSpec(ApiModel):
    """Sampling settings for RLHF rollouts."""

    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=32768)] = 128
    """Longest generation in tokens."""

    temperature: Decimal = "1.0"
    """Sampling temperature (rollouts need sampling: keep it above 0)."""

    top_p: Fraction = "1.0"
    """Nucleus sampling threshold."""


class PPOSpec(ApiModel):
    """PPO settings (the project's own PPO: clipped objective, value head, GAE)."""

    clip_range: Decimal = "0.2"
    """Policy ratio clipping."""

    value_clip_range: Decimal = "0.2"
    """Value prediction clipping."""

    gamma: Fraction = "1.0"
    """Discount factor."""

    lam: Fraction = "0.95"
    """GAE lambda."""

    ppo_epochs: Annotated[StrictInt, Field(ge=1, le=64)] = 4
    """Optimization epochs per batch of rollouts."""

    value_loss_coefficient: Decimal = "0.1"
    """Weight of the value loss."""


class RLHFSpec(ApiModel):
    """RLHF with the reward model trained in the previous stage."""

    algorithm: RLHFAlgorithm = RLHFAlgorithm.PPO
    """PPO, RLOO or GRPO."""

    kl_coefficient: Decimal = "0.05"
    """Initial KL penalty towards the reference (the SFT policy)."""

    kl_target: Decimal | None = None
    """Adapt the KL coefficient towards this KL (PPO adaptive control)."""

    num_generations: Annotated[StrictInt, Field(ge=1, le=256)] = 4
    """Completions sampled per prompt (RLOO, GRPO group size)."""

    generation: RolloutSpec | None = None
    """Sampling settings for rollouts (default: temperature 1.0, 128 new tokens)."""

    ppo: PPOSpec | None = None
    """PPO-only settings."""


class AlignmentSpec(ApiModel):
    """Settings of the alignment stages listed in spec.stages."""

    dpo: DPOSpec | None = None
    """Settings of the DPO stage."""

    orpo: ORPOSpec | None = None
    """Settings of the ORPO stage."""

    kto: KTOSpec | None = None
    """Settings of the KTO stage."""

    simpo: SimPOSpec | None = None
    """Settings of the SimPO stage."""

    reward_model: RewardModelSpec | None = None
    """Settings of the RewardModel stage."""

    rlhf: RLHFSpec | None = None
    """Settings of the RLHF stage."""
