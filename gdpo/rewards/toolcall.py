"""ToolRL's tool-call correctness reward, in [-3, 3].

For a ground truth with a ``<tool_call>`` block (one JSON object per line,
``{"name": ..., "parameters": {...}}``):

* -3 if the completion has no ``<tool_call>...</tool_call>`` block, or a line of it is not such an object;
* +3 if the predicted calls equal the ground-truth calls exactly (same order);
* otherwise ``6 * score / S_max - 3`` where ``score`` = Jaccard of the tool-name multisets + for each
  ground-truth call, the best still-unused predicted call with the same name scores (Jaccard of the
  parameter-key multisets + number of ground-truth parameters with an exactly equal value), and
  ``S_max = 1 + sum over ground-truth calls of (1 + number of parameters)``.

A ground truth without a tool call scores 0. The Jaccard of two equal lists is 1 (also when both are empty)
and of one empty and one non-empty list 0, as in ToolRL.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Optional

__all__ = ["toolcall_correct", "parse_tool_calls", "toolcall_score"]


def parse_tool_calls(text: str) -> Optional[list[dict]]:
    """The calls of the first ``<tool_call>`` block; None if it is missing or malformed.

    >>> parse_tool_calls('<tool_call>\\n{"name": "f", "parameters": {"x": 1}}\\n</tool_call>')
    [{'name': 'f', 'parameters': {'x': 1}}]
    >>> parse_tool_calls("<tool_call>\\nnot json\\n</tool_call>") is None
    True
    """
    start = text.find("<tool_call>")
    if start < 0:
        return None
    end = text.find("</tool_call>", start)
    if end < 0:
        return None
    calls = []
    for line in text[start + len("<tool_call>") : end].strip().split("\n"):
        try:
            call = json.loads(line)
        except (ValueError, RecursionError):  # deeply nested junk overflows the decoder's recursion
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        params = call.get("parameters", {})
        if not isinstance(params, dict):
            return None
        calls.append(call)
    return calls


def _jaccard(a: list, b: list) -> float:
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    ca, cb = Counter(map(_hashable, a)), Counter(map(_hashable, b))
    inter = sum((ca & cb).values())
    return inter / (len(a) + len(b) - inter)


def _hashable(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool, type(None))) else json.dumps(x, sort_keys=True)


def toolcall_score(gt_calls: list[dict], pred_calls: list[dict]) -> float:
    """The reward in [-3, 3] for parsed calls.

    >>> gt = [{"name": "f", "parameters": {"a": 1, "b": 2}}]
    >>> toolcall_score(gt, gt)
    3.0
    >>> toolcall_score(gt, [{"name": "f", "parameters": {"a": 1, "b": 5}}])  # 1 + (1 + 1) of S_max 4
    1.5
    """
    if gt_calls == pred_calls:
        return 3.0
    score = _jaccard([c["name"] for c in gt_calls], [c["name"] for c in pred_calls])
    s_max = 1.0
    used: set[int] = set()
    for gt in gt_calls:
        gt_params = gt.get("parameters", {}) or {}
        s_max += 1.0 + len(gt_params)
        best, best_i = 0.0, -1
        for i, pd in enumerate(pred_calls):
            if i in used or pd["name"] != gt["name"]:
                continue
            pd_params = pd.get("parameters", {}) or {}
            s = _jaccard(list(gt_params), list(pd_params))
            s += sum(1.0 for k, v in gt_params.items() if k in pd_params and pd_params[k] == v)
            if s > best:
                best, best_i = s, i
        if best_i >= 0:
            used.add(best_i)
            score += best
    return 6.0 * score / s_max - 3.0


def toolcall_correct(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    ground_truth: Optional[list[Any]] = None,
    **_: Any,
) -> list[Optional[float]]:
    """ToolRL correctness of each completion against its row's `ground_truth`; None where the row has no
    ground truth or its tool-call block cannot be parsed. Wrong value, right name and key: 6 * 2/3 - 3 = 1.

    >>> gt = '<think>.</think>\\n<tool_call>\\n{"name": "f", "parameters": {"a": 1}}\\n</tool_call>'
    >>> toolcall_correct(["", "", "", ""], [gt, gt.replace("1", "2"), "<think>no call</think>", gt],
    ...                  ground_truth=[gt, gt, gt, "<think>.</think>\\n<response>hi</response>"])
    [3.0, 1.0, -3.0, 0.0]
    """
    if ground_truth is None:
        return [None] * len(completions)
    out: list[Optional[float]] = []
    for completion, gt in zip(completions, ground_truth):
        if gt is None:
            out.append(None)
            continue
        gt = str(gt)
        if "<tool_call>" not in gt:
            out.append(0.0)
            continue
        gt_calls = parse_tool_calls(gt)
        if gt_calls is None:
            out.append(None)
            continue
        pred_calls = parse_tool_calls(str(completion))
        out.append(-3.0 if pred_calls is None else toolcall_score(gt_calls, pred_calls))
    return out
