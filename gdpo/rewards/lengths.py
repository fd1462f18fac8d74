"""Length reward: the paper's binary "at most L tokens" reward, and a graded variant."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["length"]


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
