"""API-Bank accuracy the way ToolRL reports it (its ``benchmarks/API-Bank`` evaluation; rules re-stated, pure).

ToolRL's processed API-Bank files (levels 1-3) give each row one expected call ``answer`` (a call, or a list whose
first element is the call): ``{"name": ..., "parameters": {...}}``. A response is scored so:

1. Calls are read from the text after the last ``<tool_call>`` up to the next ``</tool_call>`` (the whole text when
   there is no ``<tool_call>``): each non-empty line that parses as JSON is one item; other lines are dropped.
2. The response is correct when some item, in order, has the expected name and exactly equal parameters (Python
   ``==`` on the parsed JSON). An item that is a JSON string is parsed once more; a dict without both ``name``
   and ``parameters`` is taken as the parameters of a call to the expected function. As in ToolRL, the scan stops
   at an item it cannot use (a string that is not JSON, a number, ``null``, a boolean), so later items no longer
   count.

Accuracy per level is the share of correct rows; ToolRL's overall accuracy pools all rows of the three levels.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["read_calls", "expected_call", "apibank_correct"]


def read_calls(text: str) -> list[Any]:
    """The JSON items of the last ``<tool_call>`` block (see the module docstring).

    >>> read_calls('<think>x</think>\\n<tool_call>\\n{"name": "f", "parameters": {}}\\nnot json\\n</tool_call>')
    [{'name': 'f', 'parameters': {}}]
    >>> read_calls('{"name": "f", "parameters": {"a": 1}}')   # no tag: every line of the text is tried
    [{'name': 'f', 'parameters': {'a': 1}}]
    """
    body = text.split("<tool_call>")[-1].split("</tool_call>")[0].strip()
    items = []
    for line in body.split("\n"):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return items


def expected_call(answer: Any) -> Mapping[str, Any]:
    """The row's expected call: `answer`, or its first element when it is a list."""
    call = answer[0] if isinstance(answer, list) else answer
    if not isinstance(call, dict) or "name" not in call or "parameters" not in call:
        raise ValueError(f"API-Bank answer is not a call: {answer!r}")
    return call


def apibank_correct(text: str, answer: Any) -> bool:
    """Whether a response makes the expected call.

    >>> ans = [{"name": "f", "parameters": {"a": "1"}}]
    >>> apibank_correct('<tool_call>\\n{"name": "g", "parameters": {}}\\n{"name": "f", "parameters": {"a": "1"}}\\n'
    ...                 '</tool_call>', ans)
    True
    >>> apibank_correct('<tool_call>\\n{"name": "f", "parameters": {"a": 1}}\\n</tool_call>', ans)   # "1" != 1
    False
    """
    want = expected_call(answer)
    for item in read_calls(text):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except (ValueError, RecursionError):
                return False
        if isinstance(item, list):
            continue  # neither a call nor parameters equal to a dict
        if not isinstance(item, dict):
            return False  # ToolRL's scan raises on a number / null / boolean and stops
        if "name" in item and "parameters" in item:
            name, params = item["name"], item["parameters"]
        else:
            name, params = want["name"], item
        if name == want["name"] and params == want["parameters"]:
            return True
    return False
