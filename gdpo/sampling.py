"""Collecting one step's batch: prompts -> rollouts -> rewards, with dynamic sampling.

`collect_batch` returns a typed `StepBatch` on this rank: P_local prompts x G rollouts, their [N, K] rewards and
what the step's metrics need (timings, reward errors, dropped groups). Every prompt's G rollouts stay on this
rank, so group statistics need no communication; the only collective is the "is any rank still short?" vote of
dynamic sampling, which keeps every rank running the same number of generation rounds (generation may gather
ZeRO-3 shards collectively).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch

from gdpo.advantage import gfpo_select
from gdpo.data import PromptBatch, PromptDataset, PromptIterator, collate
from gdpo.rewards.lengths import truncate_rewards
from gdpo.rollout.types import RolloutBatch, RolloutEngine, timing_stats


@dataclass
class StepBatch:
    """One step's training data on this rank (rows = rollouts, each prompt's G rollouts contiguous)."""

    rollout: RolloutBatch  # [N, ...]
    rewards: torch.Tensor  # [N, K] float32, NaN = does not apply
    prompt_texts: list[str]  # [N]
    rounds: int = 1  # generation rounds this step
    dropped_groups: int = 0  # groups removed by dynamic sampling
    generate_s: float = 0.0
    reward_s: float = 0.0
    reward_seconds: dict[str, float] = field(default_factory=dict)  # per reward, summed over rounds
    reward_errors: dict[str, int] = field(default_factory=dict)  # per reward: rollouts that got the fallback
    reward_timeouts: dict[str, int] = field(default_factory=dict)
    reward_memory_kills: dict[str, int] = field(default_factory=dict)  # rollouts whose worker exceeded its cap
    rollout_stats: dict[str, float] = field(default_factory=dict)  # the engine's timings over all rounds

    @property
    def num_rows(self) -> int:
        return self.rollout.num_rows


class Scorer(Protocol):
    """What collect_batch needs of the reward bank."""

    names: list[str]

    def score(self, prompts, completions, completion_lengths=None, columns=None): ...


@dataclass
class RankPrompts:
    """This rank's share of each step's prompts: the global batch order is identical on every rank (same
    seed), and rank r takes the r-th slice of P_local prompts."""

    dataset: PromptDataset
    order: PromptIterator  # yields prompts_per_step indices per call
    rank: int
    per_rank: int

    def next(self) -> PromptBatch:
        idx = self.order.next_indices()[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return collate(self.dataset, idx)


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: groups in which every reward is constant over its applicable rollouts (no signal at all).

    A group whose *sum* of rewards is constant but whose rewards vary is kept: GDPO has signal there.
    """
    r = rewards.view(-1, group_size, rewards.shape[1])  # [P, G, K]
    valid = ~torch.isnan(r)
    big = torch.finfo(r.dtype).max
    spread = torch.where(valid, r, -big).amax(1) > torch.where(valid, r, big).amin(1)  # [P, K]
    return ~spread.any(1)


@dataclass
class _Round:
    rollout: RolloutBatch
    rewards: torch.Tensor  # [N, K]
    prompts: list[str]  # [N]

    def groups(self, idx: torch.Tensor) -> "_Round":
        g = self.rollout.group_size
        rows = (idx.view(-1, 1) * g + torch.arange(g)).flatten()  # [P' * G]
        return _Round(self.rollout.select_groups(idx), self.rewards[rows], [self.prompts[i] for i in rows.tolist()])


def _generate_and_score(engine: RolloutEngine, bank: Scorer, pb: PromptBatch, g: int, out: StepBatch,
                        truncated_value: float | None = None) -> _Round:
    t0 = time.perf_counter()
    rb = engine.generate(pb.prompt_ids, g)
    out.generate_s += time.perf_counter() - t0
    for k, v in rb.stats.items():
        out.rollout_stats[k] = out.rollout_stats.get(k, 0.0) + float(v)

    def expand(xs: list) -> list:
        return [x for x in xs for _ in range(g)]

    t0 = time.perf_counter()
    columns = {"answer": expand(pb.answers), **{k: expand(v) for k, v in pb.extras.items()}}
    prompts = expand(pb.prompt_texts)
    res = bank.score(prompts, rb.completion_texts, rb.completion_lengths.tolist(), columns)
    out.reward_s += time.perf_counter() - t0
    for name in bank.names:
        out.reward_seconds[name] = out.reward_seconds.get(name, 0.0) + res.seconds.get(name, 0.0)
        out.reward_errors[name] = out.reward_errors.get(name, 0) + res.errors.get(name, 0)
        out.reward_timeouts[name] = out.reward_timeouts.get(name, 0) + res.timeouts.get(name, 0)
        out.reward_memory_kills[name] = out.reward_memory_kills.get(name, 0) + res.memory.get(name, 0)
    matrix = res.matrix if truncated_value is None else truncate_rewards(res.matrix, rb.truncated, truncated_value)
    return _Round(rb, matrix, prompts)


