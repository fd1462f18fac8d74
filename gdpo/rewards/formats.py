"""Format rewards: does the completion follow a tag template?

Templates:
  * ``think_answer``: ``^<think>.*?</think>\\n<answer>.*?</answer>$`` with each of the four tags exactly once.
  * ``toolrl``: ToolRL's rule, whose shape depends on the row's `ground_truth`: ``<think>`` block, then a
    ``<tool_call>\\n...\\n</tool_call>`` block if the ground truth has a tool call, then a
    ``<response>...</response>`` block if it has a response (blocks separated by one newline; only the
    think block if it has neither). Every tag that the shape uses appears exactly once.
  * a custom `pattern` (``re.search`` with DOTALL: anchor it with ``^...$``), optionally with `once` tags
    that must occur exactly once.

As in the reference implementations, ``$`` accepts one trailing newline.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

__all__ = ["format_reward", "toolrl_pattern"]

_THINK_ANSWER = (
    r"^<think>.*?</think>\n<answer>.*?</answer>$",
    ("<think>", "</think>", "<answer>", "</answer>"),
)


def toolrl_pattern(ground_truth: str) -> tuple[str, tuple[str, ...]]:
    """(regex, tags that must occur exactly once) for a ToolRL ground truth.

    >>> toolrl_pattern("<think>..</think>\\n<response>hi</response>")[0]
    '^<think>.*?</think>\\\\n<response>.*?</response>$'
    """
    has_call, has_resp = "<tool_call>" in ground_truth, "<response>" in ground_truth
    pattern = r"^<think>.*?</think>"
    tags = ["<think>", "</think>"]
    if has_call:
        pattern += r"\n<tool_call>\n.*?\n</tool_call>"
        tags += ["<tool_call>", "</tool_call>"]
    if has_resp:
        pattern += r"\n<response>.*?</response>"
        tags += ["<response>", "</response>"]
    return pattern + "$", tuple(tags)


def _matches(text: str, pattern: str, once: Sequence[str]) -> bool:
    # The counts are checked first: cheap, and they keep the lazy regex from scanning huge junk.
    if any(text.count(t) != 1 for t in once):
        return False
    return re.search(pattern, text, re.DOTALL) is not None


def format_reward(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    template: str = "think_answer",
    pattern: Optional[str] = None,
    once: Sequence[str] = (),
    ground_truth: Optional[list[Any]] = None,
    **_: Any,
) -> list[Optional[float]]:
    """1.0 if the completion has the template's format, else 0.0 (None for a ``toolrl`` row without a
    ground truth).

    >>> format_reward(["", "", ""], ["<think>a</think>\\n<answer>b</answer>",
    ...                            "<think>a</think><answer>b</answer>",
    ...                            "<think>a</think>\\n<answer>b</answer><answer>c</answer>"])
    [1.0, 0.0, 0.0]
    >>> gt = "<think>x</think>\\n<tool_call>\\n{}\\n</tool_call>"
    >>> format_reward(["", ""], ["<think>y</think>\\n<tool_call>\\n{\\"name\\": \\"f\\"}\\n</tool_call>",
    ...                          "<think>y</think>\\n<response>hi</response>"],
    ...               template="toolrl", ground_truth=[gt, gt])
    [1.0, 0.0]
    """
    if pattern is not None:
        template = "custom"
    elif template not in ("think_answer", "toolrl"):
        raise ValueError(
            f"unknown format template {template!r}; allowed: think_answer, toolrl (or pass pattern=)"
        )
    out: list[Optional[float]] = []
    for i, completion in enumerate(completions):
        text = str(completion)
        if template == "custom":
            ok = _matches(text, pattern, once)  # type: ignore[arg-type]
        elif template == "think_answer":
            ok = _matches(text, *_THINK_ANSWER)
        else:
            gt = ground_truth[i] if ground_truth is not None else None
            if gt is None:
                out.append(None)
                continue
            ok = _matches(text, *toolrl_pattern(str(gt)))
        out.append(1.0 if ok else 0.0)
    return out
