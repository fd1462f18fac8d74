"""gdpo.eval.bfcl: one hand-made case (passing and failing) for every rule of BFCL's AST checker, the Java /
JavaScript typed-string conversions and the summary arithmetic."""

import pytest

from gdpo.eval.bfcl import bfcl_summary, check_calls, is_empty, java_value, js_value, standardize


def fn(name, props, required=()):
    return {"name": name, "description": "d", "parameters": {"type": "dict", "properties": props,
                                                             "required": list(required)}}


INT, FLOAT, STR, BOOL = {"type": "integer"}, {"type": "float"}, {"type": "string"}, {"type": "boolean"}
AREA = fn("area", {"base": INT, "height": FLOAT, "unit": STR}, ["base", "height"])
GT = [{"area": {"base": [10], "height": [5.0, 6.0], "unit": ["m", ""]}}]


def ok(category, functions, calls, gt):
    return check_calls(category, functions, calls, gt)[0]


# ---------------------------------------------------------------------------------------------- names, counts


def test_function_name_must_match():
    assert ok("simple", [AREA], [{"area": {"base": 10, "height": 5.0}}], GT)
    valid, why = check_calls("simple", [AREA], [{"volume": {"base": 10, "height": 5.0}}], GT)
    assert not valid and why == "function 'area' not called"


def test_simple_needs_exactly_one_call():
    call = {"area": {"base": 10, "height": 5.0}}
    assert not ok("simple", [AREA], [], GT)
    assert check_calls("simple", [AREA], [call, call], GT) == (False, "2 calls for 1")


def test_multiple_checks_the_ground_truths_function_among_several():
    vol = fn("volume", {"r": FLOAT}, ["r"])
    gt = [{"volume": {"r": [2.0]}}]
    assert ok("multiple", [AREA, vol], [{"volume": {"r": 2.0}}], gt)
    assert not ok("multiple", [AREA, vol], [{"area": {"base": 10, "height": 5.0}}], gt)  # the other function
    assert not ok("multiple", [AREA, vol], [{"volume": {"r": 2.0}}, {"volume": {"r": 2.0}}], gt)  # two calls


def test_parallel_is_order_free_and_uses_each_call_once():
    gt = [{"area": {"base": [1], "height": [1.0]}}, {"area": {"base": [2], "height": [2.0]}}]
    a, b = {"area": {"base": 1, "height": 1.0}}, {"area": {"base": 2, "height": 2.0}}
    assert ok("parallel", [AREA], [b, a], gt)
    assert ok("live_parallel_multiple", [AREA], [a, b], gt)
    assert not ok("parallel", [AREA], [a, a], gt)  # nothing matches the second ground-truth call
    twice = [gt[0], gt[0]]
    assert ok("parallel", [AREA], [a, a], twice)
    assert not ok("parallel", [AREA], [a, b], twice)  # call 0 is used up by the first; b is not a
    assert check_calls("parallel", [AREA], [a], gt) == (False, "1 calls for 2")


def test_output_must_be_a_list_of_calls():
    assert check_calls("simple", [AREA], "area(base=10)", GT) == (False, "output is not a list of calls")
    assert not ok("simple", [AREA], [{"area": {"base": 10}, "x": {}}], GT)  # two keys in one call
    assert not ok("simple", [AREA], [{"area": [10, 5.0]}], GT)  # parameters not a dict


# ----------------------------------------------------------------------------------------------- parameters


def test_required_parameter_missing():
    valid, why = check_calls("simple", [AREA], [{"area": {"base": 10}}], GT)
    assert not valid and why == "missing required parameter 'height'"


def test_unknown_parameter():
    assert check_calls("simple", [AREA], [{"area": {"base": 10, "height": 5.0, "color": "red"}}], GT) == (
        False, "unexpected parameter 'color'")
    # Declared by the function but not listed by the ground truth: also unexpected.
    gt = [{"area": {"base": [10], "height": [5.0]}}]
    assert not ok("simple", [AREA], [{"area": {"base": 10, "height": 5.0, "unit": "m"}}], gt)


def test_optional_marker_lets_a_parameter_be_left_out():
    assert ok("simple", [AREA], [{"area": {"base": 10, "height": 5.0}}], GT)  # unit: ["m", ""]
    assert ok("simple", [AREA], [{"area": {"base": 10, "height": 5.0, "unit": "m"}}], GT)
    # A listed parameter without "" must be given even if the function does not require it.
    gt = [{"area": {"base": [10], "height": [5.0], "unit": ["m"]}}]
    valid, why = check_calls("simple", [AREA], [{"area": {"base": 10, "height": 5.0}}], gt)
    assert not valid and why == "parameter 'unit' left out but not optional"