def collect_batch(
    engine: RolloutEngine,
    bank: Scorer,
    next_prompts: Callable[[], PromptBatch],
    *,
    group_size: int,
    prompts_per_rank: int,
    pad_id: int,
    dynamic_sampling: bool = False,
    max_rounds: int = 1,
    any_rank: Callable[[bool], bool] = bool,
    truncated_value: float | None = None,
) -> StepBatch:
    """Generate and score P_local prompts x G rollouts on this rank.

    With dynamic sampling, groups in which every reward is constant are dropped and more prompts are generated
    until P_local groups with signal are kept or ``max_rounds`` rounds ran; then the batch is filled with
    dropped groups (their advantage is ~0) so every rank trains on the same number of rows. ``any_rank(short)``
    is True on every rank while any rank is still short (a collective; the identity in a world of one), so all
    ranks run the same number of rounds.
    """
    out = StepBatch(rollout=None, rewards=None, prompt_texts=[], rounds=0)  # type: ignore[arg-type]
    kept: list[_Round] = []
    spare: list[_Round] = []
    n_kept = 0
    while True:
        out.rounds += 1
        rnd = _generate_and_score(engine, bank, next_prompts(), group_size, out, truncated_value)
        if not dynamic_sampling:
            kept, n_kept = [rnd], rnd.rollout.num_prompts
            break
        const = constant_groups(rnd.rewards, group_size)  # [P]
        keep, drop = (~const).nonzero().flatten(), const.nonzero().flatten()
        take = keep[: prompts_per_rank - n_kept]
        if len(take):
            kept.append(rnd.groups(take))
            n_kept += len(take)
        if len(drop):
            spare.append(rnd.groups(drop))
            out.dropped_groups += len(drop)
        if not any_rank(n_kept < prompts_per_rank):
            break
        if out.rounds >= max_rounds:
            need = prompts_per_rank - n_kept
            if need:  # out of rounds: fill with signal-free groups (this rank dropped at least `need` of them)
                pool = _Round(
                    RolloutBatch.cat([s.rollout for s in spare], pad_id),
                    torch.cat([s.rewards for s in spare]),
                    [p for s in spare for p in s.prompts],
                )
                kept.append(pool.groups(torch.arange(need)))
            break
    out.rollout = RolloutBatch.cat([k.rollout for k in kept], pad_id)
    out.rewards = torch.cat([k.rewards for k in kept])  # [N, K]
    out.prompt_texts = [p for k in kept for p in k.prompts]
    if out.rollout_stats:
        # recompute the rate over all rounds (a sum of rates would be meaningless)
        secs = out.rollout_stats.get("rollout/seconds", 0.0)
        lengths = torch.tensor([out.rollout_stats.get("rollout/completion_tokens", 0.0)])
        out.rollout_stats.update(timing_stats(secs, lengths))
    return out


def gfpo_filter(sb: StepBatch, keep: int, metric: str, weights) -> StepBatch:
    """GFPO: keep ``keep`` rollouts of each prompt's group (``gfpo_select``); the batch's group size becomes keep."""
    idx = gfpo_select(sb.rewards, sb.rollout.completion_lengths, sb.rollout.group_size, keep, metric,
                      weights=weights)  # [P * keep]
    sb.rollout = replace(sb.rollout.rows(idx), group_size=keep)
    sb.rewards = sb.rewards[idx]
    sb.prompt_texts = [sb.prompt_texts[i] for i in idx.tolist()]
    return sb
