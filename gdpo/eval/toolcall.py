"""Tool-calling benchmarks in ``python -m gdpo.eval``: BFCL v3 (single-turn, AST) and ToolRL's API-Bank levels.

The glue between the pure scorers (gdpo.eval.bfcl, gdpo.eval.apibank) and the runner: rows -> problems, the
prompt, decoding a response into calls, grading a problem's samples, the oracle's completions and the summaries.

Prompt formats (``--tool-prompt``):
- ``toolrl`` (default): the format configs/tool_gdpo.yaml trains on, as ToolRL evaluates BFCL: its system prompt
  with the tools listed as ``N. Name / Description / Parameters`` (the parameters' JSON schema) and the output format
  ``<think>...</think>`` + ``<tool_call>`` (one ``{"name", "parameters"}`` JSON object per line) and/or
  ``<response>``; the user turn as ``**Dialogue Records History**\\n<user> ... </user>`` with ToolRL's BFCL
  instruction. Calls are read from the last ``<tool_call>`` block, one JSON object per line; a line that does not
  parse, or a call named "None", is dropped. API-Bank rows already hold ToolRL's prompts and are used as they are.
  Format-correct: the response has one of the shapes ToolRL's format reward accepts (think + tool_call, think +
  response, or think + tool_call + response, each tag once).
- ``chat``: the model's own tool format. The functions go to the tokenizer's chat template as ``tools=`` (JSON
  schema types) with the row's messages; calls are read from every ``<tool_call>{"name", "arguments"}</tool_call>``
  block (the Hermes / Qwen2.5 convention). Format-correct: every ``<tool_call>`` block is closed and parses as a
  call. API-Bank is not available in this format (its prompts embed ToolRL's format).

Both apply BFCL's function-doc preprocessing for prompting models first: a language note appended to each
description and, for Java / JavaScript, every parameter declared as a string in the language's syntax.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Mapping, Sequence

from gdpo.eval.apibank import apibank_correct, expected_call, read_calls
from gdpo.eval.benchmarks import is_tool_task
from gdpo.eval.bfcl import bfcl_summary, canonical, check_calls, language_of

TOOL_PROMPTS = ("toolrl", "chat")

# ToolRL's system prompt (the rlla training data and ToolRL's BFCL handler); {tools} is the numbered tool list.
_TOOLRL_CALL_EXAMPLE = (
    '{"name": "Tool name", "parameters": {"Parameter name": "Parameter content", "... ...": "... ..."}}\n'
    '{"name": "... ...", "parameters": {"... ...": "... ...", "... ...": "... ..."}}'
)
TOOLRL_SYSTEM = (
    "You are a helpful multi-turn dialogue assistant capable of leveraging tool calls to solve user tasks and "
    "provide structured chat responses.\n\n**Available Tools**\nIn your response, you can use the following tools:\n"
    "{tools}\n\n**Steps for Each Turn**\n1. **Think:** Recall relevant context and analyze the current user goal.\n"
    "2. **Decide on Tool Usage:** If a tool is needed, specify the tool and its parameters.\n"
    "3. **Respond Appropriately:** If a response is needed, generate one while maintaining consistency across user "
    "queries.\n\n**Output Format**\n```plaintext\n<think> Your thoughts and reasoning </think>\n<tool_call>\n"
    + _TOOLRL_CALL_EXAMPLE
    + "\n...\n</tool_call>\n<response> AI's final response </response>\n```\n\n**Important Notes**\n"
    "1. You must always include the `<think>` field to outline your reasoning. Provide at least one of "
    "`<tool_call>` or `<response>`. Decide whether to use `<tool_call>` (possibly multiple times), `<response>`, "
    "or both.\n2. You can invoke multiple tool calls simultaneously in the `<tool_call>` fields. Each tool call "
    'should be a JSON object with a "name" field and an "parameters" field containing a dictionary of parameters. '
    'If no parameters are needed, leave the "parameters" field an empty dictionary.\n3. Refer to the previous '
    "dialogue records in the history, including the user's queries, previous `<tool_call>`, `<response>`, and any "
    "tool feedback noted as `<obs>` (if exists)."
)
TOOLRL_BFCL_INSTRUCTION = (
    "If there's no appropriate tools to apply or required parameters are missing, please directly inform me in "
    "your response without any tool call, or call the tool with the name as 'None'. Otherwise, you should use one "
    "or more necessary tool calls to complete the given task in this turn."
)

# BFCL type names -> JSON schema types, for chat templates' tools=.
_JSON_SCHEMA = {"integer": "integer", "number": "number", "float": "number", "string": "string",
                "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
                "object": "object", "tuple": "array", "any": "string", "byte": "integer", "short": "integer",
                "long": "integer", "double": "number", "char": "string", "ArrayList": "array", "Array": "array",
                "HashMap": "object", "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string",
                "String": "string", "Bigint": "integer", "Boolean": "boolean"}


def task_kind(task: str) -> tuple[str, str]:
    """("bfcl", category) / ("apibank", "") / ("math", "").

    >>> task_kind("bfcl/live_simple"), task_kind("apibank")
    (('bfcl', 'live_simple'), ('apibank', ''))
    """
    kind, _, category = task.partition("/")
    return kind, category




# ------------------------------------------------------------------------------------------------ prompts


def preprocess_functions(functions: Sequence[Mapping], category: str) -> list[dict]:
    """BFCL's function docs as prompting models see them: a language note on each description; Java / JavaScript
    parameters become strings whose description names the language type."""
    lang = language_of(category)
    note = {"java": " Note that the provided function is in Java 8 SDK syntax.",
            "javascript": " Note that the provided function is in JavaScript syntax."}.get(
        lang, " Note that the provided function is in Python 3 syntax.")
    out = copy.deepcopy(list(functions))
    for f in out:
        f["description"] = str(f.get("description", "")) + note
        if lang == "python":
            continue
        name = "Java" if lang == "java" else "JavaScript"
        for prop in f.get("parameters", {}).get("properties", {}).values():
            t = prop.get("type")
            desc = str(prop.get("description", ""))
            if t == "any":
                desc += f" This parameter can be of any type of {name} object in string representation."
            else:
                desc += f" This is {name} {t} type parameter in string representation."
            if t in ("ArrayList", "Array", "array") and "items" in prop:
                desc += f" The list elements are of type {prop['items'].get('type')}; they are not in string " \
                        "representation."
                del prop["items"]
            if lang == "javascript" and t == "dict" and "properties" in prop:
                desc += " The dictionary entries have the following schema; they are not in string " \
                        f"representation. {json.dumps(prop['properties'])}"
                del prop["properties"]
            prop["description"] = desc
            prop["type"] = "string"
    return out


def toolrl_tools_text(functions: Sequence[Mapping]) -> str:
    """ToolRL's tool list: ``N. Name: ...\\nDescription: ...\\nParameters: {json of the properties}``."""
    return "\n".join(
        f"{i}. Name: {f['name']}\nDescription: {f.get('description', '')}\n"
        f"Parameters: {json.dumps(f.get('parameters', {}).get('properties', {}))}"
        for i, f in enumerate(functions, 1)
    )


