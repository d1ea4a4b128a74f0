"""Proximal policy optimization (PPO) for the RLHF stage.

One PPO step, as `train_ppo` runs it:

1. Sample a batch of prompts and render them with the chat template.
2. Generate a completion for each with sampling (the rollouts); a completion ends at its
   first EOS, the tokens after it are padding.
3. Without gradients, compute the log-probability of every sampled token under the policy
   (old log-probs), under the reference (for a LoRA policy a frozen copy of the adapter
   the stage started from, or the base with the adapter disabled; else a frozen model),
   and the value head's estimate of the reward still to come.
4. Score each prompt + completion with the reward function (the reward model).
5. Turn the score into per-token rewards (score on the last token, a KL penalty on every
   token) and compute advantages and value targets with GAE (`ppo_math.py`).
6. Run `ppoEpochs` passes over the batch in mini-batches, updating the policy with the
   clipped surrogate loss and the value head with the clipped value loss.
7. Move the KL coefficient towards `klTarget` (when set).

The policy is sampled in eval mode and updated in train mode with every dropout set to 0:
PPO's ratio π/π_old must be exactly 1 before the first update, which dropout would break.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kubetune.api.base import parse_decimal
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1.alignment import PPOSpec, RLHFAlgorithm, RLHFSpec, RolloutSpec
from kubetune.trainer.alignment.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from kubetune.trainer.alignment.ppo_rollouts import (
    Rollouts,
    completion_texts,
    eos_token_ids,
    reference_logprobs,
    render_prompt,
    response_logprobs,
    sample_rollouts,
)
from kubetune.trainer.models import TrainingSetupError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RewardFn = Callable[[list[str], list[str]], list[float]]
"""Scores completions: (rendered prompts, completion texts) → one float per completion."""


@dataclass(frozen=True)
class PPOSettings:
    """The numbers of an RLHFSpec, parsed and checked."""

    clip_range: float
    value_clip_range: float
    gamma: float
    lam: float
    ppo_epochs: int
    value_loss_coefficient: float
    kl_coefficient: float
    kl_target: float | None
    max_new_tokens: int
    temperature: float
    top_p: float


def ppo_settings(spec: RLHFSpec) -> PPOSettings:
    """Parse the decimal fields and refuse values PPO cannot run with, all at once (the
    API already refuses negative decimals)."""
    ppo = spec.ppo or PPOSpec()
    rollout = spec.generation or RolloutSpec()
    settings = PPOSettings(
        clip_range=parse_decimal(ppo.clip_range),
        value_clip_range=parse_decimal(ppo.value_clip_range),
        gamma=parse_decimal(ppo.gamma),
        lam=parse_decimal(ppo.lam),
        ppo_epochs=ppo.ppo_epochs,
        value_loss_coefficient=parse_decimal(ppo.value_loss_coefficient),
        kl_coefficient=parse_decimal(spec.kl_coefficient),
        kl_target=None if spec.kl_target is None else parse_decimal(spec.kl_target),
        max_new_tokens=rollout.max_new_tokens,
        temperature=parse_decimal(rollout.temperature),
        top_p=parse_decimal(rollout.top_p),
    )
    problems = []
    if spec.algorithm != RLHFAlgorithm.PPO:
        problems.append(f"alignment.rlhf.algorithm is {spec.algorithm.value}, not PPO")
    for field, value in (
        ("alignment.rlhf.ppo.clipRange", settings.clip_range),
        ("alignment.rlhf.ppo.valueClipRange", settings.value_clip_range),
        ("alignment.rlhf.generation.temperature", settings.temperature),
        ("alignment.rlhf.generation.topP", settings.top_p),
    ):
        if value <= 0:
            problems.append(f"{field} ({value:g}) must be above 0")
    if settings.kl_target is not None and settings.kl_target <= 0:
        problems.append(
            f"alignment.rlhf.klTarget ({settings.kl_target:g}) must be above 0; remove it "
            "to keep the KL coefficient fixed"
        )
    if problems:
        raise TrainingSetupError(Reason.INVALID_SPEC, "; ".join(problems))
    return settings


class ValueHead(nn.Module):
    """A linear map from the policy's last hidden state to a scalar value per token.

    Starts at zero so the first value targets are not noise; trained together with the
    policy (its gradient also reaches the adapter through the shared hidden states).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.linear(hidden_states.float()).squeeze(-1)