def test_value_must_be_among_the_possible_answers():
    assert ok("simple", [AREA], [{"area": {"base": 10, "height": 6.0}}], GT)  # the second possible value
    assert not ok("simple", [AREA], [{"area": {"base": 10, "height": 7.0}}], GT)
    assert not ok("simple", [AREA], [{"area": {"base": 11, "height": 5.0}}], GT)


# ---------------------------------------------------------------------------------------------------- types


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert ok("simple", [AREA], [{"area": {"base": 10, "height": 5}}], GT)  # height declared float
    assert not ok("simple", [AREA], [{"area": {"base": 10.0, "height": 5.0}}], GT)  # base declared integer
    assert not ok("simple", [AREA], [{"area": {"base": True, "height": 5.0}}], GT)  # bool is not an int here
    assert not ok("simple", [AREA], [{"area": {"base": "10", "height": 5.0}}], GT)


def test_string_normalisation():
    f = fn("go", {"city": STR}, ["city"])
    gt = [{"go": {"city": ["New York, NY"]}}]
    for said in ("new york ny", "New-York_NY.", "NEW YORK/NY*^"):
        assert ok("simple", [f], [{"go": {"city": said}}], gt), said
    assert not ok("simple", [f], [{"go": {"city": "New York City"}}], gt)
    gt = [{"go": {"city": ['say "hi"']}}]
    assert ok("simple", [f], [{"go": {"city": "say 'hi'"}}], gt)  # ' and " are the same
    assert standardize("A b,c.d/e-f_g*h^i") == "abcdefghi"


def test_lists_compare_element_wise_with_strings_normalised():
    f = fn("tour", {"stops": {"type": "array", "items": {"type": "string"}}}, ["stops"])
    gt = [{"tour": {"stops": [["Paris", "New York"]]}}]
    assert ok("simple", [f], [{"tour": {"stops": ["paris", "new-york"]}}], gt)
    assert not ok("simple", [f], [{"tour": {"stops": ["New York", "Paris"]}}], gt)  # order matters
    assert not ok("simple", [f], [{"tour": {"stops": ["Paris"]}}], gt)


def test_list_elements_are_type_checked():
    f = fn("s", {"xs": {"type": "array", "items": {"type": "integer"}}}, ["xs"])
    gt = [{"s": {"xs": [[1, 2]]}}]
    assert ok("simple", [f], [{"s": {"xs": [1, 2]}}], gt)
    valid, why = check_calls("simple", [f], [{"s": {"xs": [1, 2.0]}}], gt)  # 2.0 == 2, but a float element
    assert not valid and why.startswith("parameter 'xs': expected type array")
    tup = fn("s", {"xs": {"type": "tuple", "items": {"type": "integer"}}}, ["xs"])
    assert ok("simple", [tup], [{"s": {"xs": [1, 2]}}], gt)  # tuples arrive as JSON lists


def test_dicts_compare_key_by_key():
    f = fn("book", {"opts": {"type": "dict"}}, ["opts"])
    gt = [{"book": {"opts": [{"city": ["Paris"], "nights": [2, 3], "pet": ["", True]}]}}]
    assert ok("simple", [f], [{"book": {"opts": {"city": "paris", "nights": 3}}}], gt)  # pet optional
    assert ok("simple", [f], [{"book": {"opts": {"city": "PARIS", "nights": 2, "pet": True}}}], gt)
    assert not ok("simple", [f], [{"book": {"opts": {"city": "Paris", "nights": 4}}}], gt)  # value
    assert not ok("simple", [f], [{"book": {"opts": {"city": "Paris", "nights": 2, "view": "sea"}}}], gt)  # key
    assert not ok("simple", [f], [{"book": {"opts": {"city": "Paris"}}}], gt)  # nights not optional


def test_lists_of_dicts_compare_in_order():
    f = fn("add", {"rows": {"type": "array", "items": {"type": "dict"}}}, ["rows"])
    gt = [{"add": {"rows": [[{"k": ["a"]}, {"k": ["b"]}]]}}]
    assert ok("simple", [f], [{"add": {"rows": [{"k": "a"}, {"k": "B"}]}}], gt)
    assert not ok("simple", [f], [{"add": {"rows": [{"k": "b"}, {"k": "a"}]}}], gt)
    assert not ok("simple", [f], [{"add": {"rows": [{"k": "a"}]}}], gt)


