import json
import math
import time
from pathlib import Path

import pytest

from gdpo.rewards import RewardBank, RewardSpec, integer, math_correct
from gdpo.rewards.math import answers_match, extract_answer, last_boxed

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def score(completions, answer):
    return math_correct([""] * len(completions), completions, answer=answer)


def test_last_boxed_handles_nesting_and_skips_unclosed():
    assert last_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"first \boxed{1}, final \boxed {2}") == "2"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces do not close the box
    assert last_boxed(r"\boxed{7} then a broken \boxed{\frac{1}{2}") == "7"
    assert last_boxed("no box") is None


def test_extract_answer_fallbacks_are_ordered_and_configurable():
    assert extract_answer(r"<answer>12</answer> but \boxed{13}") == "13"  # boxed wins
    assert extract_answer("<think>..</think>\n<answer> $5$ </answer>") == "5"
    assert extract_answer("Thus the answer is $x=2$.\nDone") == "x=2"
    assert extract_answer("Final answer: 42") == "42"
    assert extract_answer("<answer>5</answer>", fallbacks=()) is None
    assert extract_answer("#### 1,234", fallbacks=("hashes",)) == "1,234"
    assert extract_answer("it is 3 or maybe 4", fallbacks=("last_number",)) == "4"
    with pytest.raises(ValueError, match="unknown fallback"):
        extract_answer("x", fallbacks=("nope",))


@pytest.mark.parametrize(
    "reference, predicted",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\frac12"),
        ("3", "x=3"),
        ("x=3", "3"),
        ("[1,2)", "[1, 2)"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        (r"\{1,2\}", r"\{2,1\}"),
        (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        ("10", r"10\%"),
        ("9", "9.0"),
    ],
)
def test_equivalent_forms_are_accepted(reference, predicted):
    assert score([rf"so \boxed{{{predicted}}}"], [reference]) == [1.0]


@pytest.mark.parametrize(
    "reference, predicted",
    [
        (r"\frac{1}{2}", "0.51"),
        ("(1,2)", "[1,2]"),
        (r"(-\infty, 3]", r"(-\infty,3)"),
        (r"\{1,2\}", r"\{1,3\}"),
        ("2", "3"),
        ("x=3", "x=4"),
        (r"\pi", "3.14"),
    ],
)
def test_wrong_answers_are_rejected(reference, predicted):
    assert score([rf"\boxed{{{predicted}}}"], [reference]) == [0.0]


def test_list_of_accepted_answers_counts_if_any_matches():
    assert score([r"\boxed{4}", r"\boxed{5}"], [["2^2", "four"], ["2^2", "four"]]) == [1.0, 0.0]
    # an `answers` column (Minerva) is preferred over `answer`
    out = math_correct(["", ""], [r"\boxed{4}", r"\boxed{3}"], answer=["3", "3"], answers=[["4"], None])
    assert out == [1.0, 1.0]


def test_missing_reference_does_not_apply():
    assert score([r"\boxed{1}", r"\boxed{1}"], [None, ""]) == [None, None]


def test_hostile_completions_always_give_a_number_quickly():
    junk = bytes(range(256)).decode("latin-1") * 50
    completions = [
        "",
        "x" * 200_000 + r"\boxed{2}",
        r"\boxed{" * 50_000,
        junk,
        r"\boxed{\frac{1}{2}",
        "}}}{{{" * 1000 + r"\boxed{}}",
        "答案是 \\boxed{２} 😀",
        "\ud800 surrogate \\boxed{2}",
        r"\boxed{" + "(" * 2000 + "}",
    ]
    t = time.perf_counter()
    out = score(completions, ["2"] * len(completions))
    assert time.perf_counter() - t < 10
    assert all(isinstance(v, float) and v in (0.0, 1.0) for v in out)
    assert out[1] == 1.0  # the answer after 200k characters is still found
    assert out[4] == 0.0


def test_answers_match_rejects_overlong_predictions():
    assert answers_match("1", "1" + " " * 2000) is False


def test_integer_reward():
    completions = [
        "<answer>42</answer>", r"\boxed{-1,000}", "#### 3.5", "no answer", r"\boxed{\frac{1}{2}}", "#### 7"
    ]
    assert integer([""] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason="needs ../shared/data/math500.jsonl")
def test_math500_reference_solutions_against_reference_answers():
    rows = [json.loads(line) for line in open(DATA / "math500.jsonl")]
    n = len(rows)
    solutions = [r["solution"] for r in rows]
    # Each reference solution against its own answer, then against the next problem's answer.
    answers = [r["answer"] for r in rows] + [rows[(i + 1) % n]["answer"] for i in range(n)]
    with RewardBank([RewardSpec("correct", "math_correct")], num_workers=2, timeout_s=60) as bank:
        res = bank.score([""] * 2 * n, solutions + solutions, None, {"answer": answers})
    col = res.column("correct")
    assert res.errors["correct"] == 0 and res.timeouts["correct"] == 0
    accepted = col[:n].sum().item()
    false_accepts = col[n:].sum().item()
    assert accepted >= 0.98 * n, f"only {accepted}/{n} reference solutions judged correct"
    assert false_accepts <= 0.02 * n, f"{false_accepts}/{n} solutions judged correct for another problem"
    # Pairs whose two reference answers really are equal are the only acceptable false accepts.
    for i in range(n):
        if col[n + i] == 1.0:
            assert answers_match(rows[(i + 1) % n]["answer"], rows[i]["answer"]), rows[i]["answer"]
    assert not math.isnan(res.metrics()["rewards/correct/mean"])


def test_works_outside_the_main_thread():
    # math-verify's signal.alarm timeout raises in threads; the reward switches it off there.
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.update(v=score([r"\boxed{0.5}", r"\boxed{2}"], ["1/2", "1/2"])))
    t.start()
    t.join(30)
    assert out["v"] == [1.0, 0.0]
