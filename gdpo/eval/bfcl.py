"""BFCL v3 single-turn scoring: decoded calls against the possible answers, by the rules of BFCL's AST checker.

Pure functions, no I/O. Written from the rules of the Berkeley Function Calling Leaderboard (gorilla,
``berkeley-function-call-leaderboard``, v3 categories), not from its code. A decoded model output is a list of
calls, each ``{function_name: {param: value}}``; a ground truth is a list of ``{function_name: {param: [possible
values]}}`` where ``""`` among the possible values means the parameter may be left out.

Rules (`check_calls`):
- Categories. ``irrelevance`` / ``live_irrelevance``: correct iff no call is made (an output that does not decode
  to calls counts as no call). ``live_relevance``: correct iff at least one call. Categories with ``parallel`` in
  their name: as many calls as ground-truth entries, matched in any order (each ground-truth entry takes the first
  still-unmatched call that passes). ``multiple``: exactly one call, checked against the ground truth's function.
  Others (``simple``, ``java``, ``javascript``, ``live_simple``): exactly one call, checked against the one function.
- One call (`check_call`): the function name must match exactly; every ``required`` parameter present; no parameter
  that the function does not declare or the ground truth does not list; every listed parameter whose possible
  values lack ``""`` present; each value must be among the possible values under the type rules below.
- Types (Python): the declared type maps to a Python type (string/any -> str, integer -> int, float -> float,
  boolean -> bool, array/tuple -> list, dict -> dict); an int is accepted where a float is declared; arrays also
  check their elements against ``items``. A value whose type differs from the declared one is still accepted when
  it has the type of the possible values (BFCL's "variable" case: the answer is a variable name given as a string);
  then it must equal a possible value exactly.
- Values: strings are compared after `standardize` (spaces and ``,./-_*^`` removed, lower case, ``'`` -> ``"``);
  lists element-wise with their strings standardized; dicts key by key (no unknown key, every key whose
  possible values lack ``""`` present, each value standardized among its possible values); lists of dicts
  dict by dict in order; everything else with Python ``==`` (so 5 == 5.0).
- Java / JavaScript: every value must be a string in the language's syntax; it is converted first
  (`java_value`, `js_value`: e.g. ``"12L"`` is a long 12, ``"new int[]{1, 2}"`` an int array, ``"[1, 2]"`` a JS
  array, ``"12n"`` a BigInt) and then checked as above. A string that does not parse as its type stays a string.

Summary (`bfcl_summary`, BFCL v3's leaderboard arithmetic on category accuracies):
- Non-Live = unweighted mean of [mean(simple, java, javascript), multiple, parallel, parallel_multiple,
  irrelevance]; Non-Live AST the same without irrelevance.
- Live = mean over the live categories weighted by their number of problems (simple, multiple, parallel,
  parallel_multiple, irrelevance, relevance); Live AST the same over the four AST categories.
- Overall = unweighted mean of Non-Live and Live: BFCL's single-turn overall. (BFCL v3's total also averages in
  the multi-turn categories, which need its executable backends and are not evaluated here.)
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

__all__ = [
    "CATEGORIES",
    "NON_LIVE",
    "LIVE",
    "language_of",
    "standardize",
    "java_value",
    "js_value",
    "check_call",
    "check_calls",
    "is_call_list",
    "is_empty",
    "bfcl_summary",
]

NON_LIVE = ("simple", "multiple", "parallel", "parallel_multiple", "java", "javascript", "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
        "live_relevance")
CATEGORIES = NON_LIVE + LIVE

PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
                "dict": dict, "any": str}
JAVA_TYPES = {"byte": int, "short": int, "integer": int, "float": float, "double": float, "long": int,
              "boolean": bool, "char": str, "Array": list, "ArrayList": list, "Set": set, "HashMap": dict,
              "Hashtable": dict, "Queue": list, "Stack": list, "String": str, "any": str}
JS_TYPES = {"String": str, "integer": int, "float": float, "Bigint": int, "Boolean": bool, "dict": dict,
            "array": list, "any": str}
_TYPES = {"python": PYTHON_TYPES, "java": JAVA_TYPES, "javascript": JS_TYPES}
_NESTED = {"python": ("array", "tuple"), "java": ("Array", "ArrayList"), "javascript": ("array",)}


class CheckError(Exception):
    """Why a call does not match (the message goes into the sample row)."""


def language_of(category: str) -> str:
    """>>> language_of("java"), language_of("javascript"), language_of("live_simple")
    ('java', 'javascript', 'python')
    """
    return category if category in ("java", "javascript") else "python"


def standardize(s: str) -> str:
    """BFCL's string normalisation.

    >>> standardize("April 1, 2024"), standardize("new_york-City"), standardize("it's")
    ('april12024', 'newyorkcity', 'it"s')
    """
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _std(x: Any) -> Any:
    return standardize(x) if isinstance(x, str) else x


# ------------------------------------------------------------------------------------------ Java values

_INT = re.compile(r"-?\d+")
_JAVA_FLOAT = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?[fF]")
_JAVA_DOUBLE = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_JAVA_LONG = re.compile(r"-?\d+[lL]")


def _java_literal(s: str) -> Any:
    """A Java literal without a declared type: boolean, "string", long, float, then int / double, else the text."""
    if s in ("true", "false"):
        return s == "true"
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return s[1:-1]
    if _JAVA_LONG.fullmatch(s):
        return int(s[:-1])
    if _JAVA_FLOAT.fullmatch(s):
        return float(s[:-1])
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _java_element(s: str, nested: str | None) -> Any:
    if nested is None:
        return _java_literal(s)
    return java_value(s, nested)


def _java_list_element(s: str, nested: str | None) -> Any:
    # ArrayList elements of type char / String lose their quotes (first and last character).
    if nested in ("char", "String"):
        return s[1:-1]
    return _java_element(s, nested)


def java_value(s: str, type_name: str, nested: str | None = None) -> Any:
    """A Java value written as a string -> the Python value BFCL compares; text that does not parse as
    `type_name` stays the string it was.

    >>> java_value("12", "integer"), java_value("12L", "long"), java_value("1.5f", "float"), java_value("x", "long")
    (12, 12, 1.5, 'x')
    >>> java_value("new int[]{1, 2}", "Array", "integer"), java_value('new ArrayList<>(Arrays.asList("a", "b"))',
    ...     "ArrayList", "String")
    ([1, 2], ['a', 'b'])
    >>> java_value('new HashMap<String, Object>() {{ put("k", 5); put("s", "v"); }}', "HashMap")
    {'k': 5, 's': 'v'}
    """
    if type_name not in JAVA_TYPES:
        raise CheckError(f"unsupported Java type {type_name!r}")
    if type_name in ("byte", "short", "integer"):
        return int(s) if _INT.fullmatch(s) else s
    if type_name == "float":
        return float(s[:-1]) if _JAVA_FLOAT.fullmatch(s) else s
    if type_name == "double":
        return float(s) if _JAVA_DOUBLE.fullmatch(s) else s
    if type_name == "long":
        return int(s[:-1]) if _JAVA_LONG.fullmatch(s) else s
    if type_name == "boolean":
        return s == "true" if s in ("true", "false") else s
    if type_name in ("char", "String", "any"):
        return s  # BFCL's char pattern never matches, so a char stays the text it was
    if type_name == "Array":
        m = re.search(r"new\s+\w+\[\]\s*\{(.*?)\}", s)
        if not m:
            return s
        return [_java_element(x.strip(), nested) for x in m.group(1).split(",") if x.strip()]
    if type_name == "ArrayList":
        m = re.search(r"new\s+ArrayList<\w*>\(Arrays\.asList\((.+?)\)\)", s)
        if m:
            return [_java_list_element(x.strip(), nested) for x in m.group(1).split(",")]
        m = re.search(r"new\s+ArrayList<\w*>\(\)\s*\{\{\s*(.+?)\s*\}\}", s, re.DOTALL)
        if m:
            return [_java_list_element(x.strip(), nested) for x in re.findall(r"add\((.+?)\)", m.group(1))]
        return [] if re.search(r"new\s+ArrayList<\w*>\(\)", s) else s
    if type_name == "HashMap":
        m = re.search(r"new\s+HashMap<.*?>\s*\(\)\s*\{\s*\{?\s*(.*?)\s*\}?\s*\}", s, re.DOTALL)
        if m:
            return {k: _java_literal(v.strip()) for k, v in re.findall(r"put\(\"(.*?)\",\s*(.*?)\)", m.group(1))}
        return {} if re.search(r"new\s+HashMap<.*?>\s*\(\)", s) else s
    raise CheckError(f"Java type {type_name!r} is not supported by the checker")  # Set, Hashtable, Queue, Stack


# ------------------------------------------------------------------------------------ JavaScript values

_JS_FLOAT = re.compile(r"-?\d+(\.\d+)?")
_JS_BIGINT = re.compile(r"-?\d+n")


def _js_literal(s: str) -> Any:
    s = s.strip()
    if s in ("true", "false"):
        return s == "true"
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1]
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _js_array(code: str, nested: str | None) -> Any:
    two_d = re.match(r"\[\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\]|\bnew\s+Array\(\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\)", code)
    if two_d:
        rows = []
        for i, inner in enumerate(re.findall(r"\[(.*?)\]", two_d.group(0))):
            inner = inner.strip()
            if i == 0 and inner.startswith("["):
                inner = inner[1:]
            rows.append([_js_literal(e.strip()) for e in inner.split(",")])
        return rows
    m = re.match(r"\[(.*?)\]|\bnew\s+Array\((.*?)\)", code)
    if not m:
        return code
    body = (m.group(1) if m.group(1) is not None else m.group(2) or "").strip()
    elements = body.split(",") if body else []
    if nested is None:
        return [_js_literal(e.strip()) for e in elements]
    return [js_value(e.strip(), nested) for e in elements]


def _js_dict(code: str) -> Any:
    if code == "{}":
        return {}
    m = re.match(r"\{(.*?)\}", code)
    if not m:
        return code
    out: dict = {}
    for key, value in re.findall(r"([^:]+):\s*(.*?)(?:,\s*(?=[^,]+:)|$)", m.group(1)):
        key, value = key.strip().strip("'\""), value.strip()
        if value.startswith("[") and value.endswith("]"):
            out[key] = _js_array(value, None)
        elif value.startswith("{") and value.endswith("}"):
            out[key] = _js_dict(value)
        else:
            out[key] = _js_literal(value.strip("'\""))  # quotes go first: '"5"' reads as the number 5
    return out


def js_value(s: str, type_name: str, nested: str | None = None) -> Any:
    """A JavaScript value written as a string -> the Python value BFCL compares; text that does not parse as
    `type_name` stays the string it was.

    >>> js_value("'abc'", "String"), js_value("12n", "Bigint"), js_value("2.5", "float"), js_value("1e3", "float")
    ('abc', 12, 2.5, '1e3')
    >>> js_value("[1, 2]", "array", "integer"), js_value("[[1, 2], [3]]", "array"), js_value("{a: 1, b: 'x'}", "dict")
    ([1, 2], [[1, 2], [3]], {'a': 1, 'b': 'x'})
    """
    if type_name not in JS_TYPES:
        raise CheckError(f"unsupported JavaScript type {type_name!r}")
    if type_name == "String":
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'" else s
    if type_name == "integer":
        return int(s) if _INT.fullmatch(s) else s
    if type_name == "float":
        return float(s) if _JS_FLOAT.fullmatch(s) else s
    if type_name == "Bigint":
        return int(s[:-1]) if _JS_BIGINT.fullmatch(s) else s
    if type_name == "Boolean":
        return s == "true" if s in ("true", "false") else s
    if type_name == "any":
        return s
    code = s.strip()
    try:
        return _js_array(code, nested) if type_name == "array" else _js_dict(code)
    except (CheckError, ValueError, IndexError):
        return code


# ------------------------------------------------------------------------------------------ the checker


def _first_type(possible: Sequence) -> type | None:
    """The type of the first possible value that is not the optional marker ""."""
    for v in possible:
        if not (isinstance(v, str) and v == ""):
            return type(v)
    return None


def _type_ok(value: Any, possible: Sequence, expected: type, nested: type | None) -> tuple[bool, bool]:
    """(type accepted, value is a "variable"): BFCL's type rule for one parameter."""
    answer_type = _first_type(possible)
    variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, variable
        # Arrays: the elements must fit the item type against at least one possible list (a possible value that
        # is not a list, e.g. the optional marker, sets no constraint).
        for option in possible:
            if not isinstance(option, list) or all(_type_ok(x, option, nested, None)[0] for x in value):
                return True, variable
        return False, variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, variable