def test_a_variable_name_for_a_typed_parameter_must_match_exactly():
    # The ground truth gives a string (a variable) for an integer parameter: the model's string must equal it.
    f = fn("inc", {"n": INT}, ["n"])
    gt = [{"inc": {"n": ["count"]}}]
    assert ok("simple", [f], [{"inc": {"n": "count"}}], gt)
    assert not ok("simple", [f], [{"inc": {"n": "Count"}}], gt)  # no normalisation for variables
    assert not ok("simple", [f], [{"inc": {"n": 3}}], gt)


# ------------------------------------------------------------------------------------ irrelevance, relevance


def test_irrelevance_means_no_call():
    assert ok("irrelevance", [AREA], [], None)
    assert ok("live_irrelevance", [AREA], "I cannot help with that", None)  # not calls at all: no call
    assert ok("irrelevance", [AREA], [{}], None)
    assert not ok("irrelevance", [AREA], [{"area": {"base": 1}}], None)  # any call, right or wrong
    assert is_empty([{"f": 1}]) and not is_empty([{"f": {}}])


def test_relevance_means_at_least_one_call():
    assert ok("live_relevance", [AREA], [{"area": {"base": 1}}], None)  # values are not checked
    assert check_calls("live_relevance", [AREA], [], None) == (False, "no call was made")


# --------------------------------------------------------------------------------------------------- Java


def java_fn(props, required=None):
    return fn("J.m", props, list(props) if required is None else required)


@pytest.mark.parametrize("text, type_name, nested, value", [
    ("42", "integer", None, 42), ("-7", "short", None, -7), ("4x", "integer", None, "4x"),
    ("12L", "long", None, 12), ("12", "long", None, "12"),
    ("1.5f", "float", None, 1.5), ("3e2F", "float", None, 300.0), ("1.5", "float", None, "1.5"),
    ("2.25", "double", None, 2.25), ("2.25d", "double", None, "2.25d"),
    ("true", "boolean", None, True), ("True", "boolean", None, "True"),
    ("x", "char", None, "x"), ("abc", "String", None, "abc"), ("obj", "any", None, "obj"),
    ("new int[]{1, 2, 3}", "Array", "integer", [1, 2, 3]), ("new String[]{a, b}", "Array", "String", ["a", "b"]),
    ("new Object[]{1, \"x\", true, 2L}", "Array", None, [1, "x", True, 2]), ("new int[]{}", "Array", "integer", []),
    ('new ArrayList<>(Arrays.asList("a", "b"))', "ArrayList", "String", ["a", "b"]),
    ("new ArrayList<Long>() {{ add(1L); add(2L); }}", "ArrayList", "long", [1, 2]),
    ("new ArrayList<>()", "ArrayList", "integer", []), ("[1, 2]", "ArrayList", "integer", "[1, 2]"),
    ('new HashMap<String, Object>() {{ put("a", 1); put("b", "x"); put("c", 2.5); }}', "HashMap", None,
     {"a": 1, "b": "x", "c": 2.5}),
    ("new HashMap<>()", "HashMap", None, {}),
])
def test_java_typed_strings(text, type_name, nested, value):
    assert java_value(text, type_name, nested) == value


def test_java_values_are_strings_converted_then_checked():
    f = java_fn({"n": {"type": "long"}, "xs": {"type": "Array", "items": {"type": "integer"}},
                 "name": {"type": "String"}})
    gt = [{"J.m": {"n": [12], "xs": [[1, 2]], "name": ["Big Table"]}}]
    assert ok("java", [f], [{"J.m": {"n": "12L", "xs": "new int[]{1, 2}", "name": "big-table"}}], gt)
    assert not ok("java", [f], [{"J.m": {"n": 12, "xs": "new int[]{1, 2}", "name": "x"}}], gt)  # not a string
    assert not ok("java", [f], [{"J.m": {"n": "12", "xs": "new int[]{1, 2}", "name": "big table"}}], gt)  # no L
    m = java_fn({"cfg": {"type": "HashMap"}})
    gt = [{"J.m": {"cfg": [{"limit": [50], "mode": ["fast"]}]}}]
    hashmap = 'new HashMap<String, Object>() {{ put("limit", LIMIT); put("mode", "fast"); }}'
    assert ok("java", [m], [{"J.m": {"cfg": hashmap.replace("LIMIT", "50")}}], gt)
    assert not ok("java", [m], [{"J.m": {"cfg": hashmap.replace("LIMIT", '"50"')}}], gt)  # a string, not 50


