"""pass@k, maj@k, exceed ratio and the per-problem grader, against hand-computed values."""

import itertools
import math

import pytest

from gdpo.eval.metrics import (
    ProblemGrades,
    cluster_answers,
    default_pass_ks,
    exceed_ratio,
    majority_correct,
    majority_index,
    pass_at_k,
    summarize,
)
from gdpo.eval.runner import grade_samples


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)/C(10,5)
        (16, 0, 16, 0.0),
        (16, 1, 16, 1.0),
        (16, 16, 1, 1.0),
        (4, 3, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (1000, 1, 500, 0.5),  # C(999,500)/C(1000,500) = 500/1000; binomials ~1e299 never formed
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_subset_enumeration():
    # The estimator is the share of k-subsets of the n samples that contain a correct one.
    n = 6
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (c, k)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_ties_go_to_the_first_seen_answer():
    clusters = [0, 1, 1, 0, -1, -1]
    correct = [True, False, False, True, False, False]
    assert majority_index(clusters) == 0  # 0 and 1 both have 2 votes; 0 came first
    assert majority_correct(clusters, correct) is True
    assert majority_correct(clusters, correct, k=3) is False  # [0, 1, 1]: 1 wins 2:1
    assert majority_correct(clusters, correct, k=1) is True
    assert majority_index([1, 0, 0]) == 1  # counts beat order
    assert majority_index([-1, -1, -1, 2]) == 3  # no-answer samples do not vote
    assert majority_correct([-1, -1], [False, False]) is False


def test_cluster_answers_uses_equivalence_not_strings():
    # "equal" here: same value as a fraction; the real grader passes math-verify.
    from fractions import Fraction

    same = lambda a, b: Fraction(a) == Fraction(b)  # noqa: E731
    assert cluster_answers(["1/2", "2/4", None, "3", "0.5", "6/2", "7"], same) == [0, 0, -1, 1, 0, 1, 2]
    calls = []
    cluster_answers(["x", "x", "x"], lambda a, b: calls.append((a, b)) or False)
    assert calls == []  # identical strings never reach the (slow) equivalence check


def test_exceed_ratio_counts_strictly_longer():
    assert exceed_ratio([4000, 4000, 4001, 1], 4000) == 0.25
    assert math.isnan(exceed_ratio([], 4000))


def test_summarize_hand_computed():
    problems = [
        ProblemGrades([True, False, False, False], [0, 1, 1, 2], [100, 5000, 4000, 4001], [False, True, False, False]),
        ProblemGrades([False] * 4, [-1, -1, 0, 0], [10, 10, 10, 10], [False] * 4),
        ProblemGrades([True, True, True, False], [0, 0, 0, 1], [1, 2, 3, 4], [False] * 4),
    ]
    m = summarize(problems, pass_ks=[1, 2, 4], maj_ks=[2, 4], exceed_length=4000)
    assert m["num_problems"] == 3 and m["n"] == 4
    assert m["avg@4"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert m["pass@1"] == pytest.approx(1 / 3)
    assert m["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # P1: 1 - C(3,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)  # P1: wrong answer 1 wins 2:1:1; P2 wrong; P3 right
    assert m["maj@2"] == pytest.approx(2 / 3)  # P1: [0, 1] tie -> 0 (right); P2 no answer; P3 right
    assert m["exceed_ratio"] == pytest.approx(2 / 12)  # 5000 and 4001; 4000 itself is not over
    assert m["mean_length"] == pytest.approx(13151 / 12)
    assert m["max_length"] == 5000
    assert m["truncation_rate"] == pytest.approx(1 / 12)
    assert m["no_answer_rate"] == pytest.approx(2 / 12)
    with pytest.raises(ValueError):
        summarize(problems, pass_ks=[1], maj_ks=[5], exceed_length=1)


def test_default_pass_ks():
    assert default_pass_ks(16) == [1, 2, 4, 8, 16]
    assert default_pass_ks(12) == [1, 2, 4, 8, 12]


def test_grade_samples_extracts_matches_and_clusters():
    texts = ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "I give up", "\\boxed{3.0}",
             "The answer is 1/2"]
    extracted, correct, clusters = grade_samples(["\\frac12"], texts, ("answer_tag", "answer_is"), 5.0)
    assert extracted == ["\\frac{1}{2}", "0.5", "3", None, "3.0", "1/2"]
    assert correct == [True, True, False, False, False, True]
    assert clusters == [0, 0, 1, -1, 1, 0]  # 3 and 3.0 are one (wrong) answer for maj@k
    # The wrong answer wins the vote once it has more samples.
    _, correct, clusters = grade_samples(["2"], ["\\boxed{2}", "\\boxed{5}", "\\boxed{5.0}"], (), 5.0)
    assert clusters == [0, 1, 1] and majority_correct(clusters, correct) is False


def test_grade_samples_reference_forms():
    # Minerva: any of several accepted forms.
    assert grade_samples(["0.01", "0.02"], ["\\boxed{0.02}", "\\boxed{0.03}"], (), 5.0)[1] == [True, False]
    # OlympiadBench multiple answers: the whole set, in any order; a subset is wrong.
    ref = ["$(6,3),(9,3),(9,5),(54,5)$"]
    texts = ["\\boxed{(9,3),(6,3),(54,5),(9,5)}", "\\boxed{(6,3),(9,3)}"]
    assert grade_samples(ref, texts, (), 5.0)[1] == [True, False]
    # GSM8K: integer answers; "#### 1,000" counts when its fallback is on.
    assert grade_samples(["1000"], ["... #### 1,000"], ("hashes",), 5.0)[1] == [True]
    assert grade_samples(["1000"], ["... #### 1,000"], (), 5.0)[1] == [False]
