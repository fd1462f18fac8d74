"""The batch plan: how one step's rollouts split into ranks, minibatches, micro-batches and optimizer steps.

Every divisibility rule of the training step lives in `plan_batches`, checked once at start; the loop, the dry
run and the tests read the numbers from the `BatchPlan` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdpo.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    group_size: int  # G
    prompts_per_rank: int  # P_local: prompts each rank generates per step (every group stays on one rank)
    rows_per_rank: int  # N_local = P_local * G
    minibatch_rows: int  # rows per rank per optimizer step
    micro_batch_rows: int  # rows per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    minibatches_per_epoch: int
    epochs: int
    updates_per_step: int  # optimizer steps per training step
    token_budget: int = 0  # max tokens per micro-batch (0 = fixed micro-batches of micro_batch_rows)
    packed: bool = False  # padding-free micro-batches (loss.packing, where the attention supports it)

    @property
    def rows_per_step(self) -> int:
        return self.rows_per_rank * self.world_size

    @property
    def reuse_current_logprobs(self) -> bool:
        """One optimizer step per training step: the "old" log-probs equal the current ones (ratio 1), so they
        are the current forward detached instead of a separate pass."""
        return self.updates_per_step == 1

    def as_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "group_size": self.group_size,
            "prompts_per_rank": self.prompts_per_rank,
            "rows_per_rank": self.rows_per_rank,
            "rows_per_step": self.rows_per_step,
            "minibatch_rows_per_rank": self.minibatch_rows,
            "micro_batch_rows": self.micro_batch_rows,
            "grad_accum": self.grad_accum,
            "updates_per_step": self.updates_per_step,
            "max_tokens_per_micro_batch": self.token_budget,
        }


def plan_batches(
    *,
    prompts_per_step: int,
    group_size: int,
    world_size: int,
    minibatch_size: int = 0,
    micro_batch_size: int = 0,
    epochs: int = 1,
    max_tokens_per_micro_batch: int = 0,
) -> BatchPlan:
    """Split a step of ``prompts_per_step x group_size`` rollouts over ``world_size`` ranks.

    minibatch_size: rollouts per optimizer step summed over all ranks (0 = the whole step);
    micro_batch_size: rollouts per forward/backward on one rank (0 = the rank's minibatch).
    max_tokens_per_micro_batch: token-budget micro-batches instead (0 = off); their number varies per minibatch, so
    ``micro_batch_rows`` / ``grad_accum`` are then nominal (one micro-batch of the whole minibatch).

    >>> p = plan_batches(prompts_per_step=8, group_size=4, world_size=2, minibatch_size=16, micro_batch_size=4)
    >>> p.rows_per_rank, p.minibatch_rows, p.grad_accum, p.updates_per_step
    (16, 8, 2, 2)
    >>> plan_batches(prompts_per_step=8, group_size=4, world_size=4, minibatch_size=6)
    Traceback (most recent call last):
    ...
    gdpo.config.ConfigError: loss.minibatch_size: 6 rollouts do not split evenly over 4 processes (...)
    """
    if world_size < 1 or group_size < 1 or prompts_per_step < 1 or epochs < 1:
        raise ConfigError("world size, group size, prompts per step and epochs must all be >= 1")
    if prompts_per_step % world_size:
        ok = [n for n in range(world_size, 4 * world_size + 1, world_size)]
        raise ConfigError(
            f"rollout.prompts_per_step: {prompts_per_step} prompts do not split evenly over {world_size} processes "
            f"(each prompt's {group_size} rollouts stay on one rank); use a multiple of {world_size}, e.g. {ok}"
        )
    prompts_local = prompts_per_step // world_size
    rows_local = prompts_local * group_size
    rows_step = rows_local * world_size
    if minibatch_size:
        if minibatch_size % world_size:
            raise ConfigError(
                f"loss.minibatch_size: {minibatch_size} rollouts do not split evenly over {world_size} processes "
                f"(use a multiple of {world_size} that divides the {rows_step} rollouts per step)"
            )
        minibatch = minibatch_size // world_size
        if minibatch > rows_local or rows_local % minibatch:
            raise ConfigError(
                f"loss.minibatch_size: {minibatch_size} does not divide the {rows_step} rollouts per step "
                f"({rows_local} on each of {world_size} processes)"
            )
    else:
        minibatch = rows_local
    if max_tokens_per_micro_batch and micro_batch_size:
        raise ConfigError(
            f"loss.micro_batch_size: {micro_batch_size} and loss.max_tokens_per_micro_batch: "
            f"{max_tokens_per_micro_batch} are exclusive (rows per micro-batch or a token budget); set one to 0"
        )
    micro = micro_batch_size or minibatch
    if micro > minibatch or minibatch % micro:
        raise ConfigError(
            f"loss.micro_batch_size: {micro} does not divide the per-process minibatch of {minibatch} rollouts"
        )
    per_epoch = rows_local // minibatch
    return BatchPlan(
        world_size=world_size,
        group_size=group_size,
        prompts_per_rank=prompts_local,
        rows_per_rank=rows_local,
        minibatch_rows=minibatch,
        micro_batch_rows=micro,
        grad_accum=minibatch // micro,
        minibatches_per_epoch=per_epoch,
        epochs=epochs,
        updates_per_step=epochs * per_epoch,
        token_budget=max_tokens_per_micro_batch,
    )