def _dict_ok(value: dict, possible: Sequence) -> bool:
    for option in possible:
        if isinstance(option, str) and option == "":
            continue
        if not isinstance(option, dict):
            continue
        ok = True
        for key, v in value.items():
            if key not in option or _std(v) not in [_std(x) for x in option[key]]:
                ok = False
                break
        if ok and all(key in value or "" in vals for key, vals in option.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, possible: Sequence) -> bool:
    for option in possible:
        option = option if isinstance(option, list) else []  # "" (optional) reads as an empty list
        if len(option) == len(value) and all(isinstance(v, dict) and _dict_ok(v, [o]) for v, o in zip(value, option)):
            return True
    return False


def _list_ok(value: list, possible: Sequence) -> bool:
    options = [[_std(x) for x in option] for option in possible if isinstance(option, (list, str))]
    return [_std(x) for x in value] in options


def check_call(function: Mapping, call: Mapping[str, Any], answer: Mapping[str, Mapping[str, list]],
               language: str = "python") -> None:
    """Raise CheckError unless `call` ({name: {param: value}}) matches `answer` ({name: {param: [possible]}})
    for the function documented by `function` (BFCL's function doc: name, parameters.properties / required)."""
    name = function["name"]
    possible_params = next(iter(answer.values()))
    if name not in call:
        raise CheckError(f"function {name!r} not called")
    params = call[name]
    props = function.get("parameters", {}).get("properties", {})
    for p in function.get("parameters", {}).get("required", []):
        if p not in params:
            raise CheckError(f"missing required parameter {p!r}")
    types = _TYPES[language]
    for p, value in params.items():
        if p not in props or p not in possible_params:
            raise CheckError(f"unexpected parameter {p!r}")
        possible = possible_params[p]
        type_name = props[p].get("type")
        if type_name not in types:
            raise CheckError(f"parameter {p!r}: type {type_name!r} unknown for {language}")
        expected = types[type_name]
        item_type = props[p].get("items", {}).get("type") if type_name in _NESTED[language] else None
        nested = types.get(item_type) if item_type is not None else None
        if language != "python":
            if not isinstance(value, str):
                raise CheckError(f"parameter {p!r}: {language} values are strings, got {type(value).__name__}")
            value = (java_value if language == "java" else js_value)(value, type_name, item_type)
        elif type_name == "float" and type(value) is int:
            value = float(value)  # Python accepts an int where a float is declared
        ok, variable = _type_ok(value, possible, expected, nested)
        if not ok:
            raise CheckError(f"parameter {p!r}: expected type {type_name}, got {type(value).__name__} ({value!r})")
        if not variable:
            if expected is dict:
                if not _dict_ok(value, possible):
                    raise CheckError(f"parameter {p!r}: dict {value!r} not among {possible!r}")
                continue
            if expected is list and nested is dict:
                if not _list_of_dicts_ok(value, possible):
                    raise CheckError(f"parameter {p!r}: {value!r} not among {possible!r}")
                continue
            if expected is str:
                if _std(value) not in [_std(x) for x in possible if isinstance(x, str)]:
                    raise CheckError(f"parameter {p!r}: {value!r} not among {possible!r}")
                continue
            if expected is list:
                if not _list_ok(value, possible):
                    raise CheckError(f"parameter {p!r}: {value!r} not among {possible!r}")
                continue
        if value not in possible:
            raise CheckError(f"parameter {p!r}: {value!r} not among {possible!r}")
    for p, possible in possible_params.items():
        if p not in params and "" not in possible:
            raise CheckError(f"parameter {p!r} left out but not optional")


