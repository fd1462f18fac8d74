"""The policy update of one step: frozen log-probs (old / reference), then epochs x minibatches x micro-batches of
the clipped policy-gradient loss through the DeepSpeed engine.

- With one optimizer step per training step (`BatchPlan.reuse_current_logprobs`) the "old" log-probs equal the
  current ones, so they are the current forward detached (ratio 1, the same gradient), as TRL does.
- token_mean divides by the tokens of the whole minibatch, summed over micro-batches and ranks (DAPO's global
  token mean: 2 ranks train exactly like 1 process on the same rollouts). DeepSpeed divides each micro-batch's
  loss by grad_accum and averages gradients over ranks, hence `/ world / grad_accum` on that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gdpo import distributed as dist
from gdpo.plan import BatchPlan
from gdpo.policy.lora import reference_model
from gdpo.policy.loss import policy_loss
from gdpo.policy.model import token_logprobs, token_logprobs_batched
from gdpo.rollout.types import RolloutBatch


@dataclass
class TrainTensors:
    """A step's rollouts as the trainer's tensors, on the training device."""

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    completion_mask: torch.Tensor  # [N, T] float
    prompt_len: int  # P
    sampling_logprobs: torch.Tensor | None  # [N, T] the engine's log-probs of the sampled tokens, if kept

    @staticmethod
    def from_rollout(batch: RolloutBatch, device: torch.device) -> "TrainTensors":
        logps = batch.sampling_logprobs
        return TrainTensors(
            input_ids=batch.input_ids().to(device),
            attention_mask=batch.attention_mask().to(device),
            completion_mask=batch.completion_mask.to(device).float(),
            prompt_len=batch.prompt_len,
            sampling_logprobs=None if logps is None else logps.to(device),
        )


@dataclass
class FrozenLogprobs:
    old: torch.Tensor | None  # [N, T] policy before the update; None = reuse the current forward, detached
    ref: torch.Tensor | None  # [N, T] reference model; None without a KL term


def frozen_logprobs(
    policy: torch.nn.Module,
    ref_model,  # nn.Module, gdpo.policy.lora.AdapterOffReference or None
    x: TrainTensors,
    *,
    need_old: bool,
    micro_batch_size: int,
    temperature: float,
    chunk_size: int,
) -> FrozenLogprobs:
    """No-grad log-probs of the completions under the policy (only when ``need_old``) and the reference."""

    def run(model: torch.nn.Module) -> torch.Tensor:
        return token_logprobs_batched(model, x.input_ids, x.attention_mask, x.prompt_len,
                                      micro_batch_size=micro_batch_size, temperature=temperature,
                                      chunk_size=chunk_size).logprobs

    old = run(policy) if need_old else None
    ref = None
    if ref_model is not None:
        with reference_model(ref_model) as m:  # LoRA: the policy itself, adapters off for the block
            ref = run(m)
    return FrozenLogprobs(old=old, ref=ref)


@dataclass
class UpdateStats:
    """What the update reports: loss statistics averaged over micro-batches, and per optimizer step."""

    means: dict[str, float] = field(default_factory=dict)  # loss/..., entropy, logprob_gap: mean over micro-batches
    grad_norms: list[float] = field(default_factory=list)  # one per optimizer step (NaN where not reported)
    lrs: list[float] = field(default_factory=list)
    micro_batches: int = 0

    @property
    def grad_norm(self) -> float:
        finite = [g for g in self.grad_norms if not math.isnan(g)]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def lr(self) -> float:
        return self.lrs[-1] if self.lrs else float("nan")


def _minibatches(n: int, plan: BatchPlan, epochs: int):
    """Row indices of each minibatch, epoch after epoch; shuffled unless one minibatch per step."""
    shuffle = epochs > 1 or plan.minibatch_rows < n
    for _ in range(epochs):
        order = torch.randperm(n) if shuffle else torch.arange(n)
        for s in range(0, n, plan.minibatch_rows):
            yield order[s : s + plan.minibatch_rows]


def _is_weights(old: torch.Tensor, samp: torch.Tensor | None, mask: torch.Tensor, *, correct: bool, cap: float):
    """(truncated IS weight [B, T] or None, mean |old - sampling| log-prob gap or None)."""
    if samp is None:
        return None, None
    gap = float(((old - samp).abs() * mask).sum() / mask.sum().clamp(min=1))
    return (torch.exp(old - samp).clamp(max=cap) if correct else None), gap


def update_policy(
    engine,
    x: TrainTensors,
    advantages: torch.Tensor,  # [N]
    frozen: FrozenLogprobs,
    plan: BatchPlan,
    *,
    loss_kwargs: dict[str, Any],
    temperature: float,
    chunk_size: int,
    is_correction: bool = True,
    is_cap: float = 2.0,
) -> UpdateStats:
    """Train ``engine`` on this rank's rows: ``plan.epochs`` passes of ``plan.minibatches_per_epoch`` optimizer
    steps, each over ``plan.grad_accum`` micro-batches of ``plan.micro_batch_rows`` rows.

    loss_kwargs: `policy_loss` keyword arguments fixed for the run (eps_low, eps_high, aggregation, beta,
    max_len). Every rank must call this with the same plan: the token count is all-reduced per minibatch.
    """
    stats = UpdateStats()
    sums: dict[str, float] = {}
    world = dist.world_size()
    device = advantages.device
    engine.module.train()
    for mb in _minibatches(len(advantages), plan, plan.epochs):
        mb = mb.to(device)
        mb_tokens = dist.all_reduce_sum(x.completion_mask[mb].sum().double().view(1)).item()
        mb_tokens = mb_tokens / world / plan.grad_accum
        for s in range(0, len(mb), plan.micro_batch_rows):
            rows = mb[s : s + plan.micro_batch_rows]
            mask = x.completion_mask[rows]
            out = dist.engine_forward(engine, token_logprobs, x.input_ids[rows], x.attention_mask[rows],
                                      x.prompt_len, return_entropy=True, temperature=temperature,
                                      chunk_size=chunk_size)
            old = out.logprobs.detach() if frozen.old is None else frozen.old[rows]
            samp = None if x.sampling_logprobs is None else x.sampling_logprobs[rows]
            is_w, gap = _is_weights(old, samp, mask, correct=is_correction, cap=is_cap)
            loss, st = policy_loss(out.logprobs, old, advantages[rows], mask, is_weights=is_w,
                                   ref_logps=None if frozen.ref is None else frozen.ref[rows],
                                   num_tokens=mb_tokens, **loss_kwargs)
            engine.backward(loss)
            step = dist.optimizer_step(engine)
            if step is not None:
                stats.grad_norms.append(step.grad_norm if step.grad_norm is not None else float("nan"))
                stats.lrs.append(step.lr)
            stats.micro_batches += 1
            entropy = (out.entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
            values = {**{k: float(v) for k, v in st._asdict().items()}, "entropy": float(entropy)}
            if gap is not None:
                values["logprob_gap"] = gap
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
    stats.means = {k: v / max(stats.micro_batches, 1) for k, v in sums.items()}
    return stats
