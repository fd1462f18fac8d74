"""Length rewards: the paper's binary "at most L tokens" reward and a graded variant, DAPO's soft overlong
punishment (``overlong``), and DLER's hard truncation (``truncate_rewards``, applied to the reward matrix)."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["length", "overlong", "truncate_rewards"]


def length(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    max_tokens: int = 4000,
    graded: bool = False,
    margin: Optional[int] = None,
    **_: Any,
) -> list[float]:
    """1.0 if the completion has at most `max_tokens` tokens, else 0.0.

    With ``graded=True`` a longer completion gets ``1 - (n - max_tokens) / margin`` (``margin`` defaults to
    `max_tokens`), floored at 0: a linear ramp instead of a cliff. Token counts come from
    `completion_lengths` (the trainer's tokenizer counts); without it, whitespace-separated words are counted.

    >>> length(["", "", ""], ["a", "b", "c"], completion_lengths=[3, 4, 5], max_tokens=4)
    [1.0, 1.0, 0.0]
    >>> length(["", ""], ["x", "y"], completion_lengths=[6, 12], max_tokens=4, graded=True)
    [0.5, 0.0]
    """
    if completion_lengths is None:
        completion_lengths = [len(str(c).split()) for c in completions]
    ramp = float(margin if margin is not None else max_tokens)
    out = []
    for n in completion_lengths:
        n = int(n)
        if n <= max_tokens:
            out.append(1.0)
        elif graded and ramp > 0:
            out.append(max(0.0, 1.0 - (n - max_tokens) / ramp))
        else:
            out.append(0.0)
    return out


def overlong(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    max_tokens: int = 4096,
    buffer: int = 512,
    **_: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), with L_max = `max_tokens`, c = `buffer`:

        0                        if L <= L_max - c
        (L_max - c - L) / c      if L_max - c < L <= L_max      (a linear ramp from 0 to -1)
        -1                       if L > L_max

    Add it to a correctness reward (DAPO sums them). Set `max_tokens` to ``rollout.max_new_tokens``: the engine
    never returns more tokens than that, so the -1 branch is reached exactly at the limit. Token counts come from
    `completion_lengths`; without it, whitespace-separated words are counted.

    >>> overlong(["", "", "", ""], ["a", "b", "c", "d"], completion_lengths=[6, 8, 9, 10], max_tokens=10, buffer=4)
    [0.0, -0.5, -0.75, -1.0]
    >>> overlong(["", ""], ["x", "y"], completion_lengths=[11, 3], max_tokens=10, buffer=4)
    [-1.0, 0.0]
    """
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong: buffer must be in (0, max_tokens = {max_tokens}], got {buffer!r}")
    if completion_lengths is None:
        completion_lengths = [len(str(c).split()) for c in completions]
    start = max_tokens - buffer
    out = []
    for n in completion_lengths:
        n = int(n)
        if n <= start:
            out.append(0.0)
        elif n <= max_tokens:
            out.append((start - n) / buffer)
        else:
            out.append(-1.0)
    return out


def truncate_rewards(
    rewards: torch.Tensor,  # [N, K] the bank's matrix, NaN = does not apply
    truncated: torch.Tensor,  # [N] bool: the rollout hit max_new_tokens without an EOS / stop
    value: float = 0.0,
) -> torch.Tensor:
    """DLER's hard truncation (arXiv 2510.15110): every reward of a truncated rollout becomes `value` (DLER: 0),
    however good its text; NaN ("does not apply") stays NaN. Returns a new [N, K] tensor.

    A matrix-level option rather than a reward kwarg so that it covers every reward of the bank, built-in or
    user-written, and needs the engine's truncation flag rather than a token count.

    >>> r = torch.tensor([[1.0, 0.5], [1.0, float("nan")], [0.0, 1.0]])
    >>> truncate_rewards(r, torch.tensor([False, True, True])).tolist()
    [[1.0, 0.5], [0.0, nan], [0.0, 0.0]]
    """
    if rewards.dim() != 2 or truncated.shape != (rewards.shape[0],):
        raise ValueError(f"rewards [N, K] and truncated [N] expected, got {tuple(rewards.shape)} and "
                         f"{tuple(truncated.shape)}")
    hit = truncated.to(torch.bool).to(rewards.device).unsqueeze(1) & ~torch.isnan(rewards)  # [N, K]
    return torch.where(hit, torch.full_like(rewards, value), rewards)