def _json_schema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _json_schema(v) for k, v in node.items() if k != "type"}
        t = node.get("type")
        if t is not None:
            out["type"] = _JSON_SCHEMA.get(t, t) if isinstance(t, str) else t
        if "properties" in node and isinstance(node["properties"], dict):
            out["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
        return out
    if isinstance(node, list):
        return [_json_schema(x) for x in node]
    return node


def chat_tools(functions: Sequence[Mapping]) -> list[dict]:
    """The functions as OpenAI-style tools for ``apply_chat_template(tools=...)``."""
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": _json_schema(f.get("parameters", {}))}}
            for f in functions]


def _turn(row: Mapping) -> list[dict]:
    return [dict(m) for m in row["question"][0]]


def toolrl_user_text(messages: Sequence[Mapping]) -> str:
    """ToolRL's user turn for BFCL: the dialogue history with its single-turn instruction (system turns dropped)."""
    text = "**Dialogue Records History**\n"
    for m in messages:
        if m["role"] == "user":
            text += f"<user> {str(m['content']).strip()}\n{TOOLRL_BFCL_INSTRUCTION} </user>\n"
        elif m["role"] == "assistant":
            text += f"\n{str(m['content']).strip()}\n"
    return text.strip()


def tool_messages(task: str, row: Mapping, tool_prompt: str) -> tuple[list[dict], list[dict] | None]:
    """(chat messages, tools for the chat template or None) of one problem."""
    kind, category = task_kind(task)
    if kind == "apibank":
        return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["user"]}], None
    functions = preprocess_functions(row["function"], category)
    if tool_prompt == "chat":
        return _turn(row), chat_tools(functions)
    system = TOOLRL_SYSTEM.replace("{tools}", toolrl_tools_text(functions))
    return [{"role": "system", "content": system}, {"role": "user", "content": toolrl_user_text(_turn(row))}], None