@dataclass(frozen=True)
class PPOResult:
    """What the PPO stage produced."""

    policy: PreTrainedModel
    """The trained policy (the same object that was passed in)."""

    value_head: ValueHead
    """The trained value head (not needed for inference)."""

    history: list[dict[str, float]]
    """One record per step: step, score, kl, kl_coef, policy_loss, value_loss,
    clip_fraction, value_clip_fraction, approx_kl, response_length, seconds."""

    metrics: dict[str, float]
    """The last step's record, plus the first step's mean score as initial_score."""

    stopped_at: int | None = None
    """The step after which `stop` ended the run early (a checkpoint was offered)."""


def train_ppo(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, Any]]],
    reward_fn: RewardFn,
    *,
    spec: RLHFSpec,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log: Callable[[str], None],
    on_step: Callable[[dict[str, float]], None] | None = None,
    reference: PreTrainedModel | None = None,
    mini_batch_size: int | None = None,
    max_grad_norm: float = 1.0,
    start_step: int = 0,
    state: dict[str, Any] | None = None,
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    stop: Callable[[], bool] | None = None,
    reference_adapter: str | None = None,
) -> PPOResult:
    """Train `policy` with PPO against `reward_fn` for `steps` batches of rollouts.

    Args:
        policy: the model to train. A PEFT (LoRA/QLoRA) model is its own reference, with
            `reference_adapter` active or with the adapter disabled; a plain model needs
            `reference`.
        tokenizer: its tokenizer, with the chat template the prompts are rendered with.
        prompts: conversations (chat messages) ending before the assistant's turn.
        reward_fn: scores (rendered prompts, completion texts without special tokens).
        spec: the RLHF settings (algorithm PPO).
        steps: PPO steps, each one batch of rollouts and `ppoEpochs` passes over it.
        batch_size: prompts (and completions) per step.
        learning_rate: AdamW learning rate of the trainable weights and the value head.
        seed: seeds prompt order, sampling and mini-batch order (reproducible on a CPU).
        log: receives one line per step.
        on_step: receives each step's record (for the JSONL log, metrics, checkpoints).
        reference: a frozen copy of the starting policy, for a policy without an adapter
            (full fine-tuning). When given, it is used even for a PEFT policy.
        mini_batch_size: rollouts per gradient step (default: the whole batch); also the
            chunk size of the forward passes without gradients.
        max_grad_norm: gradient clipping.
        start_step: steps already done (resuming); the prompt order, sampling and
            mini-batch order of every step depend only on `seed` and the step number, so a
            resumed run continues as the uninterrupted one would.
        state: what `checkpoint` received at `start_step` (value head, optimizer, KL
            coefficient); the caller restores the policy weights itself.
        checkpoint: receives (step, state) every `checkpoint_every` steps, at the last
            step, and when `stop` ends the run early.
        checkpoint_every: steps between checkpoints (0: only at the end and on stop).
        stop: polled after each step; True ends the run early (e.g. on SIGTERM).
        reference_adapter: for a PEFT policy, a frozen adapter to use as the reference
            (e.g. a copy of the adapter the stage started from) instead of the base with
            the adapter disabled.
    """
    settings = ppo_settings(spec)
    _check_policy(policy, reference)
    if not prompts or steps < 1 or batch_size < 1:
        raise ValueError("train_ppo needs prompts, steps >= 1 and batch_size >= 1")
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    value_head = ValueHead(policy.config.get_text_config().hidden_size).to(device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    learner = _Learner(
        policy=policy,
        reference=reference,
        reference_adapter=reference_adapter,
        value_head=value_head,
        optimizer=torch.optim.AdamW([*trainable, *value_head.parameters()], lr=learning_rate),
        settings=settings,
        controller=(
            FixedKLController(settings.kl_coefficient)
            if settings.kl_target is None
            else AdaptiveKLController(settings.kl_coefficient, settings.kl_target)
        ),
        mini_batch_size=min(mini_batch_size or batch_size, batch_size),
        max_grad_norm=max_grad_norm,
        generator=torch.Generator().manual_seed(seed),
    )
    if state is not None:
        value_head.load_state_dict(state["value_head"])
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.controller.value = float(state["kl_coef"])
    texts = [render_prompt(tokenizer, messages) for messages in prompts]
    batches = _prompt_batches(texts, batch_size, random.Random(seed))
    for _ in range(start_step):
        next(batches)
    eos_ids = eos_token_ids(policy, tokenizer)
    history: list[dict[str, float]] = []
    stopped_at = None
    with _ppo_mode(policy):
        for step in range(start_step + 1, steps + 1):
            started = time.monotonic()
            prompt_texts = next(batches)
            torch.manual_seed(seed + step)
            learner.generator.manual_seed(seed + step)
            rollouts = sample_rollouts(
                policy,
                tokenizer,
                prompt_texts,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                eos_ids=eos_ids,
            )
            scores = _score(reward_fn, prompt_texts, completion_texts(tokenizer, rollouts))
            experience = learner.experience(rollouts, scores)
            record = {"step": float(step), **learner.update(rollouts, experience)}
            record["seconds"] = time.monotonic() - started
            history.append(record)
            log(_line(record, steps))
            if on_step is not None:
                on_step(record)
            stopping = stop is not None and stop() and step < steps
            due = step == steps or (checkpoint_every > 0 and step % checkpoint_every == 0)
            if checkpoint is not None and (due or stopping):
                checkpoint(step, learner.state())
            if stopping:
                stopped_at = step
                break
    if not history:
        raise ValueError(f"nothing to do: start_step {start_step} >= steps {steps}")
    metrics = {key: value for key, value in history[-1].items() if key != "step"}
    metrics["initial_score"] = history[0]["score"]
    return PPOResult(policy, value_head, history, metrics, stopped_at)


@dataclass
class _Learner:
    """What persists across PPO steps: the models, the optimizer and the KL controller."""

    policy: PreTrainedModel
    reference: PreTrainedModel | None
    reference_adapter: str | None
    value_head: ValueHead
    optimizer: torch.optim.Optimizer
    settings: PPOSettings
    controller: FixedKLController | AdaptiveKLController
    mini_batch_size: int
    max_grad_norm: float
    generator: torch.Generator

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the policy weights to continue."""
        return {
            "value_head": self.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_coef": self.controller.value,
        }

    def experience(self, rollouts: Rollouts, scores: Tensor) -> dict[str, Tensor]:
        """Everything PPO holds fixed while it learns from a batch, [batch, tokens] each:
        old log-probs and values, reference log-probs, advantages and value targets."""
        temperature = self.settings.temperature
        old, ref = [], []
        with torch.no_grad():
            for rows in torch.arange(len(scores)).split(self.mini_batch_size):
                chunk = rollouts.select(rows)
                old.append(response_logprobs(self.policy, chunk, temperature, self.value_head))
                ref.append(
                    reference_logprobs(
                        self.policy, self.reference, chunk, temperature, self.reference_adapter
                    )
                )
        logprobs = torch.cat([chunk_logprobs for chunk_logprobs, _ in old])
        values = torch.cat([chunk_values for _, chunk_values in old if chunk_values is not None])
        ref_logprobs = torch.cat(ref)
        mask = rollouts.mask.float()
        scores = scores.to(mask.device)
        rewards = shaped_rewards(scores, logprobs, ref_logprobs, mask, self.controller.value)
        advantages, returns = gae(rewards, values, mask, self.settings.gamma, self.settings.lam)
        return {
            "logprobs": logprobs,
            "ref_logprobs": ref_logprobs,
            "values": values,
            "advantages": masked_whiten(advantages, mask),
            "returns": returns,
            "mask": mask,
            "scores": scores,
        }

    def update(self, rollouts: Rollouts, experience: dict[str, Tensor]) -> dict[str, float]:
        """`ppoEpochs` passes of mini-batch updates, then the KL controller; returns the
        step's record."""
        settings = self.settings
        mask = experience["mask"]
        size = mask.shape[0]
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        totals: dict[str, float] = {}
        updates = 0
        self.policy.train()
        for _ in range(settings.ppo_epochs):
            for rows in torch.randperm(size, generator=self.generator).split(self.mini_batch_size):
                batch = {key: tensor[rows] for key, tensor in experience.items()}
                logprobs, values = response_logprobs(
                    self.policy, rollouts.select(rows), settings.temperature, self.value_head
                )
                assert values is not None
                p_loss, clip_fraction, approx_kl = policy_loss(
                    logprobs,
                    batch["logprobs"],
                    batch["advantages"],
                    batch["mask"],
                    settings.clip_range,
                )
                v_loss, value_clip_fraction = value_loss(
                    values,
                    batch["values"],
                    batch["returns"],
                    batch["mask"],
                    settings.value_clip_range,
                )
                self.optimizer.zero_grad()
                (p_loss + settings.value_loss_coefficient * v_loss).backward()
                nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
                self.optimizer.step()
                for key, value in (
                    ("policy_loss", p_loss),
                    ("value_loss", v_loss),
                    ("clip_fraction", clip_fraction),
                    ("value_clip_fraction", value_clip_fraction),
                    ("approx_kl", approx_kl),
                ):
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
                updates += 1
        # A response's KL is the sum over its tokens; the controller acts on the batch mean.
        kl_tokens = kl_per_token(experience["logprobs"], experience["ref_logprobs"])
        kl = float((kl_tokens * mask).sum(dim=1).mean())
        record = {
            "score": float(experience["scores"].mean()),
            "kl": kl,
            "kl_coef": self.controller.value,
            **{key: total / updates for key, total in totals.items()},
            "response_length": float(mask.sum(dim=1).mean()),
        }
        self.controller.update(kl, size)
        return record


def _score(reward_fn: RewardFn, prompt_texts: list[str], completions: list[str]) -> Tensor:
    scores = torch.tensor(reward_fn(prompt_texts, completions), dtype=torch.float32)
    if scores.shape != (len(completions),) or not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"the reward function must return one finite score per completion "
            f"({len(completions)}); it returned {scores.tolist()}"
        )
    return scores


