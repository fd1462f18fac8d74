"""Code rewards: run the completion's program against test cases in the sandbox (see sandbox.py).

Three test formats, by column:
- assert-style (MBPP): `test_list`, a list of ``assert ...`` statements, with optional `test_setup_code` run
  first; the `tests` column may also hold such a list. Each assert is one case.
- a check function (HumanEval): `test`, source defining ``check(candidate)``, and `entry_point`, the function
  name; ``check(entry_point)`` is one case.
- input/output (APPS/TACO): the `tests` column (the `input_output` column is read too). Per row, either a dict
  ``{"inputs": [...], "outputs": [...], "fn_name": optional}`` (or its JSON string) or a list of
  ``{"input": ..., "output": ...}`` dicts. Without `fn_name` the cases are stdin/stdout: the input is fed on
  stdin and stdout must match the output (trailing whitespace and blank lines ignored, numbers compared with a
  1e-6 tolerance). With `fn_name` the cases are call-based: each input is the argument list of
  ``fn_name(*args)`` (a top-level function, or a method of a `Solution` class) and the return value must
  equal the output.

For assert-style and check-function tests the program, the setup and every case run in one sandboxed process
(one start-up per completion); a case that fails its assert fails, a case (or the program) that raises any
other exception is also a bug for `code_bug`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any, Optional

from gdpo.rewards.sandbox import run_python

__all__ = ["code_pass", "code_bug", "extract_code", "parse_tests", "run_asserts"]

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Both harnesses read their instructions from stdin, then point fd 0 at /dev/null so the program cannot re-read
# them (and the nonce that marks the genuine result line).
_STDIN_PROLOGUE = r"""
import json, os, sys
_spec = json.loads(sys.stdin.read())
_fd = os.open(os.devnull, os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
sys.stdin = open(0, closefd=False)
"""

# Call-based harness.
_HARNESS = _STDIN_PROLOGUE + r"""
with open("solution.py", encoding="utf-8", errors="replace") as _f:
    _src = _f.read()
_ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
exec(compile(_src, "solution.py", "exec"), _ns)
_fn = _ns.get(_spec["fn"])
if _fn is None and isinstance(_ns.get("Solution"), type):
    _fn = getattr(_ns["Solution"](), _spec["fn"])
if _fn is None:
    raise NameError("function %r not defined" % _spec["fn"])
_out = _fn(*_spec["args"])
sys.stdout.flush()
sys.stdout.write("\n" + _spec["nonce"] + json.dumps(_out, default=repr) + "\n")
"""


# Assert-style harness: the program, then the setup, then each case, in one process. One result line per case
# (after the nonce the program cannot know): "pass", "fail" (AssertionError) or "error" (any other exception).
_ASSERT_HARNESS = _STDIN_PROLOGUE + r"""
_nonce = _spec["nonce"]
def _report(i, status):
    sys.stdout.flush()
    sys.stdout.write("\n" + _nonce + json.dumps([i, status]) + "\n")
    sys.stdout.flush()
with open("solution.py", encoding="utf-8", errors="replace") as _f:
    _src = _f.read()
_ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_src, "solution.py", "exec"), _ns)
    if _spec["setup"]:
        exec(compile(_spec["setup"], "setup.py", "exec"), _ns)
except BaseException:
    _report(-1, "error")
    raise SystemExit(0)
for _i, _case in enumerate(_spec["cases"]):
    try:
        exec(compile(_case, "test_%d.py" % _i, "exec"), _ns)
        _report(_i, "pass")
    except AssertionError:
        _report(_i, "fail")
    except BaseException:
        _report(_i, "error")
"""


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ```), else the whole completion.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand\\n```py\\nprint(2)\\n```")
    'print(2)\\n'
    >>> extract_code("print(3)")
    'print(3)'
    """
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def parse_tests(tests: Any) -> tuple[list[Any], list[Any], Optional[str]]:
    """(inputs, outputs, fn_name) from one row's test column; ValueError when unreadable.

    >>> parse_tests('{"inputs": ["1\\\\n"], "outputs": ["2\\\\n"]}')
    (['1\\n'], ['2\\n'], None)
    >>> parse_tests([{"input": "x", "output": "y"}])
    (['x'], ['y'], None)
    """
    if isinstance(tests, (str, bytes)):
        tests = json.loads(tests)
    if isinstance(tests, dict):
        inputs, outputs = list(tests.get("inputs", [])), list(tests.get("outputs", []))
        fn = tests.get("fn_name") or None
    elif isinstance(tests, (list, tuple)):
        inputs = [t["input"] for t in tests]
        outputs = [t["output"] for t in tests]
        fn = None
    else:
        raise ValueError(f"unreadable tests: {type(tests).__name__}")
    if len(inputs) != len(outputs):
        raise ValueError("tests have different numbers of inputs and outputs")
    return inputs, outputs, fn


