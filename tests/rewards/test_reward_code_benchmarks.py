"""Code rewards on real benchmark tests: MBPP asserts (test_list + test_setup_code) and HumanEval check(candidate)
run in the sandbox; the reference solutions pass, wrong ones fail. A sample of each set (the full sets are
checked by `python -m gdpo.eval --oracle solution --benchmarks mbpp,humaneval`)."""

import json
import os
from pathlib import Path

import pytest

from gdpo.rewards.code import code_bug, code_pass

SHARED = Path(os.environ.get("GDPO_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
MBPP = SHARED / "code" / "mbpp.jsonl"


def _mbpp(ids):
    if not MBPP.exists():
        pytest.skip("shared data not present")
    rows = {r["task_id"]: r for r in map(json.loads, MBPP.open())}
    return [rows[i] for i in ids]


def _cols(rows):
    return {"test_list": [r["test_list"] for r in rows], "test_setup_code": [r["test_setup_code"] for r in rows]}


def test_mbpp_reference_solutions_pass_and_wrong_ones_fail():
    # 601, 602, 603: train split; 367: has test_setup_code; 341: its reference fails its own tests (README)
    rows = _mbpp([601, 602, 603, 367, 341])
    refs = ["```python\n" + r["code"] + "\n```" for r in rows]
    assert code_pass([""] * 5, refs, **_cols(rows)) == [1.0, 1.0, 1.0, 1.0, 2 / 3]  # 341: 2 of its 3 asserts
    assert code_bug([""] * 5, refs, **_cols(rows)) == [1.0] * 5  # 341 fails an assert: wrong, not a bug
    shifted = refs[1:] + refs[:1]  # each problem gets another problem's solution
    assert code_pass([""] * 5, shifted, **_cols(rows)) == [0.0] * 5
    assert code_bug([""] * 5, shifted, **_cols(rows)) == [0.0] * 5  # the called function is not defined
    partial = "def " + rows[0]["test_list"][0].split("assert ")[1].split("(")[0] + "(*a):\n    return None\n"
    assert code_pass([""], [partial], **_cols(rows[:1])) == [0.0]
    assert code_pass([""], ["def f(:\n"], **_cols(rows[:1])) == [0.0] and code_bug([""], ["def f(:"], **_cols(
        rows[:1])) == [0.0]


def test_humaneval_reference_solutions_pass_and_wrong_ones_fail():
    from gdpo.eval.benchmarks import read_humaneval

    rows = read_humaneval()
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    sample = rows[:4]
    refs = [r["prompt"] + r["canonical_solution"] for r in sample]
    cols = {"test": [r["test"] for r in sample], "entry_point": [r["entry_point"] for r in sample]}
    assert code_pass([""] * 4, refs, **cols) == [1.0] * 4
    assert code_bug([""] * 4, refs, **cols) == [1.0] * 4
    wrong = [r["prompt"] + "    return None\n" for r in sample]
    assert code_pass([""] * 4, wrong, **cols) == [0.0] * 4
    crash = [r["prompt"] + "    raise RuntimeError('x')\n" for r in sample]
    assert code_bug([""] * 4, crash, **cols) == [0.0] * 4
