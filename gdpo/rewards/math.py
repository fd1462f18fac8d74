"""Math rewards: final-answer extraction and math-verify equivalence.

`math_correct` takes the last ``\\boxed{...}`` of the completion (braces may nest), else the configured
fallbacks in order, and asks math-verify whether it equals the reference (the `answer` column: a string,
or a list of accepted forms as in Minerva; an `answers` list column is used when present).

math-verify guards parsing and comparison with ``signal.alarm``, which only works in a main thread. In the
bank's worker processes the reward runs in the main thread, so that per-answer timeout is on; called from
another thread it is switched off and the caller's own timeout (the bank kills a hung worker) is the guard.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any, Optional, Sequence

__all__ = ["math_correct", "integer", "extract_answer", "last_boxed", "answers_match"]

# An extracted answer longer than this is not a final answer; parsing it would only waste time.
MAX_ANSWER_CHARS = 1000
DEFAULT_FALLBACKS = ("answer_tag", "answer_is")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*([^\n]{1,300})", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]{1,100})")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

# math-verify logs a warning per timeout / disabled timeout; those are per-answer noise here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``); None if there is none.

    >>> last_boxed(r"so \\boxed{1} then \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> last_boxed(r"\\boxed{x} and an unclosed \\boxed{2")  # the unclosed one is skipped
    'x'
    >>> last_boxed(r"\\boxed 5") is None
    True
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    # One pass pairs every "{" with its "}" (escaped \\{ \\} skipped): linear even for 50k unclosed boxes.
    close: dict[int, int] = {}
    stack: list[int] = []
    i, n = starts[0] - 1, len(text)  # braces before the first box cannot change how a box closes
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            close[stack.pop()] = i
        i += 1
    for start in reversed(starts):
        end = close.get(start - 1)
        if end is not None:
            return text[start:end]
    return None


def _strip_answer(s: str) -> str:
    s = s.strip().rstrip(".").strip().strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    return s.rstrip(".").strip()


def extract_answer(text: str, fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> Optional[str]:
    """The final answer of a completion, or None.

    Order: last ``\\boxed{}``, then each fallback in `fallbacks`: "answer_tag" (last
    ``<answer>…</answer>``), "answer_is" (after the last "The answer is" / "Final answer:"), "hashes"
    (GSM8K's ``#### 42``), "last_number".

    >>> extract_answer("<think>...</think><answer>$x = 3$</answer>")
    'x = 3'
    >>> extract_answer("So the final answer is $\\\\frac{3}{4}$.")
    '\\\\frac{3}{4}'
    >>> extract_answer("rambling 7 then 8", fallbacks=()) is None
    True
    """
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for fb in fallbacks:
        if fb == "answer_tag":
            found = _ANSWER_TAG.findall(text)
            if found:
                inner = found[-1]
                return (last_boxed(inner) or _strip_answer(inner)).strip()
        elif fb == "answer_is":
            found = _ANSWER_IS.findall(text)
            if found:
                return _strip_answer(found[-1])
        elif fb == "hashes":
            found = _HASHES.findall(text)
            if found:
                return _strip_answer(found[-1])
        elif fb == "last_number":
            found = _NUMBER.findall(text)
            if found:
                return found[-1]
        else:
            raise ValueError(f"unknown fallback {fb!r}; allowed: answer_tag, answer_is, hashes, last_number")
    return None


def _timeout_s(timeout_s: float) -> Optional[int]:
    # signal.alarm is whole seconds and main-thread only.
    if threading.current_thread() is not threading.main_thread() or not timeout_s:
        return None
    return max(1, int(round(timeout_s)))


@lru_cache(maxsize=8192)
def _parse(expr: str, timeout: Optional[int]) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Wrapping in \boxed makes math-verify read the whole string as one LaTeX answer.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse("\\boxed{" + expr + "}", extraction_config=config, parsing_timeout=timeout))


def answers_match(reference: str, predicted: str, timeout_s: float = 5.0) -> bool:
    """Whether math-verify judges `predicted` equal to `reference` (both bare answers, LaTeX or plain).

    >>> answers_match("\\\\frac{1}{2}", "0.5"), answers_match("3", "x=3"), answers_match("[1,2)", "(1,2)")
    (True, True, False)
    """
    from math_verify import verify

    if not predicted or len(predicted) > MAX_ANSWER_CHARS:
        return False
    t = _timeout_s(timeout_s)
    gold = _parse(str(reference), t)
    pred = _parse(predicted, t)
    if not gold or not pred:
        return False
    return bool(verify(list(gold), list(pred), timeout_seconds=t))


def _references(i: int, answer: Any, answers: Any) -> list[str]:
    ref = answers[i] if answers is not None and answers[i] else (answer[i] if answer is not None else None)
    if ref is None:
        return []
    if isinstance(ref, (list, tuple)):
        return [str(r) for r in ref if r is not None and str(r).strip()]
    return [str(ref)] if str(ref).strip() else []


def math_correct(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    answer: Optional[list[Any]] = None,
    answers: Optional[list[Any]] = None,
    fallbacks: Sequence[str] = DEFAULT_FALLBACKS,
    timeout_s: float = 5.0,
    **_: Any,
) -> list[Optional[float]]:
    """1.0 if the completion's final answer matches the reference (any of a list), else 0.0; None for
    a row without a reference.

    >>> math_correct(["", "", "", ""],
    ...              ["\\\\boxed{0.5}", "\\\\boxed{\\\\frac{1}{3}}", "no answer", "\\\\boxed{2}"],
    ...              answer=["\\\\frac12", "\\\\frac12", "\\\\frac12", None])
    [1.0, 0.0, 0.0, None]
    >>> math_correct([""], ["The answer is 4"], answer=[["2^2", "four"]])
    [1.0]
    """
    out: list[Optional[float]] = []
    for i, completion in enumerate(completions):
        refs = _references(i, answer, answers)
        if not refs:
            out.append(None)
            continue
        pred = extract_answer(str(completion), fallbacks)
        ok = pred is not None and any(answers_match(r, pred, timeout_s) for r in refs)
        out.append(1.0 if ok else 0.0)
    return out


def integer(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    fallbacks: Sequence[str] = ("answer_tag", "answer_is", "hashes"),
    **_: Any,
) -> list[float]:
    """1.0 if the completion's final answer is written as an integer (``-12``, ``1,000``), else 0.0.
    The GSM8K recipe's shaping reward: it rewards the answer's form, not its value.

    >>> integer(["", "", "", ""], ["<answer>42</answer>", "\\\\boxed{-1,000}", "#### 3.5", "no answer"])
    [1.0, 1.0, 0.0, 0.0]
    """
    out: list[float] = []
    for completion in completions:
        pred = extract_answer(str(completion), fallbacks)
        if pred is None:
            out.append(0.0)
            continue
        s = pred.replace("\\!", "").replace("\\,", "").replace(" ", "")
        s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip("$")
        out.append(1.0 if re.fullmatch(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)", s) else 0.0)
    return out


def _warmup() -> None:
    # The first parse builds math-verify's LaTeX parser (~0.3 s); the bank calls this before forking workers.
    answers_match("\\frac{1}{2}", "0.5")


math_correct.warmup = _warmup  # type: ignore[attr-defined]
