"""Evaluation metrics: pure functions of per-sample grades (no model, no I/O).

Per problem we have n samples, each with `correct` (bool), an answer `cluster` id (equivalent extracted
answers share an id, -1 = no answer extracted) and a `length` (tokens, or words for an oracle without a
tokenizer). Per benchmark:

- avg@n        mean over problems of c/n (c = correct samples): the paper's "pass@1 averaged over n samples".
- pass@k       unbiased estimator of the Codex paper, 1 - C(n-c, k) / C(n, k), averaged over problems.
- maj@k        majority vote over the extracted answers of the first k samples (samples are i.i.d., so the
               first k are a uniformly random k-subset: an unbiased, if noisier, estimate of maj@k).
- exceed       fraction of responses longer than L tokens (strictly more than L).
- mean / max length, truncation rate, no-answer rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = [
    "pass_at_k",
    "cluster_answers",
    "majority_index",
    "majority_correct",
    "exceed_ratio",
    "ProblemGrades",
    "summarize",
    "default_pass_ks",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), round(pass_at_k(4, 2, 2), 6)   # 1/4; 1 - 3/6; 1 - 1/6
    (0.25, 0.5, 0.833333)
    >>> pass_at_k(4, 0, 4), pass_at_k(4, 1, 4), pass_at_k(5, 3, 3)    # C(2,3)=0: every 3-subset has a hit
    (0.0, 1.0, 1.0)
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def cluster_answers(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[int]:
    """Cluster id per answer ([n] ints): equivalent answers share an id, None (no answer) gets -1.

    Ids are assigned in first-seen order; an answer joins the first cluster whose representative (its
    first member) `same` judges equal, so the id of answer j depends only on answers 0..j. Identical
    strings are matched without calling `same` (math-verify is the slow part).

    >>> same = lambda a, b: eval(a) == eval(b.replace("\\\\frac12", "1/2"))
    >>> cluster_answers(["1/2", "0.5", None, "3", "\\\\frac12", "3"], same)
    [0, 0, -1, 1, 0, 1]
    """
    reps: list[str] = []
    out: list[int] = []
    for a in answers:
        if a is None:
            out.append(-1)
            continue
        cid = next((i for i, r in enumerate(reps) if r == a), None)
        if cid is None:
            cid = next((i for i, r in enumerate(reps) if same(r, a)), None)
        if cid is None:
            reps.append(a)
            cid = len(reps) - 1
        out.append(cid)
    return out


def majority_index(clusters: Sequence[int]) -> int | None:
    """Index of the first sample of the most frequent cluster (ignoring -1); ties go to the cluster seen
    first. None if no sample has an answer.

    >>> majority_index([1, 0, 0, 1, -1]), majority_index([-1, 2, 3, 3]), majority_index([-1, -1])
    (0, 2, None)
    """
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, c in enumerate(clusters):
        if c < 0:
            continue
        counts[c] = counts.get(c, 0) + 1
        first.setdefault(c, i)
    if not counts:
        return None
    best = max(counts, key=lambda c: (counts[c], -first[c]))
    return first[best]


def majority_correct(clusters: Sequence[int], correct: Sequence[bool], k: int | None = None) -> bool:
    """Whether the majority answer of the first k samples (all if k is None) is correct; no answer = wrong.

    >>> majority_correct([0, 1, 1, 0, 0], [True, False, False, True, True], k=3)   # 1 wins 2:1
    False
    >>> majority_correct([0, 1, 1, 0, 0], [True, False, False, True, True])        # 0 wins 3:2
    True
    """
    k = len(clusters) if k is None else k
    i = majority_index(clusters[:k])
    return i is not None and bool(correct[i])


def exceed_ratio(lengths: Sequence[int], limit: int) -> float:
    """Fraction of responses strictly longer than `limit`.

    >>> exceed_ratio([10, 4000, 4001, 9000], 4000)
    0.5
    """
    if not lengths:
        return float("nan")
    return sum(1 for x in lengths if x > limit) / len(lengths)


@dataclass
class ProblemGrades:
    """The n samples of one problem (all lists [n], sample order)."""

    correct: list[bool]
    clusters: list[int]
    lengths: list[int]
    truncated: list[bool]


def default_pass_ks(n: int) -> list[int]:
    """Powers of two up to n, and n itself.

    >>> default_pass_ks(16), default_pass_ks(6), default_pass_ks(1)
    ([1, 2, 4, 8, 16], [1, 2, 4, 6], [1])
    """
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return sorted(set(ks + [n]))


def summarize(
    problems: Sequence[ProblemGrades],
    *,
    pass_ks: Sequence[int],
    maj_ks: Sequence[int],
    exceed_length: int,
) -> dict[str, float]:
    """Benchmark metrics from per-problem grades; every problem must have the same number n of samples.

    Rates are fractions in [0, 1]. Keys: num_problems, n, avg@n, pass@k (each k), maj@k (each k),
    exceed_ratio, exceed_length, mean_length, max_length, truncation_rate, no_answer_rate.

    >>> g = [ProblemGrades([True, False], [0, 1], [10, 30], [False, True]),
    ...      ProblemGrades([False, False], [-1, 0], [20, 40], [False, False])]
    >>> m = summarize(g, pass_ks=[1, 2], maj_ks=[2], exceed_length=25)
    >>> m["avg@2"], m["pass@2"], m["maj@2"], m["exceed_ratio"], m["mean_length"], m["truncation_rate"], \\
    ...     m["no_answer_rate"]
    (0.25, 0.5, 0.5, 0.5, 25.0, 0.25, 0.25)
    """
    if not problems:
        raise ValueError("no problems to summarize")
    n = len(problems[0].correct)
    if any(len(p.correct) != n for p in problems):
        raise ValueError("every problem needs the same number of samples")
    P = len(problems)
    counts = [sum(p.correct) for p in problems]
    lengths = [x for p in problems for x in p.lengths]
    out: dict[str, float] = {"num_problems": P, "n": n, f"avg@{n}": sum(c / n for c in counts) / P}
    for k in pass_ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / P
    for k in maj_ks:
        if not 1 <= k <= n:
            raise ValueError(f"maj@{k} needs 1 <= k <= n={n}")
        out[f"maj@{k}"] = sum(majority_correct(p.clusters, p.correct, k) for p in problems) / P
    out["exceed_ratio"] = exceed_ratio(lengths, exceed_length)
    out["exceed_length"] = exceed_length
    out["mean_length"] = sum(lengths) / len(lengths)
    out["max_length"] = max(lengths)
    out["truncation_rate"] = sum(t for p in problems for t in p.truncated) / (P * n)
    out["no_answer_rate"] = sum(c < 0 for p in problems for c in p.clusters) / (P * n)
    return out