def is_call_list(calls: Any) -> bool:
    """Decoded output in BFCL's call format: a list of one-key dicts whose value is a dict of parameters."""
    return isinstance(calls, list) and all(
        isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict) for c in calls
    )


def is_empty(calls: Any) -> bool:
    """No call: not in the call format, [] or [{}].

    >>> is_empty([]), is_empty([{}]), is_empty("text"), is_empty([{"f": {}}])
    (True, True, True, False)
    """
    if not isinstance(calls, list):
        return True
    if len(calls) == 0 or (len(calls) == 1 and isinstance(calls[0], dict) and len(calls[0]) == 0):
        return True
    return not is_call_list(calls)


def _find(functions: Sequence[Mapping], name: str) -> Mapping:
    for f in functions:
        if f.get("name") == name:
            return f
    raise CheckError(f"ground-truth function {name!r} is not among the functions")


def check_calls(category: str, functions: Sequence[Mapping], calls: Any,
                ground_truth: Sequence[Mapping] | None) -> tuple[bool, str]:
    """(correct, why not) for one decoded model output of a BFCL `category` (e.g. "parallel", "live_simple").

    >>> fns = [{"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}, "required": ["x"]}}]
    >>> check_calls("simple", fns, [{"f": {"x": 1}}], [{"f": {"x": [1]}}])
    (True, '')
    >>> check_calls("irrelevance", fns, [{"f": {"x": 1}}], None)
    (False, 'a call was made where none should be')
    """
    if "irrelevance" in category:
        return (True, "") if is_empty(calls) else (False, "a call was made where none should be")
    if "relevance" in category:
        return (False, "no call was made") if is_empty(calls) else (True, "")
    if not ground_truth:
        raise ValueError(f"category {category!r} needs a ground truth")
    if not is_call_list(calls):
        return False, "output is not a list of calls"
    language = language_of(category)
    try:
        if "parallel" in category:
            if len(calls) != len(ground_truth):
                raise CheckError(f"{len(calls)} calls for {len(ground_truth)}")
            used: set[int] = set()
            for answer in ground_truth:
                function = _find(functions, next(iter(answer)))
                errors = []
                for i, call in enumerate(calls):
                    if i in used:
                        continue
                    try:
                        check_call(function, call, answer, language)
                    except CheckError as e:
                        errors.append(str(e))
                        continue
                    used.add(i)
                    break
                else:
                    raise CheckError(f"no call matches {next(iter(answer))!r}" + (f" ({errors[0]})" if errors else ""))
        elif "multiple" in category:
            if len(calls) != len(ground_truth):
                raise CheckError(f"{len(calls)} calls for {len(ground_truth)}")
            check_call(_find(functions, next(iter(ground_truth[0]))), calls[0], ground_truth[0], language)
        else:
            if len(calls) != 1:
                raise CheckError(f"{len(calls)} calls for 1")
            check_call(functions[0], calls[0], ground_truth[0], language)
    except CheckError as e:
        return False, str(e)
    return True, ""


