"""gdpo.eval resumes only into its own samples: run_config.json present, readable and matching (data file and
its sha256 included); anything else is refused in one line and nothing is overwritten."""

import json
from pathlib import Path

import pytest

from gdpo.eval.__main__ import main


def _data(path: Path, n: int = 3, offset: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i + offset),
                                "sol": f"\\boxed{{{2 * i}}}"}) + "\n")
    return path


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--oracle", "sol", "--benchmarks", f"adds={data}", "--k", "1", "--output-dir", str(out),
            "--grader-workers", "0", "--no-progress", *extra]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def done(tmp_path, capsys):
    data = _data(tmp_path / "adds.jsonl")
    out = tmp_path / "out"
    assert main(_args(data, out)) == 0
    capsys.readouterr()
    return data, out


def test_rerun_resumes_and_keeps_run_config_byte_for_byte(done, capsys):
    data, out = done
    cfg = (out / "run_config.json").read_bytes()
    fp = json.loads(cfg)["fingerprint"]["data"]["adds"]
    assert fp["file"] == str(data.resolve()) and len(fp["sha256"]) == 64
    assert main(_args(data, out)) == 0
    assert "0 of 3 problems to evaluate" in capsys.readouterr().err
    assert (out / "run_config.json").read_bytes() == cfg


def test_missing_run_config_next_to_samples_is_refused(done, capsys):
    data, out = done
    (out / "run_config.json").unlink()
    samples = (out / "samples.jsonl").read_bytes()
    assert main(_args(data, out)) == 2
    assert _err(capsys) == (f"error: output dir {out} holds samples.jsonl, results.json but no run_config.json, so "
                            "they cannot be matched to these settings; use another --output-dir or --overwrite")
    assert (out / "samples.jsonl").read_bytes() == samples and not (out / "run_config.json").exists()


@pytest.mark.parametrize("text", ["{not json", '{"other": 1}', '{"fingerprint": 3}', "\udcff"])
def test_damaged_run_config_is_refused_and_left_alone(done, capsys, text):
    data, out = done
    (out / "run_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(_args(data, out)) == 2
    assert _err(capsys) == (f"error: output dir {out}: run_config.json is damaged (no readable fingerprint), so its "
                            "samples cannot be matched to these settings; use another --output-dir or --overwrite")
    assert (out / "run_config.json").read_bytes() == text.encode("utf-8", "surrogateescape")
    assert main(_args(data, out, "--overwrite")) == 0  # the way out named in the message works


def test_changed_data_file_is_refused(done, capsys):
    data, out = done
    _data(data, offset=1)  # same path, other answers
    assert main(_args(data, out)) == 2
    err = _err(capsys)
    assert err.startswith(f"error: output dir {out} holds samples made with other settings (data: ")
    assert err.endswith("; use another --output-dir or --overwrite")


def test_output_dir_that_is_a_file(tmp_path, capsys):
    data = _data(tmp_path / "adds.jsonl")
    f = tmp_path / "results.txt"
    f.write_text("x")
    assert main(_args(data, f)) == 2
    assert _err(capsys) == f"error: --output-dir: {f} is a file; give a directory"
    assert main(_args(data, f / "sub")) == 2
    assert _err(capsys) == f"error: --output-dir: {f / 'sub'} is under {f}, which is a file; give a directory"
    assert f.read_text() == "x"


@pytest.mark.parametrize("flag,value,message", [
    ("--grader-workers", "-1", "error: --grader-workers must be >= 0 (0 = grade in the main process), got -1"),
    ("--grader-timeout", "0", "error: --grader-timeout must be > 0 seconds, got 0.0"),
])
def test_bad_grader_flags(tmp_path, capsys, flag, value, message):
    data = _data(tmp_path / "adds.jsonl")
    args = _args(data, tmp_path / "o")
    i = args.index(flag) if flag in args else None
    if i is not None:
        args[i + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    assert _err(capsys) == message
    assert not (tmp_path / "o").exists()