def _check_policy(policy: PreTrainedModel, reference: PreTrainedModel | None) -> None:
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        if reference is None:
            raise ValueError(
                "train_ppo needs a reference model for a policy without a PEFT adapter "
                "(full fine-tuning): pass a frozen copy of the starting policy as reference"
            )
        return
    if policy.active_peft_config.is_prompt_learning:
        raise TrainingSetupError(
            Reason.INVALID_SPEC,
            "the RLHF stage trains LoRA, QLoRA or Full models; prefix and prompt tuning "
            "are not supported: change spec.method",
        )


def _prompt_batches(texts: list[str], batch_size: int, rng: random.Random) -> Iterator[list[str]]:
    """Batches that go through the prompts in a shuffled order, reshuffled each pass."""
    order: list[int] = []
    while True:
        batch: list[str] = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(texts)))
                rng.shuffle(order)
            batch.append(texts[order.pop()])
        yield batch


@contextmanager
def _ppo_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the whole run; dropout and train/eval mode restored afterwards."""
    was_training = model.training
    saved = [(module, module.p) for module in model.modules() if isinstance(module, nn.Dropout)]
    for module, _ in saved:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in saved:
            module.p = p
        model.train(was_training)


def _line(record: dict[str, float], steps: int) -> str:
    return (
        f"PPO step {int(record['step'])}/{steps}: score {record['score']:.4f}, "
        f"KL {record['kl']:.4f} (coef {record['kl_coef']:.4f}), "
        f"policy loss {record['policy_loss']:.4f}, value loss {record['value_loss']:.4f}, "
        f"clipped {record['clip_fraction']:.0%}, "
        f"length {record['response_length']:.1f}, {record['seconds']:.1f}s"
    )