def tool_prompt_text(task: str, row: Mapping, tokenizer, tool_prompt: str, use_chat_template: bool) -> str:
    """The prompt text of one tool problem (through the chat template when `use_chat_template`)."""
    messages, tools = tool_messages(task, row, tool_prompt)
    if not use_chat_template:
        return "\n\n".join(str(m["content"]) for m in messages)
    kwargs = {"tools": tools} if tools is not None else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def check_chat_tools(tokenizer, name: str | None = None) -> None:
    """Refuse a chat template that drops ``tools=`` (the model would never see the functions)."""
    from gdpo.eval.benchmarks import EvalInputError

    probe = "gdpo_probe_function_name"
    tools = [{"type": "function", "function": {"name": probe, "description": "probe", "parameters": {
        "type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that raises on tools= is the same problem
        text = f"({type(e).__name__}: {e})"
    if probe not in str(text):
        raise EvalInputError(f"--tool-prompt chat: the chat template of {name or 'the tokenizer'} does not render "
                             "tools=; use --tool-prompt toolrl")


# ----------------------------------------------------------------------------------------------- decoding


def _named(name: Any) -> bool:
    return isinstance(name, str) and name.strip().lower() != "none"


def decode_toolrl(text: str) -> list[dict]:
    """Calls of ToolRL's format as BFCL calls ``[{name: params}]``: the last ``<tool_call>`` block, one JSON object
    per line; unparsable lines and calls named "None" are dropped; no ``<tool_call>`` = no call.

    >>> decode_toolrl('<think>.</think>\\n<tool_call>\\n{"name": "f", "parameters": {"x": 1}}\\nbad\\n</tool_call>')
    [{'f': {'x': 1}}]
    """
    if "<tool_call>" not in text:
        return []
    out = []
    for line in text.split("<tool_call>")[-1].split("</tool_call>")[0].strip().split("\n"):
        try:
            call = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(call, dict) and _named(call.get("name")) and "parameters" in call:
            out.append({call["name"]: call["parameters"]})
    return out


_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _chat_call(block: str) -> dict | None:
    try:
        call = json.loads(block.strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    return {call["name"]: args} if isinstance(args, dict) else None


def decode_chat(text: str) -> list[dict]:
    """Calls of the Hermes / Qwen2.5 tool format: every ``<tool_call>{"name", "arguments"}</tool_call>`` block.

    >>> decode_chat('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>\\n<tool_call>{"name": "g", '
    ...             '"arguments": "{}"}</tool_call>')
    [{'f': {'x': 1}}, {'g': {}}]
    """
    calls = [_chat_call(b) for b in _BLOCK.findall(text)]
    return [c for c in calls if c is not None and _named(next(iter(c)))]


def format_ok(text: str, tool_prompt: str) -> bool:
    """Whether a response follows the prompt format (see the module docstring).

    >>> format_ok("<think>a</think>\\n<response>b</response>", "toolrl"), format_ok("<response>b</response>", "toolrl")
    (True, False)
    """
    if tool_prompt == "chat":
        if text.count("<tool_call>") != text.count("</tool_call>"):
            return False
        return all(_chat_call(b) is not None for b in _BLOCK.findall(text))
    from gdpo.rewards.formats import format_reward

    shapes = ["<tool_call>", "<response>", "<tool_call><response>"]
    return any(r == 1.0 for r in format_reward([""] * 3, [text] * 3, template="toolrl", ground_truth=shapes))


# ------------------------------------------------------------------------------------------------ grading


def grade_tool_samples(task: str, row: Mapping, texts: Sequence[str], tool_prompt: str) -> tuple:
    """(extracted, correct, clusters, extras) for the samples of one tool problem, as the runner stores them:
    extracted = the decoded calls as canonical JSON ("[]" = no call), clusters = identical outputs share an id,
    extras = per sample {"format_ok", "error"}."""
    from gdpo.eval.metrics import cluster_answers

    kind, category = task_kind(task)
    extracted, correct, extras = [], [], []
    for text in texts:
        text = str(text)
        error = ""
        try:
            if kind == "apibank":
                calls: Any = read_calls(text)
                ok = apibank_correct(text, row["answer"])
            else:
                calls = decode_chat(text) if tool_prompt == "chat" else decode_toolrl(text)
                ok, error = check_calls(category, row["function"], calls, row.get("ground_truth"))
        except Exception as e:  # noqa: BLE001 - odd model output must never stop an evaluation
            calls, ok, error = [], False, f"checker error: {type(e).__name__}: {e}"
        extracted.append(canonical(calls))
        correct.append(bool(ok))
        extras.append({"format_ok": format_ok(text, tool_prompt), "error": error})
    clusters = cluster_answers(extracted, lambda a, b: False)  # identical outputs only
    return extracted, correct, clusters, extras


# ------------------------------------------------------------------------------------------------- oracle

_OMIT = object()


def _pick(possible: Any) -> Any:
    """The first possible value that is not the optional marker ""; _OMIT when there is none."""
    if not isinstance(possible, list):
        return possible
    for v in possible:
        if not (isinstance(v, str) and v == ""):
            return v
    return _OMIT


def _pick_dict(option: Mapping) -> dict:
    out = {}
    for k, vs in option.items():
        v = _pick(vs)
        if v is not _OMIT:
            out[k] = v
    return out


def _java_scalar(v: Any, t: str | None) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if t == "long":
        return f"{int(v)}L"
    if t == "float":
        return f"{float(v)!r}f"
    if t == "double":
        return repr(float(v))
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _java_literal_text(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _java_text(v: Any, t: str, items: str | None) -> str:
    if t == "HashMap" and isinstance(v, dict):
        v = _pick_dict(v)
        puts = " ".join(f"put({json.dumps(k)}, {_java_literal_text(x)});" for k, x in v.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}" if puts else "new HashMap<>()"
    if t == "Array" and isinstance(v, list):
        return "new Object[]{" + ", ".join(_java_scalar(x, items) for x in v) + "}"
    if t == "ArrayList" and isinstance(v, list):
        if not v:
            return "new ArrayList<>()"
        quote = items in ("String", "char")
        return "new ArrayList<>(Arrays.asList(" + ", ".join(
            f'"{x}"' if quote else _java_scalar(x, items) for x in v) + "))"
    return _java_scalar(v, t)


def _js_number(v: float) -> str:
    text = repr(float(v))
    if "e" in text or "inf" in text or "nan" in text:
        text = f"{float(v):.15f}".rstrip("0")
        text += "0" if text.endswith(".") else ""
    return text


def _js_literal_text(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_js_literal_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_js_literal_text(x)}" for k, x in v.items()) + "}"
    return _js_number(v) if isinstance(v, float) else str(v)


def _js_text(v: Any, t: str, items: str | None) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if t == "Bigint":
        return f"{int(v)}n"
    if t == "float":
        return _js_number(v)
    if t == "dict" and isinstance(v, dict):
        return _js_literal_text(_pick_dict(v))
    if t == "array" and isinstance(v, list):
        if items is None or any(isinstance(x, list) for x in v):
            return _js_literal_text(v)
        return "[" + ", ".join(json.dumps(x) if isinstance(x, str) else _js_text(x, items, None) for x in v) + "]"
    return str(v)


def _oracle_value(possible: Any, prop: Mapping, language: str) -> Any:
    v = _pick(possible)
    if v is _OMIT:
        return _OMIT
    t = prop.get("type")
    items = prop.get("items", {}).get("type") if isinstance(prop.get("items"), dict) else None
    if language == "java":
        return _java_text(v, t, items)
    if language == "javascript":
        return _js_text(v, t, items)
    if t == "dict" and isinstance(v, dict):
        return _pick_dict(v)
    if t in ("array", "tuple") and items == "dict" and isinstance(v, list):
        return [_pick_dict(d) if isinstance(d, dict) else d for d in v]
    return v


def oracle_calls(task: str, row: Mapping, field: str = "ground_truth") -> list[tuple[str, dict]] | None:
    """The ground truth as concrete calls [(name, arguments)]: for each parameter its first possible value
    (optional-only ones left out), Java / JavaScript values written in the language's syntax. None when the row
    has no ground truth (irrelevance / relevance)."""
    kind, category = task_kind(task)
    if kind == "apibank":
        call = expected_call(row[field] if field in row else row["answer"])
        return [(call["name"], dict(call["parameters"]))]
    gt = row.get(field)
    if gt is None:
        return None
    language = language_of(category)
    functions = {f["name"]: f for f in row["function"]}
    single = "parallel" not in category and "multiple" not in category
    calls = []
    for entry in gt:
        name, params = next(iter(entry.items()))
        # BFCL checks single-function categories against the one documented function, whatever name the ground
        # truth gives it (a few rows disagree); parameters the doc does not declare would be "unexpected".
        doc = row["function"][0] if single else functions.get(name, {})
        name = doc.get("name", name)
        props = doc.get("parameters", {}).get("properties", {})
        args = {}
        for p, possible in params.items():
            v = _oracle_value(possible, props[p], language) if p in props else _OMIT
            if v is not _OMIT:
                args[p] = v
        calls.append((name, args))
    return calls


def render_calls(calls: list[tuple[str, dict]] | None, tool_prompt: str) -> str:
    """Calls as a response in the prompt format; None = a response that makes no call."""
    if tool_prompt == "chat":
        if not calls:
            return "None of the given functions applies."
        return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False)
                         + "\n</tool_call>" for n, a in calls)
    if not calls:
        return "<think>No function applies.</think>\n<response>None of the given functions applies.</response>"
    lines = "\n".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
    return f"<think>The ground truth.</think>\n<tool_call>\n{lines}\n</tool_call>"


def oracle_text(task: str, row: Mapping, field: str, tool_prompt: str) -> str:
    """The oracle's completion for one tool problem: its ground truth (`field`: ground_truth, or answer for
    API-Bank) rendered in the prompt format; rows without a ground truth get a response without a call."""
    if field not in ("ground_truth", "answer"):
        from gdpo.eval.benchmarks import EvalInputError

        raise EvalInputError(f"--oracle {field}: tool-calling benchmarks take --oracle ground_truth")
    return render_calls(oracle_calls(task, row, "answer" if task == "apibank" else "ground_truth"), tool_prompt)


# ---------------------------------------------------------------------------------------------- summaries


def tool_results(benches: dict, rows: Mapping[tuple[str, str, int], dict], runs: Sequence, k: int,
                 groups: Mapping[str, Sequence[str]]) -> dict:
    """Adds accuracy (= avg@k) and format_correct to each tool benchmark of `benches` (in place) and returns the
    summaries of the tool `groups` whose benchmarks were all evaluated."""
    tasks: dict[str, str] = {}
    for run in runs:
        task = run.benchmark.task
        if not is_tool_task(task):
            continue
        name = run.benchmark.name
        tasks[name] = task
        flags = [bool(rows[(name, p.id, j)].get("format_ok")) for p in run.problems for j in range(k)]
        benches[name]["accuracy"] = benches[name][f"avg@{k}"]
        benches[name]["format_correct"] = sum(flags) / len(flags)
    out: dict = {}
    for group, members in groups.items():
        if not members or not all(m in tasks for m in members):
            continue
        n = {m: benches[m]["num_problems"] for m in members}
        fmt = sum(benches[m]["format_correct"] * n[m] for m in members) / sum(n.values())
        if task_kind(tasks[members[0]])[0] == "bfcl":
            acc = {task_kind(tasks[m])[1]: (benches[m]["accuracy"], n[m]) for m in members}
            summary = bfcl_summary(acc)
        else:  # API-Bank: ToolRL's overall accuracy pools the rows of every level
            summary = {"overall": sum(benches[m]["accuracy"] * n[m] for m in members) / sum(n.values())}
        out[group] = {**summary, "format_correct": fmt, "num_problems": sum(n.values()), "benchmarks": list(members)}
    return out


_LABELS = [("non_live", "Non-Live"), ("live", "Live"), ("overall", "Overall"), ("non_live_ast", "Non-Live AST"),
           ("live_ast", "Live AST"), ("irrelevance", "Irrelevance"), ("relevance", "Relevance"),
           ("format_correct", "format")]


def format_tool_table(results: dict) -> list[str]:
    """Lines for the tool benchmarks of results.json: accuracy and format-correct per benchmark, then the groups."""
    benches = {n: m for n, m in results["benchmarks"].items() if "format_correct" in m}
    if not benches:
        return []
    width = max(len(n) for n in benches) + 2
    lines = ["", "tool calling".ljust(width) + "problems  accuracy  format"]
    for name, m in benches.items():
        lines.append(f"{name.ljust(width)}{m['num_problems']:>8}  {100 * m['accuracy']:>8.1f}  "
                     f"{100 * m['format_correct']:>6.1f}")
    for group, s in results.get("groups", {}).items():
        parts = [f"{label} {100 * s[key]:.1f}" for key, label in _LABELS if key in s]
        lines.append(f"{group} ({s['num_problems']} problems): " + ", ".join(parts))
    lines.append("(accuracy = avg@k in %; format = share of responses in the prompt's format)")
    return lines


# ------------------------------------------------------------------------------------------------ loading


def tool_problems(rows: Sequence[Mapping], b, where: str) -> list:
    """A tool benchmark's rows -> Problems (row kept whole; id = BFCL's id, or the row number for API-Bank, as
    ToolRL numbers them). A row without the fields its task needs is an input error naming the row."""
    from gdpo.eval.benchmarks import EvalInputError, Problem

    kind, category = task_kind(b.task)
    needs = ("system", "user", "answer") if kind == "apibank" else ("id", "question", "function")
    if kind == "bfcl" and "relevance" not in category:  # irrelevance and relevance have no ground truth
        needs += ("ground_truth",)
    problems, seen = [], set()
    for i, row in enumerate(rows):
        missing = [f for f in needs if f not in row or row[f] is None]
        if missing:
            raise EvalInputError(f"benchmark {b.name!r}: {where} row {i + 1} has no {missing[0]!r} field; "
                                 f"its fields: {', '.join(map(str, row))}")
        if kind == "apibank":
            try:
                expected_call(row["answer"])
            except ValueError as e:
                raise EvalInputError(f"benchmark {b.name!r}: {where} row {i + 1}: {e}") from None
            pid, text = str(i), str(row["user"])
        else:
            turn = row["question"][0] if isinstance(row["question"], list) and row["question"] else None
            if not turn or not isinstance(turn, list) or not all(isinstance(m, dict) and "role" in m for m in turn):
                raise EvalInputError(f"benchmark {b.name!r}: {where} row {i + 1}: 'question' is not a list of "
                                     "turns of chat messages")
            pid = str(row["id"])
            text = next((str(m.get("content", "")) for m in reversed(turn) if m["role"] == "user"), "")
        if pid in seen:
            raise EvalInputError(f"benchmark {b.name!r}: {where} has the id {pid!r} twice; ids must be unique")
        seen.add(pid)
        problems.append(Problem(pid, text, (), None, dict(row), task=b.task))
    if not problems:
        raise EvalInputError(f"benchmark {b.name!r}: {where} has no rows")
    return problems
