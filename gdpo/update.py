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
    truncated: torch.Tensor | None = None  # [N] bool: rows the loss drops (loss.mask_truncated); None = none

    @staticmethod
    def from_rollout(batch: RolloutBatch, device: torch.device, mask_truncated: bool = False) -> "TrainTensors":
        logps = batch.sampling_logprobs
        return TrainTensors(
            input_ids=batch.input_ids().to(device),
            attention_mask=batch.attention_mask().to(device),
            completion_mask=batch.completion_mask.to(device).float(),
            prompt_len=batch.prompt_len,
            sampling_logprobs=None if logps is None else logps.to(device),
            truncated=batch.truncated.to(device) if mask_truncated else None,
        )

    def loss_mask(self) -> torch.Tensor:
        """[N, T] the tokens the loss counts: the completion mask without the dropped (truncated) rows."""
        if self.truncated is None:
            return self.completion_mask
        return self.completion_mask * (~self.truncated).float().unsqueeze(1)


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
    plan: BatchPlan,
    temperature: float,
    chunk_size: int,
    top_p: float = 1.0,
    top_k: int = 0,
) -> FrozenLogprobs:
    """No-grad log-probs of the completions under the policy (only when ``need_old``) and the reference, in the
    plan's micro-batches (fixed or token-budget ones)."""
    micros = _micro_batches(x, torch.arange(x.input_ids.shape[0], device=x.input_ids.device), plan)

    def run(model: torch.nn.Module) -> torch.Tensor:
        return token_logprobs_batched(model, x.input_ids, x.attention_mask, x.prompt_len, micro_batches=micros,
                                      temperature=temperature, chunk_size=chunk_size, top_p=top_p,
                                      top_k=top_k, packed=plan.packed).logprobs

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
    tokens_real: int = 0  # prompt + completion tokens of the rows trained on, summed over micro-batches
    tokens_computed: int = 0  # the positions the forwards ran: tokens_real packed, rows x width padded

    @property
    def pad_frac(self) -> float:
        """Share of the update's forward positions that were padding (0 when packed)."""
        return 1.0 - self.tokens_real / self.tokens_computed if self.tokens_computed else float("nan")

    @property
    def grad_norm(self) -> float:
        finite = [g for g in self.grad_norms if not math.isnan(g)]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def lr(self) -> float:
        return self.lrs[-1] if self.lrs else float("nan")


