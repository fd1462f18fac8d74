"""`python -m gdpo.eval` end to end: a tiny model on 3 AIME problems (every output file and field), resuming,
data-parallel ranks, custom JSONL, bad input (one line, exit 2) and --help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdpo.eval.__main__ import build_parser, main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "aime2024.jsonl").exists(), reason="needs ../shared/data/aime2024.jsonl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}

SAMPLE_KEYS = {"benchmark", "problem_id", "sample_index", "completion", "extracted_answer", "correct", "length",
               "truncated", "cluster"}
METRIC_KEYS = {"description", "data", "num_problems", "n", "avg@2", "pass@1", "pass@2", "maj@2", "exceed_ratio",
               "exceed_length", "mean_length", "max_length", "truncation_rate", "no_answer_rate"}


def _cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdpo.eval", *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from gdpo.testing import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_ckpt")
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@needs_data
@pytest.mark.slow
def test_tiny_model_on_three_aime_problems(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_ckpt), "--benchmarks", "aime24", "--limit", "3", "--k", "2", "--max-tokens", "16",
            "--data-dir", str(DATA), "--output-dir", str(out), "--grader-workers", "1"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    # stdout: the table, one row for aime24.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["benchmark", "problems", "avg@2", "pass@2", "maj@2", "exceed>4000", "mean_len",
                                "max_len", "trunc"]
    assert lines[1].split()[:2] == ["aime24", "3"]

    # samples.jsonl: 3 problems x 2 samples, in file order, every field typed.
    ids = [json.loads(line)["id"] for line in open(DATA / "aime2024.jsonl")][:3]
    samples = _rows(out / "samples.jsonl")
    assert [(s["problem_id"], s["sample_index"]) for s in samples] == [(i, j) for i in ids for j in (0, 1)]
    for s in samples:
        assert set(s) == SAMPLE_KEYS and s["benchmark"] == "aime24"
        assert isinstance(s["completion"], str) and isinstance(s["correct"], bool)
        assert 1 <= s["length"] <= 16
        assert (s["extracted_answer"] is None) == (s["cluster"] == -1)
        if s["length"] < 16:
            assert not s["truncated"]  # ended on EOS before the limit
        if s["truncated"]:
            assert s["length"] == 16

    # results.json: settings and the metrics, consistent with the samples.
    res = json.loads((out / "results.json").read_text())
    assert res["k"] == 2 and res["length_unit"] == "tokens" and res["exceed_length"] == 4000
    assert res["settings"]["temperature"] == 0.6 and res["settings"]["top_p"] == 0.95
    assert res["settings"]["max_tokens"] == 16 and res["settings"]["chat_template"] is True
    assert res["pass_k"] == [1, 2] and res["maj_k"] == [2]
    assert "Please reason step by step, and put your final answer within \\boxed{}." in res["prompt_example"]
    m = res["benchmarks"]["aime24"]
    assert set(m) == METRIC_KEYS
    assert m["num_problems"] == 3 and m["n"] == 2
    assert m["avg@2"] == pytest.approx(sum(s["correct"] for s in samples) / 6)
    assert m["mean_length"] == pytest.approx(sum(s["length"] for s in samples) / 6)
    assert m["max_length"] == max(s["length"] for s in samples)
    assert m["truncation_rate"] == pytest.approx(sum(s["truncated"] for s in samples) / 6)
    assert m["exceed_ratio"] == 0.0
    assert json.loads((out / "run_config.json").read_text())["fingerprint"]["k"] == 2

    # Rerun: everything is finished, nothing is generated, the files stay as they were.
    before = ((out / "samples.jsonl").read_text(), (out / "results.json").read_text())
    capsys.readouterr()
    assert main(args + ["--no-progress"]) == 0
    assert "0 of 3 problems to evaluate" in capsys.readouterr().err
    assert ((out / "samples.jsonl").read_text(), (out / "results.json").read_text()) == before

    # One more problem: only it is generated; the earlier rows are kept.
    assert main([*args, "--limit", "4", "--no-progress"]) == 0
    assert "1 of 4 problems to evaluate" in capsys.readouterr().err
    rows = _rows(out / "samples.jsonl")
    assert len(rows) == 8 and rows[:6] == samples
    assert json.loads((out / "results.json").read_text())["benchmarks"]["aime24"]["num_problems"] == 4

    # Other settings in the same directory are refused (one line, exit 2).
    assert main([*args, "--k", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output dir") and "k: 2 there, 3 now" in err and "\n" not in err


def _write_custom(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"uid": f"q{i}", "question": f"What is {i} + {i}?", "target": str(2 * i),
                                "sol": f"{i} + {i} = \\boxed{{{2 * i}}}"}) + "\n")


def test_custom_jsonl_with_field_mapping(tmp_path, capsys):
    data = tmp_path / "adds.jsonl"
    _write_custom(data, 4)
    args = ["--oracle", "sol", "--benchmarks", f"adds={data}", "--k", "2", "--output-dir", str(tmp_path / "o"),
            "--grader-workers", "0", "--no-progress"]
    assert main(args + ["--fields", "id=uid,problem=question,answer=target"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["benchmarks"]["adds"]
    assert res["avg@2"] == 1.0 and res["maj@2"] == 1.0 and res["num_problems"] == 4
    assert [r["problem_id"] for r in _rows(tmp_path / "o" / "samples.jsonl")][::2] == ["q0", "q1", "q2", "q3"]
    capsys.readouterr()
    # Without the mapping the missing field is named, with the fix.
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no 'problem' field" in err and "--fields problem=" in err and "\n" not in err


@pytest.mark.slow
def test_data_parallel_ranks_split_and_merge(tmp_path):
    data = tmp_path / "adds.jsonl"
    _write_custom(data, 5)
    out = tmp_path / "dp"
    args = [sys.executable, "-m", "gdpo.eval", "--oracle", "sol", "--benchmarks", f"adds={data}", "--k", "2",
            "--fields", "id=uid,problem=question,answer=target", "--output-dir", str(out), "--grader-workers", "0",
            "--no-progress"]
    procs = [subprocess.Popen(args, env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[1][0] == ""  # only rank 0 reports
    assert "adds" in outs[0][0]
    rows = _rows(out / "samples.jsonl")
    assert [(r["problem_id"], r["sample_index"]) for r in rows] == [(f"q{i}", j) for i in range(5) for j in (0, 1)]
    assert not list(out.glob("samples.rank*.jsonl"))  # merged into samples.jsonl
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["benchmarks"]["adds"]["avg@2"] == 1.0


def test_unknown_benchmark_is_one_line_exit_2():
    proc = _cli("--model", "x", "--benchmarks", "aime2024", timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error: unknown benchmark 'aime2024' (did you mean 'aime24'?); known: aime24, aime25, "
                          "amc23, amc, math500, minerva, olympiad, gsm8k, ")
    assert ", mbpp, humaneval, " in err and ", bfcl_simple, " in err
    assert "groups: bfcl_nonlive, bfcl_live, bfcl, apibank, " in err
    assert err.endswith(", or name=file.jsonl") and "\n" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "MODEL", "--data-dir", "EMPTY"], "error: benchmark 'aime24': data file "),
        (["--model", "NOPE", "--data-dir", "DATA"], "does not exist"),
        (["--model", "EMPTY", "--data-dir", "DATA"], "error: cannot load tokenizer"),
        (["--model", "MODEL", "--data-dir", "DATA", "--pass-k", "1,32"], "--pass-k: every k must be in 1..--k"),
        (["--data-dir", "DATA"], "--model is required"),
        (["--oracle", "solution", "--data-dir", "DATA", "--fallbacks", "boxed"], "--fallbacks: unknown 'boxed'"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, message, tmp_path, capsys, tiny_ckpt):
    (tmp_path / "empty").mkdir()
    subst = {"MODEL": str(tiny_ckpt), "EMPTY": str(tmp_path / "empty"), "NOPE": str(tmp_path / "no" / "ckpt"),
             "DATA": str(DATA)}
    rc = main(["--benchmarks", "aime24", "--output-dir", str(tmp_path / "o")] + [subst.get(x, x) for x in extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and err.startswith("error: ")


def test_vllm_backend_without_vllm_is_one_line(tiny_ckpt, tmp_path, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed")
    except ImportError:
        pass
    data = tmp_path / "adds.jsonl"
    _write_custom(data, 1)
    rc = main(["--model", str(tiny_ckpt), "--backend", "vllm", "--benchmarks", f"adds={data}", "--fields",
               "problem=question,answer=target", "--output-dir", str(tmp_path / "o"), "--grader-workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --backend vllm needs the vllm package") and "\n" not in err


def test_help_documents_every_flag(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 35
    for action in flags:
        assert action.help and len(action.help) > 15, action.option_strings
        assert action.option_strings[0] in text


def test_hub_rows_are_mapped_per_benchmark():
    from gdpo.eval.benchmarks import BENCHMARKS, rows_to_problems

    gsm = rows_to_problems([{"question": "q", "answer": "3 + 4 = 7\n#### 1,007"}], BENCHMARKS["gsm8k"], hub=True,
                           where="hub")
    assert (gsm[0].id, gsm[0].problem, gsm[0].references) == ("0", "q", ("1007",))
    amc = rows_to_problems([{"id": 5, "problem": "p", "answer": 27.0}], BENCHMARKS["amc"], hub=True, where="hub")
    assert (amc[0].id, amc[0].references) == ("5", ("27",))  # hub AMC answers are floats
    oly = rows_to_problems([{"question": "p", "final_answer": ["$1,3$"]}], BENCHMARKS["olympiad"], hub=True,
                           where="hub")
    assert oly[0].references == ("$1,3$",)
    math = rows_to_problems([{"unique_id": "test/x.json", "problem": "p", "answer": "\\frac12", "solution": "s"}],
                            BENCHMARKS["math500"], hub=True, where="hub")
    assert (math[0].id, math[0].solution) == ("test/x.json", "s")


@needs_data
def test_local_files_load_with_every_accepted_answer():
    from gdpo.eval.benchmarks import BENCHMARKS, load_problems

    counts = {name: len(load_problems(b, DATA)) for name, b in BENCHMARKS.items() if b.task in ("math", "code")}
    assert counts == {"aime24": 30, "aime25": 30, "amc23": 40, "amc": 83, "math500": 500, "minerva": 272,
                      "olympiad": 675, "gsm8k": 1319, "mbpp": 500, "humaneval": 164}
    minerva = {p.id: p.references for p in load_problems(BENCHMARKS["minerva"], DATA)}
    rows = [json.loads(line) for line in open(DATA / "minerva.jsonl")]
    assert all(minerva[r["id"]] == tuple(dict.fromkeys(r["answers"])) for r in rows)
    assert sum(len(v) > 1 for v in minerva.values()) > 10