# --------------------------------------------------------------------------------------------- JavaScript


@pytest.mark.parametrize("text, type_name, nested, value", [
    ("'abc'", "String", None, "abc"), ('"abc"', "String", None, "abc"), ("abc", "String", None, "abc"),
    ("12", "integer", None, 12), ("1.5", "integer", None, "1.5"), ("1.5", "float", None, 1.5),
    ("7", "float", None, 7.0), ("1e3", "float", None, "1e3"), ("12n", "Bigint", None, 12),
    ("12", "Bigint", None, "12"), ("false", "Boolean", None, False), ("x", "any", None, "x"),
    ("[1, 2]", "array", "integer", [1, 2]), ("['a', \"b\"]", "array", "String", ["a", "b"]),
    ("new Array(1, 2)", "array", "integer", [1, 2]), ("[]", "array", "integer", []),
    ("[1, 'two', true]", "array", None, [1, "two", True]), ("[[1, 2], [3, 4]]", "array", None, [[1, 2], [3, 4]]),
    ("{a: 1, 'b': 'x', c: true}", "dict", None, {"a": 1, "b": "x", "c": True}), ("{}", "dict", None, {}),
    ("{n: '5'}", "dict", None, {"n": 5}),  # quotes are stripped before the number is read
    ("nope", "dict", None, "nope"), ("nope", "array", "integer", "nope"),
])
def test_javascript_typed_strings(text, type_name, nested, value):
    assert js_value(text, type_name, nested) == value


def test_javascript_values_are_strings_converted_then_checked():
    f = fn("f", {"ids": {"type": "array", "items": {"type": "String"}}, "big": {"type": "Bigint"},
                 "on": {"type": "Boolean"}}, ["ids", "big", "on"])
    gt = [{"f": {"ids": [["a1", "b2"]], "big": [5], "on": [True]}}]
    assert ok("javascript", [f], [{"f": {"ids": "['a1', 'b2']", "big": "5n", "on": "true"}}], gt)
    assert not ok("javascript", [f], [{"f": {"ids": ["a1", "b2"], "big": "5n", "on": "true"}}], gt)  # a list
    assert not ok("javascript", [f], [{"f": {"ids": "['a1', 'b2']", "big": "5", "on": "true"}}], gt)  # no n


# ------------------------------------------------------------------------------------------------- summary


def test_summary_follows_bfcl_v3_arithmetic():
    acc = {"simple": (0.9, 400), "java": (0.6, 100), "javascript": (0.3, 50), "multiple": (0.8, 200),
           "parallel": (0.7, 200), "parallel_multiple": (0.5, 200), "irrelevance": (1.0, 240),
           "live_simple": (0.5, 10), "live_multiple": (1.0, 30), "live_parallel": (0.0, 5),
           "live_parallel_multiple": (1.0, 5), "live_irrelevance": (0.5, 40), "live_relevance": (1.0, 10)}
    s = bfcl_summary(acc)
    simple = (0.9 + 0.6 + 0.3) / 3  # 0.6: the three simple categories unweighted
    assert s["non_live_simple"] == pytest.approx(0.6)
    assert s["non_live_ast"] == pytest.approx((simple + 0.8 + 0.7 + 0.5) / 4)
    assert s["non_live"] == pytest.approx((simple + 0.8 + 0.7 + 0.5 + 1.0) / 5)  # 0.72
    assert s["live_ast"] == pytest.approx((5 + 30 + 0 + 5) / 50)  # weighted by problems: 0.8
    assert s["live"] == pytest.approx((5 + 30 + 0 + 5 + 20 + 10) / 100)  # 0.7
    assert s["overall"] == pytest.approx((0.72 + 0.7) / 2)
    assert s["irrelevance"] == pytest.approx(0.75) and s["relevance"] == 1.0
    # A summary with a category missing is left out rather than guessed.
    partial = bfcl_summary({k: v for k, v in acc.items() if k != "javascript"})
    assert "non_live" not in partial and "overall" not in partial and partial["live"] == pytest.approx(0.7)