def budget_micro_batches(lengths: torch.Tensor, budget: int, count: int | None = None,
                         packed: bool = False) -> list[torch.Tensor]:
    """Rows [n] packed into micro-batches of at most ``budget`` padded tokens (rows x the longest row in it), or
    with ``packed`` (the padding-free path) of at most ``budget`` real tokens (the sum of its rows' lengths).

    Rows are sorted longest first, so each micro-batch holds rows of similar length and is trimmed to its first
    row; a row longer than the budget gets a micro-batch of its own. ``count``: split the costliest micro-batches
    until there are exactly that many (every rank must run the same number of forwards under ZeRO-3).
    Returns row indices per micro-batch.

    >>> [c.tolist() for c in budget_micro_batches(torch.tensor([2, 9, 3, 8, 1]), 18)]
    [[1, 3], [2, 0, 4]]
    >>> [c.tolist() for c in budget_micro_batches(torch.tensor([2, 9, 3, 8, 1]), 18, count=3)]
    [[1], [3], [2, 0, 4]]
    >>> [c.tolist() for c in budget_micro_batches(torch.tensor([2, 9, 3, 8, 1]), 20)]
    [[1, 3], [2, 0, 4]]
    >>> [c.tolist() for c in budget_micro_batches(torch.tensor([2, 9, 3, 8, 1]), 20, packed=True)]
    [[1, 3, 2], [0, 4]]
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    L = [int(v) for v in lengths]

    def cost(rows: list[int]) -> int:
        return sum(L[r] for r in rows) if packed else len(rows) * L[rows[0]]

    chunks: list[list[int]] = [[]]
    for i in order:
        cur = chunks[-1]
        if cur and cost(cur + [i]) > budget:
            chunks.append(cur := [])
        cur.append(i)
    if count is not None:
        if count > len(order):
            raise ValueError(f"cannot split {len(order)} rows into {count} micro-batches")
        while len(chunks) < count:
            # split the costliest micro-batch that has two rows or more
            j = max((k for k in range(len(chunks)) if len(chunks[k]) > 1),
                    key=lambda k: cost(chunks[k]))
            c = chunks.pop(j)
            chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 :]]
    return [torch.tensor(c, dtype=torch.long) for c in chunks]


def _micro_batches(x: TrainTensors, rows: torch.Tensor, plan: BatchPlan) -> list[torch.Tensor]:
    """The micro-batches of ``rows`` [m]: fixed slices of plan.micro_batch_rows, or token-budget ones whose number
    is the largest any rank needs (agreed by an all-reduce). Packed (plan.packed), a row costs its real tokens;
    padded, the prompt width plus its completion."""
    if not plan.token_budget:
        return [rows[s : s + plan.micro_batch_rows] for s in range(0, len(rows), plan.micro_batch_rows)]
    if plan.packed:
        lengths = x.attention_mask[rows].sum(1).long().cpu()  # [m] real prompt + completion tokens
    else:
        lengths = (x.prompt_len + x.completion_mask[rows].sum(1)).long().cpu()  # [m] tokens per row, prompt width
    count = len(budget_micro_batches(lengths, plan.token_budget, packed=plan.packed))
    count = int(dist.all_reduce(torch.tensor([float(count)]), "max").item())
    return [rows[c.to(rows.device)] for c in budget_micro_batches(lengths, plan.token_budget, count, plan.packed)]


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


def _micro_step(engine, x: TrainTensors, rows: torch.Tensor, advantages: torch.Tensor, frozen: FrozenLogprobs, *,
                num_tokens: float, scale: float | None, report: float, loss_kwargs: dict[str, Any],
                temperature: float, chunk_size: int, is_correction: bool, is_cap: float, top_p: float = 1.0,
                top_k: int = 0, packed: bool = False):
    """Forward, loss, backward and (at the boundary) optimizer step of one micro-batch, trimmed to its longest row.

    scale: multiply the loss before a backward without the engine's grad_accum division (None: the engine's
    managed accumulation). report: factor that makes the logged loss the minibatch's (see update_policy).
    Returns (the micro-batch's stats, the optimizer step's stats or None, (real tokens, computed positions)).
    """
    t = max(int(x.completion_mask[rows].sum(1).max()), 1)  # trailing padding costs compute, changes nothing
    cols = slice(0, x.prompt_len + t)
    mask = x.completion_mask[rows, :t]
    out = dist.engine_forward(engine, token_logprobs, x.input_ids[rows, cols], x.attention_mask[rows, cols],
                              x.prompt_len, return_entropy=True, temperature=temperature, chunk_size=chunk_size,
                              top_p=top_p, top_k=top_k, packed=packed)
    old = out.logprobs.detach() if frozen.old is None else frozen.old[rows, :t]
    samp = None if x.sampling_logprobs is None else x.sampling_logprobs[rows, :t]
    is_w, gap = _is_weights(old, samp, mask, correct=is_correction, cap=is_cap)
    loss, st = policy_loss(out.logprobs, old, advantages[rows], mask, is_weights=is_w,
                           ref_logps=None if frozen.ref is None else frozen.ref[rows, :t],
                           num_tokens=num_tokens, truncated=None if x.truncated is None else x.truncated[rows],
                           **loss_kwargs)
    if scale is None:
        engine.backward(loss)
    else:
        engine.backward(loss * scale, scale_wrt_gas=False)
    step = dist.optimizer_step(engine)
    entropy = (out.entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    values = {k: float(v) for k, v in st._asdict().items()}
    for k in ("loss", "policy_loss", "kl"):  # aggregated quantities: this micro-batch's share of the minibatch's
        values[k] *= (scale if scale is not None else 1.0) * report
    values["entropy"] = float(entropy)
    if gap is not None:
        values["logprob_gap"] = gap
    real = int(x.attention_mask[rows, cols].sum())
    return values, step, (real, real if packed else len(rows) * (x.prompt_len + t))


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
    top_p: float = 1.0,
    top_k: int = 0,
) -> UpdateStats:
    """Train ``engine`` on this rank's rows: ``plan.epochs`` passes of ``plan.minibatches_per_epoch`` optimizer
    steps, each over ``plan.grad_accum`` micro-batches of ``plan.micro_batch_rows`` rows, or over token-budget
    micro-batches (``plan.token_budget``), whose number is agreed across ranks per minibatch.

    loss_kwargs: `policy_loss` keyword arguments fixed for the run (eps_low, eps_high, aggregation, beta,
    max_len). Every rank must call this with the same plan: the token count is all-reduced per minibatch.
    """
    stats = UpdateStats()
    sums: dict[str, float] = {}
    world, budget = dist.world_size(), bool(plan.token_budget)
    seq_agg = loss_kwargs.get("aggregation", "token_mean") != "token_mean"
    engine.module.train()
    for mb in _minibatches(len(advantages), plan, plan.epochs):
        mb = mb.to(advantages.device)
        tokens = dist.all_reduce_sum(x.loss_mask()[mb].sum().double().view(1)).item() / world
        micros = _micro_batches(x, mb, plan)
        for i, rows in enumerate(micros):
            if budget:
                # token-budget micro-batches vary in number: the boundary is set here, and each loss is scaled to
                # its share of the minibatch's (the engine's own division by grad_accum is off)
                engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
                share = len(rows) / len(mb) if seq_agg else 1.0
                scaling = dict(num_tokens=tokens, scale=share, report=len(micros))
            else:  # fixed micro-batches: DeepSpeed divides each loss by grad_accum and finds the boundary itself
                scaling = dict(num_tokens=tokens / plan.grad_accum, scale=None, report=1)
            values, step, counted = _micro_step(engine, x, rows, advantages, frozen, **scaling,
                                                loss_kwargs=loss_kwargs, temperature=temperature,
                                                chunk_size=chunk_size, is_correction=is_correction, is_cap=is_cap,
                                                top_p=top_p, top_k=top_k, packed=plan.packed)
            stats.tokens_real += counted[0]
            stats.tokens_computed += counted[1]
            if step is not None:
                stats.grad_norms.append(step.grad_norm if step.grad_norm is not None else float("nan"))
                stats.lrs.append(step.lr)
            stats.micro_batches += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
    stats.means = {k: v / max(stats.micro_batches, 1) for k, v in sums.items()}
    return stats
