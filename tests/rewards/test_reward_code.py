import json
import time

import pytest

from gdpo.rewards import code_bug, code_pass
from gdpo.rewards.code import extract_code, parse_tests

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = {"inputs": ["1 2\n", "5 5\n", "0 0\n", "-1 1\n"], "outputs": ["3\n", "10\n", "0\n", "0\n"]}


def passes(completions, tests, **kw):
    return code_pass([""] * len(completions), completions, tests=tests, **kw)


def test_stdin_cases_fraction_passed():
    # right for a > 0 only: passes "1 2" and "5 5", fails "0 0" and "-1 1"
    wrong_half = "```python\na, b = map(int, input().split())\nprint(a + b if a > 0 else 1)\n```"
    only_first = "```python\nprint(3)\n```"
    crash = "```python\nprint(1 / 0)\n```"
    syntax = "```python\nprint(\n```"
    out = passes([ADD, wrong_half, only_first, crash, syntax], [ADD_TESTS] * 5)
    assert out == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_output_comparison_ignores_trailing_whitespace_and_float_noise():
    tests = [{"inputs": [""], "outputs": ["1 2\n0.3333333\n"]}]
    prog = "print('1 2   ')\nprint(1/3)\nprint()\n"
    assert passes([prog], tests) == [1.0]
    assert passes(["print('1 2')\nprint(0.34)"], tests) == [0.0]


def test_call_based_cases_function_and_solution_class():
    tests = {"fn_name": "add", "inputs": [[1, 2], [3, 4], [0, 0]], "outputs": [[3], 7, 1]}
    func = "def add(a, b):\n    return a + b"
    cls = "class Solution:\n    def add(self, a, b):\n        return a + b"
    missing = "def plus(a, b):\n    return a + b"
    assert passes([func, cls, missing], [tests] * 3) == [pytest.approx(2 / 3)] * 2 + [0.0]


def test_call_based_result_cannot_be_forged_by_printing():
    tests = {"fn_name": "f", "inputs": [[1]], "outputs": [2]}
    # Prints what a naive harness would read as the answer, then returns the wrong value.
    forger = "def f(x):\n    print('2')\n    print('\\n2')\n    return 0"
    assert passes([forger], [tests]) == [0.0]


def test_test_formats_json_string_and_list_of_dicts():
    as_json = json.dumps(ADD_TESTS)
    as_list = [{"input": i, "output": o} for i, o in zip(ADD_TESTS["inputs"], ADD_TESTS["outputs"])]
    assert passes([ADD, ADD], [as_json, as_list]) == [1.0, 1.0]
    out = code_pass([""], [ADD], input_output=[as_json])  # APPS / TACO column name
    assert out == [1.0]


def test_rows_without_tests_do_not_apply():
    assert passes([ADD, ADD, ADD], [None, "not json", {"inputs": [], "outputs": []}]) == [None, None, None]


def test_a_hanging_program_stops_after_its_first_timeout():
    tests = {"inputs": ["1\n"] * 5, "outputs": ["1\n"] * 5}
    t = time.perf_counter()
    out = passes(["import time\ntime.sleep(60)"], [tests], wall_s=1.0)
    assert out == [0.0]
    assert time.perf_counter() - t < 4  # one wall limit, not five


def test_code_bug():
    completions = ["print(1)", "print(", "raise SystemExit(3)", ADD, "import time\ntime.sleep(60)"]
    tests = [None, None, None, ADD_TESTS, None]
    out = code_bug([""] * 5, completions, tests=tests, wall_s=1.0)
    assert out == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_extract_code_and_parse_tests():
    assert extract_code("```\nx = 1\n```\ntext\n```python3\ny = 2\n```") == "y = 2\n"
    assert extract_code("no fence") == "no fence"
    with pytest.raises(ValueError):
        parse_tests({"inputs": ["1"], "outputs": []})


def test_hostile_completions_give_numbers():
    junk = ["", "\x00\xff\ud800", "x" * 200_000, "```python\n" + "(" * 10_000 + "\n```", "😀 print('hi')"]
    out = passes(junk, [ADD_TESTS] * len(junk))
    assert out == [0.0] * len(junk)
