"""Tool calling in `python -m gdpo.eval`: decoding both prompt formats, format-correct, the prompts, ToolRL's API-Bank
rule, the oracle on the real BFCL / API-Bank files (ground truth ~100%, shuffled ~0), and the CLI end to end
(results, samples, groups, resume, data parallel, a tiny model, bad input)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdpo.eval.__main__ import main
from gdpo.eval.apibank import apibank_correct, read_calls
from gdpo.eval.toolcall import (TOOLRL_SYSTEM, decode_chat, decode_toolrl, format_ok, grade_tool_samples,
                                oracle_calls, render_calls, tool_messages)

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GDPO_EVAL_DATA_DIR") or REPO / ".." / "shared" / "data")  # the CLI's own env var
TOOL = DATA / "toolcall"
needs_data = pytest.mark.skipif(not (TOOL / "bfcl_v3" / "BFCL_v3_simple.jsonl").exists(),
                                reason="needs ../shared/data/toolcall")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}

# BFCL rows whose ground truth no output can satisfy under BFCL's own rules (so the oracle misses them too):
# the function doc requires a parameter the ground truth does not list (providing it is "unexpected", leaving it
# out "missing"), the ground truth requires a parameter the doc lacks, an ArrayList of `any` elements (strings by
# the Java rules) with int / bool answers, and a HashMap answer given as a bare string instead of a list.
UNREACHABLE = {"live_simple_106-63-0", "live_simple_112-68-0", "live_multiple_507-149-4", "live_multiple_862-181-3",
               "live_multiple_964-207-0", "java_36", "java_64", "java_65"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_data
def test_every_tool_file_loads_with_its_row_count():
    from gdpo.eval.benchmarks import BENCHMARKS, GROUPS, load_problems

    counts = {n: len(load_problems(b, DATA)) for n, b in BENCHMARKS.items() if b.task.startswith(("bfcl/", "apibank"))}
    assert counts == {"bfcl_simple": 400, "bfcl_multiple": 200, "bfcl_parallel": 200, "bfcl_parallel_multiple": 200,
                      "bfcl_java": 100, "bfcl_javascript": 50, "bfcl_irrelevance": 240, "bfcl_live_simple": 258,
                      "bfcl_live_multiple": 1053, "bfcl_live_parallel": 16, "bfcl_live_parallel_multiple": 24,
                      "bfcl_live_irrelevance": 882, "bfcl_live_relevance": 18, "apibank_l1": 399, "apibank_l2": 67,
                      "apibank_l3": 131}
    assert set(GROUPS["bfcl"]) == {n for n in counts if n.startswith("bfcl_")}
    assert set(GROUPS["bfcl_nonlive"]) | set(GROUPS["bfcl_live"]) == set(GROUPS["bfcl"])
    p = load_problems(BENCHMARKS["apibank_l2"], DATA, limit=1)[0]
    assert (p.id, p.task, p.references) == ("0", "apibank", ()) and "skin rash" in p.problem


def test_a_bad_tool_row_is_an_input_error_naming_the_row(tmp_path):
    from gdpo.eval.benchmarks import Benchmark, EvalInputError, load_problems

    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "simple_0", "question": [[{"role": "user", "content": "q"}]],
                                                  "function": []}) + "\n")
    b = Benchmark("t", "t", filename="t.jsonl", task="bfcl/simple")
    with pytest.raises(EvalInputError, match="row 1 has no 'ground_truth' field"):
        load_problems(b, tmp_path)


# ------------------------------------------------------------------------------------------------ decoding


def test_toolrl_decoding_reads_the_last_block_line_by_line():
    text = ('<think>a</think>\n<tool_call>\n{"name": "old", "parameters": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "f", "parameters": {"x": 1}}\nnot json\n{"name": "None", "parameters": {}}\n'
            '{"name": "g"}\n{"name": "h", "parameters": {"y": "z"}}\n</tool_call>')
    assert decode_toolrl(text) == [{"f": {"x": 1}}, {"h": {"y": "z"}}]  # last block; junk, None, no params dropped
    assert decode_toolrl("<think>a</think>\n<response>no tool</response>") == []
    assert decode_toolrl('{"name": "f", "parameters": {}}') == []  # without the tag there is no call


def test_chat_decoding_reads_every_hermes_block():
    text = ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", '
            '"arguments": "{\\"y\\": 2}"}\n</tool_call><tool_call>broken</tool_call>')
    assert decode_chat(text) == [{"f": {"x": 1}}, {"g": {"y": 2}}]
    assert decode_chat("Sorry, none of the tools fits.") == []


def test_format_correct_follows_the_prompt_format():
    call = '<tool_call>\n{"name": "f", "parameters": {}}\n</tool_call>'
    assert format_ok(f"<think>x</think>\n{call}", "toolrl")
    assert format_ok(f"<think>x</think>\n{call}\n<response>done</response>", "toolrl")
    assert format_ok("<think>x</think>\n<response>done</response>", "toolrl")
    assert not format_ok(call, "toolrl")  # no think block
    assert not format_ok("<think>x</think>", "toolrl")  # neither a call nor a response
    assert not format_ok(f"<think>x</think>\n{call}\n{call}", "toolrl")  # a tag twice
    assert format_ok('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "chat")
    assert format_ok("plain answer", "chat")
    assert not format_ok('<tool_call>{"name": "f", "arguments": {}}', "chat")  # unclosed
    assert not format_ok("<tool_call>not json</tool_call>", "chat")


def test_grading_stores_the_calls_format_and_error_per_sample():
    row = {"function": [{"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}, "required": ["x"]}}],
           "ground_truth": [{"f": {"x": [1]}}]}
    good = '<think>.</think>\n<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>'
    texts = [good, good.replace("1}", "2}"), "no format", good]
    extracted, correct, clusters, extras = grade_tool_samples("bfcl/simple", row, texts, "toolrl")
    assert correct == [True, False, False, True]
    assert extracted[0] == '[{"f": {"x": 1}}]' and extracted[2] == "[]"
    assert clusters == [0, 1, 2, 0]  # identical outputs share a cluster (maj@k)
    assert [e["format_ok"] for e in extras] == [True, True, False, True]
    assert extras[1]["error"] == "parameter 'x': 2 not among [1]" and extras[0]["error"] == ""


# ---------------------------------------------------------------------------------------------------- prompts


@needs_data
def test_toolrl_system_prompt_is_the_one_the_tool_recipe_trains_on():
    pre, post = TOOLRL_SYSTEM.split("{tools}")
    train = _rows(TOOL / "toolrl_rlla_4k_test.jsonl")[0]["prompt"][0]["content"]  # configs/tool_gdpo.yaml's data
    assert train.startswith(pre) and train.endswith(post)
    row = _rows(TOOL / "bfcl_v3" / "BFCL_v3_java.jsonl")[0]
    messages, tools = tool_messages("bfcl/java", row, "toolrl")
    assert tools is None and [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert system.startswith(pre) and system.endswith(post)
    assert "1. Name: GeometryPresentation.createPresentation\nDescription: " in system
    assert "Note that the provided function is in Java 8 SDK syntax." in system
    assert '"type": "string"' in system and "Java object in string representation" in system
    user = messages[1]["content"]
    assert user.startswith("**Dialogue Records History**\n<user> Help me initialize") and user.endswith("</user>")


@needs_data
def test_chat_prompt_passes_the_functions_as_json_schema_tools():
    row = _rows(TOOL / "bfcl_v3" / "BFCL_v3_simple.jsonl")[0]
    messages, tools = tool_messages("bfcl/simple", row, "chat")
    assert messages == row["question"][0]
    fn = tools[0]["function"]
    assert tools[0]["type"] == "function" and fn["name"] == "calculate_triangle_area"
    assert fn["parameters"]["type"] == "object" and fn["parameters"]["properties"]["base"]["type"] == "integer"
    assert fn["description"].endswith("Note that the provided function is in Python 3 syntax.")


# --------------------------------------------------------------------------------------------------- API-Bank


def test_apibank_accuracy_follows_toolrl():
    ans = [{"name": "Search", "parameters": {"q": "rash"}}]
    call = '{"name": "Search", "parameters": {"q": "rash"}}'
    assert apibank_correct(f"<think>.</think>\n<tool_call>\n{call}\n</tool_call>", ans)
    assert apibank_correct(f"<tool_call>\n{{\"name\": \"Other\", \"parameters\": {{}}}}\n{call}\n</tool_call>", ans)
    assert apibank_correct(call, ans)  # no tag: the lines of the whole text are read
    assert apibank_correct('<tool_call>\n{"q": "rash"}\n</tool_call>', ans)  # bare parameters: the expected name
    assert apibank_correct(f"<tool_call>\n{json.dumps(call)}\n</tool_call>", ans)  # a JSON string holding the call
    assert apibank_correct(f"<tool_call>\n{call}\n</tool_call>", ans[0])  # level 2 stores the call itself
    assert not apibank_correct('<tool_call>\n{"name": "Search", "parameters": {"q": "Rash"}}\n</tool_call>', ans)
    assert not apibank_correct('<tool_call>\n{"name": "Search", "parameters": {"q": "rash", "n": 1}}\n</tool_call>',
                               ans)  # exact equality, no extra keys
    assert not apibank_correct(f"<tool_call>\n7\n{call}\n</tool_call>", ans)  # a number stops ToolRL's scan
    assert read_calls("<tool_call>\n\n[1]\n</tool_call>") == [[1]]


# ----------------------------------------------------------------------------------------------------- oracle


def test_oracle_renders_first_possible_values_in_each_language():
    fns = [{"name": "J.m", "parameters": {"properties": {
        "n": {"type": "long"}, "xs": {"type": "ArrayList", "items": {"type": "String"}}, "m": {"type": "HashMap"},
        "opt": {"type": "String"}}}}]
    row = {"function": fns, "ground_truth": [{"J.m": {"n": ["", 5], "xs": [["a", "b"]], "m": [{"k": [1]}],
                                                      "opt": [""]}}]}
    assert oracle_calls("bfcl/java", row) == [("J.m", {"n": "5L", "xs": 'new ArrayList<>(Arrays.asList("a", "b"))',
                                                        "m": 'new HashMap<String, Object>() {{ put("k", 1); }}'})]
    assert render_calls(None, "toolrl").startswith("<think>")  # no ground truth: a response without a call
    assert decode_toolrl(render_calls([("f", {"x": 1})], "toolrl")) == [{"f": {"x": 1}}]
    assert decode_chat(render_calls([("f", {"x": 1})], "chat")) == [{"f": {"x": 1}}]


def _oracle(out: Path, benchmarks: str, *extra: str) -> dict:
    rc = main(["--oracle", "ground_truth", "--benchmarks", benchmarks, "--k", "1", "--data-dir", str(DATA),
               "--output-dir", str(out), "--grader-workers", "0", "--no-progress", *extra])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


@needs_data
@pytest.mark.parametrize("tool_prompt", ["toolrl", "chat"])
def test_oracle_ground_truth_scores_every_reachable_row(tmp_path, tool_prompt):
    benches = "bfcl" + (",apibank" if tool_prompt == "toolrl" else "")
    res = _oracle(tmp_path, benches, "--tool-prompt", tool_prompt)
    samples = _rows(tmp_path / "samples.jsonl")
    assert len(samples) == 3641 + (597 if tool_prompt == "toolrl" else 0)
    missed = {s["problem_id"] for s in samples if not s["correct"] and s["benchmark"] != "bfcl_live_relevance"}
    assert missed == UNREACHABLE
    b = res["benchmarks"]
    for name, m in b.items():
        assert m["format_correct"] == 1.0, name
        unreachable = sum(1 for s in samples if s["benchmark"] == name and s["problem_id"] in UNREACHABLE)
        if name != "bfcl_live_relevance":
            assert m["accuracy"] == pytest.approx(1 - unreachable / m["num_problems"]), name
    assert b["bfcl_live_relevance"]["accuracy"] == 0.0  # no ground truth: the oracle makes no call
    g = res["groups"]["bfcl"]
    assert g["non_live"] == pytest.approx(((1 + 0.97 + 1) / 3 + 4) / 5)  # java 97/100, javascript 50/50
    assert g["live"] == pytest.approx((2251 - 5 - 18) / 2251)
    assert g["overall"] == pytest.approx((g["non_live"] + g["live"]) / 2)
    assert g["num_problems"] == 3641 and g["format_correct"] == 1.0
    assert res["groups"]["bfcl_nonlive"]["non_live"] == g["non_live"]
    if tool_prompt == "toolrl":
        assert res["groups"]["apibank"]["overall"] == 1.0
        assert all(b[f"apibank_l{i}"]["accuracy"] == 1.0 for i in (1, 2, 3))


@needs_data
def test_oracle_shuffled_across_rows_scores_about_zero(tmp_path):
    res = _oracle(tmp_path, "bfcl,apibank", "--oracle-shuffle")
    b = res["benchmarks"]
    ast = [n for n in b if "relevance" not in n]  # categories with a ground truth
    for name in ast:
        assert b[name]["accuracy"] <= 0.2, name  # live_parallel (16 rows, several alike) is the highest
    pooled = sum(b[n]["accuracy"] * b[n]["num_problems"] for n in ast) / sum(b[n]["num_problems"] for n in ast)
    assert pooled < 0.01
    assert b["bfcl_irrelevance"]["accuracy"] == 1.0  # every row there is "no call", shuffled or not
    assert res["groups"]["apibank"]["overall"] < 0.02


# -------------------------------------------------------------------------------------------------------- CLI


@needs_data
def test_cli_bfcl_simple_oracle_end_to_end(tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "gdpo.eval", "--benchmarks", "bfcl_simple", "--oracle", "ground_truth", "--limit",
            "20", "--k", "2", "--data-dir", str(DATA), "--output-dir", str(out), "--grader-workers", "1",
            "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = [i for i, line in enumerate(lines) if line.split()[:3] == ["tool", "calling", "problems"]][0]
    assert lines[head + 1].split() == ["bfcl_simple", "20", "100.0", "100.0"]
    res = json.loads((out / "results.json").read_text())
    m = res["benchmarks"]["bfcl_simple"]
    assert (m["num_problems"], m["accuracy"], m["avg@2"], m["pass@2"], m["maj@2"], m["format_correct"]) == (
        20, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert res["settings"]["tool_prompt"] == "toolrl" and res["groups"] == {}
    samples = _rows(out / "samples.jsonl")
    ids = [r["id"] for r in _rows(TOOL / "bfcl_v3" / "BFCL_v3_simple.jsonl")][:20]
    assert [(s["problem_id"], s["sample_index"]) for s in samples] == [(i, j) for i in ids for j in (0, 1)]
    s = samples[0]
    assert s["correct"] and s["format_ok"] and s["error"] == "" and s["cluster"] == 0
    assert json.loads(s["extracted_answer"]) == [{"calculate_triangle_area": {"base": 10, "height": 5,
                                                                              "unit": "units"}}]
    # Shuffled (in-process this time): each problem gets another's ground truth.
    inproc = [x if x != "1" else "0" for x in args[3:]]  # --grader-workers 0: no fork pool inside pytest
    assert main(inproc + ["--oracle-shuffle", "--output-dir", str(tmp_path / "s")]) == 0
    m = json.loads((tmp_path / "s" / "results.json").read_text())["benchmarks"]["bfcl_simple"]
    assert m["accuracy"] == 0.0 and m["format_correct"] == 1.0


@needs_data
def test_groups_summaries_resume_and_flags(tmp_path, capsys):
    out = tmp_path / "g"
    args = ["--oracle", "ground_truth", "--benchmarks", "bfcl_live,bfcl_nonlive,bfcl_simple", "--limit", "3",
            "--k", "1", "--data-dir", str(DATA), "--output-dir", str(out), "--grader-workers", "0", "--no-progress"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["benchmarks"]) == 13  # the groups' members, each once
    b = res["benchmarks"]
    acc = {n[len("bfcl_"):]: m["accuracy"] for n, m in b.items()}
    g = res["groups"]["bfcl"]
    assert g["non_live"] == pytest.approx((acc["simple"] + acc["java"] + acc["javascript"]) / 15
                                          + (acc["multiple"] + acc["parallel"] + acc["parallel_multiple"]
                                             + acc["irrelevance"]) / 5)
    live = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
            "live_relevance"]
    assert g["live"] == pytest.approx(sum(acc[c] for c in live) / 6)  # 3 problems each: weights are equal
    assert g["overall"] == pytest.approx((g["non_live"] + g["live"]) / 2)
    assert set(res["groups"]) == {"bfcl", "bfcl_live", "bfcl_nonlive"}
    table = capsys.readouterr().out
    assert "bfcl (39 problems): Non-Live " in table and "Overall " in table
    # Rerun: nothing left to do, files unchanged.
    before = (out / "samples.jsonl").read_text()
    assert main(args) == 0
    assert "0 of 39 problems to evaluate" in capsys.readouterr().err
    assert (out / "samples.jsonl").read_text() == before
    # Another tool prompt in the same directory is refused.
    assert main(args + ["--tool-prompt", "chat"]) == 2
    assert "tool_prompt: 'toolrl' there, 'chat' now" in capsys.readouterr().err


@needs_data
@pytest.mark.parametrize("extra, message", [
    (["--benchmarks", "apibank", "--tool-prompt", "chat"], "--tool-prompt chat: apibank_l1 holds ToolRL-format"),
    (["--benchmarks", "bfcl_simple", "--system-prompt", "hi"], "--system-prompt applies to math benchmarks only"),
    (["--benchmarks", "bfcl_simple", "--oracle", "solution"], "--oracle solution: tool-calling benchmarks"),
    (["--benchmarks", "bfcl_simpel"], "unknown benchmark 'bfcl_simpel' (did you mean 'bfcl_simple'?)"),
])
def test_bad_tool_input_is_one_line_exit_2(extra, message, tmp_path, capsys):
    args = ["--data-dir", str(DATA), "--output-dir", str(tmp_path / "o"), "--grader-workers", "0"]
    if "--oracle" not in extra:
        args += ["--oracle", "ground_truth"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@needs_data
def test_oracle_cannot_mix_math_and_tool_benchmarks(tmp_path, capsys):
    assert main(["--oracle", "ground_truth", "--benchmarks", "math500,bfcl_simple", "--data-dir", str(DATA),
                 "--output-dir", str(tmp_path)]) == 2
    assert "read different fields (solution / ground_truth); run them separately" in capsys.readouterr().err


@needs_data
def test_chat_tool_prompt_refuses_a_template_that_drops_tools(tmp_path, capsys):
    from gdpo.testing import tiny_tokenizer

    tok = tiny_tokenizer()  # its Qwen2-style template has no tools section
    tok.save_pretrained(tmp_path / "ckpt")  # the check comes before the model would load
    rc = main(["--model", str(tmp_path / "ckpt"), "--benchmarks", "bfcl_simple", "--tool-prompt", "chat",
               "--data-dir", str(DATA), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not render tools=; use --tool-prompt toolrl" in err and "\n" not in err
    tok.chat_template = ("{% for t in tools %}{{ t.function.name }}\n{% endfor %}{% for m in messages %}"
                         "{{ m.content }}{% endfor %}")
    from gdpo.eval.toolcall import check_chat_tools

    check_chat_tools(tok)  # a template that renders tools passes


def test_tool_benchmarks_without_a_data_dir_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GDPO_EVAL_DATA_DIR", raising=False)
    assert main(["--oracle", "ground_truth", "--benchmarks", "bfcl_simple", "--output-dir", str(tmp_path)]) == 2
    assert "benchmark 'bfcl_simple' has no hub copy; set --data-dir" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_tool_benchmarks_split_across_ranks_and_merge(tmp_path):
    out = tmp_path / "dp"
    args = [sys.executable, "-m", "gdpo.eval", "--oracle", "ground_truth", "--benchmarks", "bfcl_parallel,apibank_l2",
            "--limit", "5", "--k", "1", "--data-dir", str(DATA), "--output-dir", str(out), "--grader-workers", "0",
            "--no-progress"]
    procs = [subprocess.Popen(args, env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = _rows(out / "samples.jsonl")
    assert [r["benchmark"] for r in rows] == ["bfcl_parallel"] * 5 + ["apibank_l2"] * 5
    assert all(r["correct"] and r["format_ok"] for r in rows) and not list(out.glob("samples.rank*.jsonl"))
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["benchmarks"]["apibank_l2"]["accuracy"] == 1.0


@needs_data
@pytest.mark.slow
def test_tiny_model_on_bfcl_and_apibank(tmp_path):
    from gdpo.testing import tiny_model, tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "gdpo.eval", "--model", str(ckpt), "--benchmarks",
                           "bfcl_irrelevance,apibank_l3", "--limit", "2", "--k", "2", "--max-tokens", "8",
                           "--data-dir", str(DATA), "--output-dir", str(out), "--grader-workers", "1",
                           "--no-progress"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["prompt_example"].startswith("<|im_start|>system\nYou are a helpful multi-turn dialogue assistant")
    assert "1. Name: " in res["prompt_example"] and "<user> " in res["prompt_example"]
    samples = _rows(out / "samples.jsonl")
    assert len(samples) == 8 and all(1 <= s["length"] <= 8 for s in samples)
    b = res["benchmarks"]
    # 8 random tokens are neither a call nor the format: right on irrelevance, wrong on API-Bank.
    assert b["bfcl_irrelevance"]["accuracy"] == 1.0 and b["apibank_l3"]["accuracy"] == 0.0
    assert b["bfcl_irrelevance"]["format_correct"] == 0.0


@needs_data
@pytest.mark.slow
def test_wandb_offline_logs_the_tool_summaries(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "gdpo.eval", "--oracle", "ground_truth", "--benchmarks", "apibank",
                           "--limit", "3", "--k", "1", "--data-dir", str(DATA), "--output-dir", str(out),
                           "--grader-workers", "0", "--no-progress", "--wandb", "offline"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr
    logs = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    for key in (b"apibank/overall", b"apibank/format_correct", b"apibank_l2/accuracy", b"apibank_l3/format_correct"):
        assert key in data, key