def _text(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return "\n".join(str(v) for v in x)
    return str(x)


def _tokens_equal(a: str, b: str) -> bool:
    ta, tb = a.split(), b.split()
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not math.isclose(fx, fy, rel_tol=1e-6, abs_tol=1e-6):
            return False
    return True


def _stdout_matches(got: str, expected: str) -> bool:
    g = [ln.rstrip() for ln in got.strip("\n").splitlines()]
    e = [ln.rstrip() for ln in expected.strip("\n").splitlines()]
    return g == e or _tokens_equal(got, expected)


def _values_equal(got: Any, expected: Any) -> bool:
    if isinstance(got, float) or isinstance(expected, float):
        try:
            return math.isclose(float(got), float(expected), rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(_values_equal(a, b) for a, b in zip(got, expected))
    return got == expected


def _run_case(program: str, inp: Any, fn_name: Optional[str], limits: dict) -> tuple[bool, Any, bool]:
    """(ran without error, what it produced, hit the wall-clock limit) for one case."""
    if fn_name is None:
        r = run_python(program, _text(inp), **limits)
        return r.ok, r.stdout, r.timed_out
    nonce = secrets.token_hex(16)
    args = inp if isinstance(inp, list) else [inp]
    spec = json.dumps({"fn": fn_name, "args": args, "nonce": nonce})
    r = run_python(_HARNESS, spec, files={"solution.py": program}, **limits)
    if r.ok:
        for line in reversed(r.stdout.splitlines()):
            if line.startswith(nonce):
                try:
                    return True, json.loads(line[len(nonce):]), False
                except ValueError:
                    break
    return False, None, r.timed_out


def _case_passes(got: Any, out: Any, fn_name: Optional[str]) -> bool:
    if fn_name is None:
        return _stdout_matches(got, _text(out))
    # APPS stores a call's scalar result wrapped in a one-element list.
    return _values_equal(got, out) or (isinstance(out, list) and len(out) == 1 and _values_equal(got, out[0]))


def _row_asserts(columns: dict, i: int) -> tuple[list[str], str] | None:
    """(cases, setup) for assert-style (MBPP) or check-function (HumanEval) tests of row i, else None."""
    test_list = columns.get("test_list")
    if test_list is not None and test_list[i] is not None:
        setup = columns.get("test_setup_code")
        return [str(t) for t in test_list[i]], str(setup[i] or "") if setup is not None else ""
    test, entry = columns.get("test"), columns.get("entry_point")
    if test is not None and entry is not None and test[i] and entry[i]:
        return [f"check({entry[i]})"], str(test[i])
    tests = columns.get("tests")
    if tests is not None and isinstance(tests[i], (list, tuple)) and tests[i] and all(
        isinstance(t, str) and t.lstrip().startswith("assert") for t in tests[i]
    ):
        return [str(t) for t in tests[i]], ""
    return None


def run_asserts(program: str, cases: list[str], setup: str, limits: dict) -> list[str]:
    """Per case "pass" / "fail" / "error" (a case never reached, e.g. after a timeout, is "error")."""
    nonce = secrets.token_hex(16)
    spec = json.dumps({"setup": setup, "cases": cases, "nonce": nonce})
    r = run_python(_ASSERT_HARNESS, spec, files={"solution.py": program}, **limits)
    status = ["error"] * len(cases)
    for line in r.stdout.splitlines():
        if line.startswith(nonce):
            try:
                i, st = json.loads(line[len(nonce):])
            except ValueError:
                continue
            if i == -1:
                return ["error"] * len(cases)
            if isinstance(i, int) and 0 <= i < len(cases) and st in ("pass", "fail", "error"):
                status[i] = st
    return status


def _row_tests(columns: dict, i: int) -> Any:
    for key in ("tests", "input_output"):
        col = columns.get(key)
        if col is not None:
            return col[i]
    return None


def code_pass(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    wall_s: float = 6.0,
    cpu_s: float = 4.0,
    memory_mb: int = 512,
    max_cases: int = 20,
    stop_after_timeout: bool = True,
    **columns: Any,
) -> list[Optional[float]]:
    """Fraction of the row's test cases (the first `max_cases`) the extracted program passes; None for a row
    without tests. After a case hits the wall clock the rest count as failed (`stop_after_timeout`).

    >>> tests = [{"inputs": ["2 3\\n", "5 5\\n"], "outputs": ["5\\n", "10\\n"]}]
    >>> code_pass([""], ["```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```"], tests=tests)
    [1.0]
    >>> code_pass([""], ["```python\\nprint(5)\\n```"], tests=tests)
    [0.5]
    >>> calls = [{"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}]
    >>> code_pass([""], ["def add(a, b):\\n    return a + b"], tests=calls)
    [1.0]
    >>> asserts = [["assert add(1, 2) == 3", "assert add(2, 2) == 4"]]
    >>> code_pass([""], ["def add(a, b):\\n    return 3"], test_list=asserts)
    [0.5]
    """
    limits = {"wall_s": wall_s, "cpu_s": cpu_s, "memory_mb": memory_mb}
    out: list[Optional[float]] = []
    for i, completion in enumerate(completions):
        asserts = _row_asserts(columns, i)
        if asserts is not None:
            cases, setup = asserts
            if not cases:
                out.append(None)
                continue
            status = run_asserts(extract_code(str(completion)), cases[:max_cases], setup, limits)
            out.append(status.count("pass") / len(status))
            continue
        raw = _row_tests(columns, i)
        if raw is None:
            out.append(None)
            continue
        try:
            inputs, outputs, fn = parse_tests(raw)
        except (ValueError, KeyError, TypeError):
            out.append(None)
            continue
        if not inputs:
            out.append(None)
            continue
        program = extract_code(str(completion))
        cases = list(zip(inputs, outputs))[:max_cases]
        passed = 0
        for inp, exp in cases:
            ok, got, timed_out = _run_case(program, inp, fn, limits)
            passed += ok and _case_passes(got, exp, fn)
            if timed_out and stop_after_timeout:
                break  # the remaining cases count as failed: one hang must not cost max_cases * wall_s
        out.append(passed / len(cases))
    return out


def code_bug(
    prompts: list,
    completions: list[str],
    *,
    completion_lengths: Optional[list[int]] = None,
    wall_s: float = 6.0,
    cpu_s: float = 4.0,
    memory_mb: int = 512,
    **columns: Any,
) -> list[float]:
    """1 if the extracted program runs (on the first test input, else on empty stdin) without a syntax or
    runtime error, else 0. A run killed by a limit counts as an error. With assert-style / check-function tests
    the program runs every case: an AssertionError is not a bug, any other exception is.

    >>> code_bug(["", ""], ["print(1)", "print(1/0)"])
    [1.0, 0.0]
    """
    limits = {"wall_s": wall_s, "cpu_s": cpu_s, "memory_mb": memory_mb}
    out: list[float] = []
    for i, completion in enumerate(completions):
        asserts = _row_asserts(columns, i)
        if asserts is not None:  # a failed assert is a wrong answer; any other exception (or a limit) is a bug
            status = run_asserts(extract_code(str(completion)), asserts[0], asserts[1], limits)
            out.append(0.0 if "error" in status else 1.0)
            continue
        inp: Any = ""
        fn = None
        raw = _row_tests(columns, i)
        if raw is not None:
            try:
                inputs, _, fn = parse_tests(raw)
                inp = inputs[0] if inputs else ("" if fn is None else [])
            except (ValueError, KeyError, TypeError):
                pass
        ok, _, _ = _run_case(extract_code(str(completion)), inp, fn, limits)
        out.append(1.0 if ok else 0.0)
    return out


# The bank sends fewer rows per call to slow rewards, so one call stays well inside its timeout.
code_pass.rows_per_call = 4  # type: ignore[attr-defined]
code_bug.rows_per_call = 8  # type: ignore[attr-defined]
