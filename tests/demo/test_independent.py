"""The second embedded task: an easy and a hard question per prompt, three independent rewards."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

from gdpo.demo import independent as ind
from gdpo.demo import task
from gdpo.demo.tokenizer import build_tokenizer
from gdpo.rewards import format_reward

# Reference arithmetic, written independently of the generator (as in test_demo_task.py).
OPS = {
    "add": lambda a, b, c: a + b,
    "sub": lambda a, b, c: a - b,
    "mul": lambda a, b, c: a * b,
    "add_sub": lambda a, b, c: a + b - c,
    "mul_add": lambda a, b, c: a * b + c,
    "mul_sub": lambda a, b, c: a * b - c,
}


def _recompute(problem: str, templates) -> int:
    for text, op in templates:
        pattern = re.escape(text)
        for name in "nmi":
            pattern = pattern.replace(re.escape("{" + name + "}"), r"[A-Za-z]+")
        for name in "abc":
            pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)", 1)
            pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P={name})")
        m = re.fullmatch(pattern, problem)
        if m:
            nums = {k: int(v) for k, v in m.groupdict().items()}
            return OPS[op](nums["a"], nums["b"], nums.get("c", 0))
    raise AssertionError(f"no template matches {problem!r}")


def _split(problem: str) -> tuple[str, str]:
    """Easy templates hold one question mark, at the end: the easy question is everything up to it."""
    easy, hard = problem.split("? ", 1)
    return easy + "?", hard


def test_problems_are_deterministic_and_answer_both_questions() -> None:
    rows = ind.make_problems(200, seed=5)
    assert rows == ind.make_problems(200, seed=5) and rows != ind.make_problems(200, seed=6)
    assert len({r["id"] for r in rows}) == 200
    for r in rows:
        easy, hard = _split(r["problem"])
        assert r["answer"] == f"{_recompute(easy, task.EASY_TEMPLATES)}, {_recompute(hard, task.HARD_TEMPLATES)}"


def test_shipped_files_are_current_and_small(tmp_path: Path) -> None:
    written = ind.write_shipped_files(tmp_path)
    assert [p.name for p in written] == [ind.TRAIN_FILE.name, ind.SFT_FILE.name]
    for path in written:
        assert path.read_bytes() == (ind.DATA_DIR / path.name).read_bytes(), path.name
    assert sum((ind.DATA_DIR / p.name).stat().st_size for p in written) < 1_000_000
    train, sft = task.read_jsonl(ind.TRAIN_FILE), task.read_jsonl(ind.SFT_FILE)
    assert len(train) == ind.N_TRAIN and len(sft) == ind.N_SFT
    assert not {r["problem"] for r in train} & {r["problem"] for r in sft}  # RL prompts are not SFT prompts


def test_sft_mix_flaws_are_what_the_rewards_see() -> None:
    rows = task.read_jsonl(ind.SFT_FILE)
    completions = [str(r["completion"]) for r in rows]
    answers = [str(r["answer"]) for r in rows]
    prompts = [""] * len(rows)
    easy = ind.answer_part(prompts, completions, answer=answers, part=0)
    hard = ind.answer_part(prompts, completions, answer=answers, part=1)
    fmt = format_reward(prompts, completions, template="think_answer")
    for r, e, h, f in zip(rows, easy, hard, fmt):
        flaws = set(r["flaws"])
        assert e == float("wrong_easy" not in flaws) and h == float("wrong_hard" not in flaws), r
        assert f == float("format" not in flaws), r
        # one easy step, then two hard steps, or only the first where the completion stops short
        steps = re.findall(r"= (\d+)", str(r["completion"]).split("<answer>")[0])
        assert len(steps) == (2 if "wrong_hard" in flaws else 3), r
        assert str(r["completion"]).split("<answer>")[1].startswith(f"{steps[0]}, {steps[-1]}</answer>"), r
    n = len(rows)
    # independent draws at the configured rates (3 binomial standard errors of 2000 rows is <= 0.034)
    assert sum(easy) / n == pytest.approx(1 - ind.P_WRONG_EASY, abs=0.035)
    assert sum(hard) / n == pytest.approx(1 - ind.P_WRONG_HARD, abs=0.035)
    assert sum(fmt) / n == pytest.approx(1 - ind.P_BAD_FORMAT, abs=0.035)


def test_the_demo_tokenizer_covers_the_text() -> None:
    # Same templates and words as the demo task: every word is one token, so prompts stay short.
    tok = build_tokenizer()
    row = task.read_jsonl(ind.SFT_FILE)[0]
    for word in set(re.findall(r"[A-Za-z]+", str(row["problem"]))):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok(str(row["problem"]), add_special_tokens=False)["input_ids"]) < 60


def test_answer_part() -> None:
    c = ["<think>1 + 2 = 3</think>\n<answer>3, 14</answer>", "<answer> 3 ,14 </answer> <answer>9, 9</answer>",
         "<answer>14, 3</answer>", "<answer>3</answer>", "3, 14"]
    ans = ["3, 14"] * len(c)
    assert ind.answer_part([""] * 5, c, answer=ans, part=0) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert ind.answer_part([""] * 5, c, answer=ans, part=1) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert ind.answer_part([""], ["<answer>3, 14</answer>"], answer=["3, 14"], part=2) == [0.0]
    with pytest.raises(ValueError, match="part must be >= 0"):
        ind.answer_part([""], ["x"], answer=["1, 2"], part=-1)


def test_doctests() -> None:
    result = doctest.testmod(ind)
    assert result.attempted > 0 and result.failed == 0
