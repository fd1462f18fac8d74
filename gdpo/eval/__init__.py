"""Math benchmark evaluation the way the GDPO paper reports it (``python -m gdpo.eval --help``).

    from gdpo.eval import pass_at_k, load_problems, BENCHMARKS
    pass_at_k(n=16, c=3, k=4)                  # unbiased pass@k of one problem

Modules: `benchmarks` (registry + loading), `metrics` (pass@k, maj@k, exceed ratio; pure functions),
`runner` (completion sources, grading, resumable loop, results), `__main__` (the CLI); tool calling: `bfcl`
(BFCL v3's AST checker and summary; pure), `apibank` (ToolRL's API-Bank rule; pure), `toolcall` (prompts,
decoding, grading, oracle and summaries for the runner).
"""

from gdpo.eval.benchmarks import BENCHMARKS, Benchmark, EvalInputError, Problem, load_problems, resolve_benchmarks
from gdpo.eval.metrics import cluster_answers, exceed_ratio, majority_correct, pass_at_k, summarize

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvalInputError",
    "Problem",
    "load_problems",
    "resolve_benchmarks",
    "pass_at_k",
    "cluster_answers",
    "majority_correct",
    "exceed_ratio",
    "summarize",
]