# ------------------------------------------------------------------------------------------------ summary


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def bfcl_summary(acc: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    """BFCL v3's summary accuracies from {category: (accuracy, number of problems)}; a summary whose categories
    are not all present is left out.

    >>> s = bfcl_summary({"simple": (1.0, 4), "java": (0.5, 2), "javascript": (0.0, 2), "multiple": (1.0, 2),
    ...                   "parallel": (1.0, 2), "parallel_multiple": (0.5, 2), "irrelevance": (1.0, 2)})
    >>> s["non_live_ast"], s["non_live"], "live" in s    # simple = (1 + .5 + 0) / 3 = .5
    (0.75, 0.8, False)
    """
    out: dict[str, float] = {}
    if all(c in acc for c in ("simple", "java", "javascript")):
        out["non_live_simple"] = _mean([acc[c][0] for c in ("simple", "java", "javascript")])
        ast = ("multiple", "parallel", "parallel_multiple")
        if all(c in acc for c in ast):
            out["non_live_ast"] = _mean([out["non_live_simple"]] + [acc[c][0] for c in ast])
            if "irrelevance" in acc:
                out["non_live"] = _mean([out["non_live_simple"]] + [acc[c][0] for c in ast + ("irrelevance",)])

    def weighted(cats: Sequence[str]) -> float:
        n = sum(acc[c][1] for c in cats)
        return sum(acc[c][0] * acc[c][1] for c in cats) / n

    live_ast = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
    if all(c in acc for c in live_ast):
        out["live_ast"] = weighted(live_ast)
        if all(c in acc for c in ("live_irrelevance", "live_relevance")):
            out["live"] = weighted(live_ast + ("live_irrelevance", "live_relevance"))
    if "non_live" in out and "live" in out:
        out["overall"] = (out["non_live"] + out["live"]) / 2
    if "irrelevance" in acc and "live_irrelevance" in acc:
        out["irrelevance"] = (acc["irrelevance"][0] + acc["live_irrelevance"][0]) / 2
    if "live_relevance" in acc:
        out["relevance"] = acc["live_relevance"][0]
    return out


def canonical(calls: Any) -> str:
    """A stable text for a decoded output (samples.jsonl, and majority voting over identical outputs)."""
    return json.dumps(calls, sort_keys=True, ensure_ascii=False)
