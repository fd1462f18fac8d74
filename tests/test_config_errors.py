"""Every config mistake a careless user makes is one line naming the key and what is allowed, exit code 2.

Table-driven: each case is a config file (text or raw bytes) plus overrides, run through `train.py --check`
in-process (`main([...])`; a few also as a subprocess), and the whole stderr must be that one line. The
table is the regression suite for the probe of issue 13 (figures in README "Reliability").
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdpo.config import ConfigError, load_config
from gdpo.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)

GOOD = """\
model: {name_or_path: demo}
data: {path: demo}
rewards:
  num_workers: 1
  functions:
    - {name: correct, fn: math_correct}
    - {name: short, fn: length, kwargs: {max_tokens: 20}, condition: {on: correct}}
train: {steps: 2, run_dir: RUN}
"""


def _model_dir(root: Path, model_type: str, *, weights: bool = True, tokenizer: str | None = None) -> Path:
    """A directory that looks like a saved model (config.json, an empty weights file) with a broken tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer}))
    return root


def _checkpoint_like_run(run: Path) -> Path:
    """A run dir that holds another run: one complete checkpoint and metrics."""
    ck = run / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text('{"step": 2}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


# (id, config file: str / bytes / None = GOOD, overrides, setup(tmp) -> None, expected stderr line)
# {tmp} in overrides and messages is the test's tmp_path, {run} its run dir.
CASES = [
    ("non-utf8-file", b"model:\n  name_or_path: \xff\xfe\n", [], None,
     "config file '{cfg}' is not UTF-8 text (byte 0xff at offset 23); save it as UTF-8"),
    ("binary-file", b"\x7fELF\x02\x01\x01\x00\x00\x00" * 8, [], None,
     "config file '{cfg}' is a binary file, not YAML text"),
    ("scalar-section", "model: 5\n", [], None, "model: got 5, expected a mapping (ModelConfig)"),
    ("override-under-scalar-section", "model: 5\n", ["model.name_or_path=x"], None,
     "model: got 5, expected a mapping (ModelConfig)"),
    ("override-into-str", None, ["model.name_or_path.foo=1"], None,
     "override 'model.name_or_path.foo=1': 'model.name_or_path' is a single value (str), not a section; "
     "write model.name_or_path=<value>"),
    ("override-into-int", None, ["train.steps.x=1"], None,
     "override 'train.steps.x=1': 'train.steps' is a single value (int), not a section; write train.steps=<value>"),
    ("seed-negative", None, ["train.seed=-1"], None, "train.seed: -1 is out of range; allowed [0, 4294967295]"),
    ("seed-too-big", None, ["train.seed=4294967296"], None,
     "train.seed: 4294967296 is out of range; allowed [0, 4294967295]"),
    ("duplicate-top-level-key", GOOD + "train: {steps: 5}\n", [], None,
     "{cfg}: line 9: duplicate key 'train' (the later one would silently replace the earlier); give each key once"),
    ("duplicate-nested-key", "train:\n  steps: 3\n  steps: 4\n", [], None,
     "{cfg}: line 3: duplicate key 'steps' (the later one would silently replace the earlier); give each key once"),
    ("builtin-unknown-kwarg", None, ["rewards.functions.1.kwargs={{max_token: 20}}"], None,
     "rewards.functions.1.kwargs: reward 'short': unknown kwargs ['max_token'] for length; "
     "allowed: graded, margin, max_tokens"),
    ("attn-implementation", None, ["model.attn_implementation=flash"], None,
     "model.attn_implementation: got 'flash', expected one of 'eager', 'sdpa', 'flash_attention_2', "
     "'flash_attention_3', 'flex_attention' or null"),
    ("triton-without-cuda", None, ["advantage.backend=triton"], None,
     "advantage.backend: triton needs CUDA and the triton package (or TRITON_INTERPRET=1 for CPU tests); this "
     "machine has no GPU; use auto or torch"),
    ("run-dir-under-a-file", None, ["train.run_dir={tmp}/afile/run"], lambda t: (t / "afile").write_text("x"),
     "train.run_dir: '{tmp}/afile/run' is not writable: {tmp}/afile is a file, not a directory"),
    ("run-dir-read-only-fs", None, ["train.run_dir=/proc/gdpo-run"], None,
     "train.run_dir: '/proc/gdpo-run' is not writable: cannot create files in /proc (No such file or directory)"),
    ("resume-not-a-checkpoint", None, ["checkpoint.resume={tmp}/notckpt"], lambda t: (t / "notckpt").mkdir(),
     "checkpoint.resume: '{tmp}/notckpt' is not a checkpoint directory (no trainer_state.json); expected auto, "
     "null or a path such as {run}/checkpoints/step_00000010"),
    ("resume-a-run-dir", None, ["checkpoint.resume={tmp}/old"], lambda t: _checkpoint_like_run(t / "old"),
     "checkpoint.resume: '{tmp}/old' is not a checkpoint directory (no trainer_state.json) (did you mean its latest "
     "checkpoint {tmp}/old/checkpoints/step_00000002?); expected auto, null or a path such as "
     "{run}/checkpoints/step_00000010"),
    ("resume-missing", None, ["checkpoint.resume={tmp}/nope"], None,
     "checkpoint.resume: '{tmp}/nope' does not exist (use auto, null or a path)"),
    ("model-dir-empty", None, ["model.name_or_path={tmp}"], None,
     "model.name_or_path: '{tmp}' holds no model (no config.json); expected a directory written by save_pretrained, "
     "a hub id, or demo"),
    ("model-dir-no-weights", None, ["model.name_or_path={tmp}/m"], lambda t: _model_dir(t / "m", "qwen2",
                                                                                          weights=False),
     "model.name_or_path: '{tmp}/m' holds no weights (no *.safetensors or pytorch_model*.bin next to its "
     "config.json)"),
    ("model-dir-no-backend-tokenizer", None, ["model.name_or_path={tmp}/m"],
     lambda t: _model_dir(t / "m", "llama"),
     "model.name_or_path: cannot load a tokenizer from '{tmp}/m' (ValueError: Couldn't instantiate the backend "
     "tokenizer from one of: )"),
    ("model-dir-empty-vocab", None, ["model.name_or_path={tmp}/m"], lambda t: _model_dir(t / "m", "qwen2"),
     "model.name_or_path: the tokenizer in '{tmp}/m' has no vocabulary (1 tokens); the directory lacks "
     "tokenizer.json / vocab files"),
    ("tokenizer-key-named", None, ["model.tokenizer={tmp}/t"], lambda t: _model_dir(t / "t", "llama"),
     "model.tokenizer: cannot load a tokenizer from '{tmp}/t' (ValueError: Couldn't instantiate the backend "
     "tokenizer from one of: )"),
    ("model-path-missing", None, ["model.name_or_path=./no/such/model"], None,
     "model.name_or_path: './no/such/model' does not exist (expected a local model directory, a hub id such as "
     "Qwen/Qwen2.5-0.5B-Instruct, or demo)"),
    ("model-missing-but-tokenizer-set", None, ["model.name_or_path={tmp}/gone", "model.tokenizer={tmp}/gone2"], None,
     "model.name_or_path: '{tmp}/gone' does not exist (expected a local model directory, a hub id such as "
     "Qwen/Qwen2.5-0.5B-Instruct, or demo)"),
    ("data-file-missing", None, ["data.path=data/nope.jsonl"], None,
     "data.path: 'data/nope.jsonl' does not exist (expected a .jsonl / .json / .parquet file or directory, a hub "
     "dataset id, or demo)"),
    ("unknown-reward-fn", None, ["rewards.functions.0.fn=math_corect"], None,
     "rewards.functions.0.fn: reward 'correct': unknown fn 'math_corect'; allowed: a built-in (code_bug, code_pass, "
     "format, integer, length, math_correct, overlong, toolcall_correct) or 'package.module:function'"),
    ("reward-module-missing", None, ["rewards.functions.0.fn=nopkg.mod:fn"], None,
     "rewards.functions.0.fn: reward 'correct': cannot import module 'nopkg.mod' for fn 'nopkg.mod:fn': "
     "ModuleNotFoundError(\"No module named 'nopkg'\")"),
    ("no-rewards", "model: {name_or_path: demo}\ntrain: {run_dir: RUN}\n", [], None,
     "rewards.functions: no rewards configured; add at least one, e.g. rewards.functions: [{{name: correct, "
     "fn: math_correct}}]"),
    ("empty-file", "", [], None,
     "rewards.functions: no rewards configured; add at least one, e.g. rewards.functions: [{{name: correct, "
     "fn: math_correct}}]"),
    ("fresh-run-into-used-run-dir", None, [], lambda t: _checkpoint_like_run(t / "run"),
     "train.run_dir: {run} already holds a run (1 checkpoint, metrics.jsonl); resume it with "
     "checkpoint.resume=auto, choose another train.run_dir, or set train.overwrite=true to move it aside"),
    ("resume-auto-other-config", None, ["checkpoint.resume=auto", "train.seed=1"],
     lambda t: _used_by_other_config(t / "run"),
     "train.run_dir: {run} holds a run made with another config (train.seed: 0 there, 1 now); use that run's "
     "config to resume it, choose another train.run_dir, or set train.overwrite=true to move it aside"),
]


def _used_by_other_config(run: Path) -> None:
    from gdpo.checkpoint import prepare_run_dir
    from gdpo.config import config_from_dict, to_dict, yaml_load

    cfg = config_from_dict(yaml_load(GOOD.replace("RUN", str(run))))
    prepare_run_dir(run, config=to_dict(cfg), resume=None, overwrite=False)
    _checkpoint_like_run_existing(run)


def _checkpoint_like_run_existing(run: Path) -> None:
    ck = run / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text('{"step": 2}')


def _write_case(tmp_path: Path, text, overrides, setup):
    run = tmp_path / "run"
    cfg = tmp_path / "case.yaml"
    body = GOOD if text is None else text
    if isinstance(body, str):
        cfg.write_text(body.replace("RUN", str(run)))
    else:
        cfg.write_bytes(body)
    if setup is not None:
        setup(tmp_path)
    fmt = {"tmp": str(tmp_path), "run": str(run), "cfg": str(cfg)}
    return cfg, [o.format(**fmt) for o in overrides], fmt


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    # tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines (so the kernel tests run); users do not
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_mistake_is_one_line_and_exit_2(case, tmp_path, capsys, no_triton_interpreter, monkeypatch):
    name, text, overrides, setup, expected = case
    if name == "triton-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is present: triton is allowed")
    if name == "run-dir-read-only-fs" and os.path.exists("/proc/gdpo-run"):
        pytest.skip("unexpected /proc entry")
    cfg, ovr, fmt = _write_case(tmp_path, text, overrides, setup)
    monkeypatch.chdir(tmp_path)  # relative paths (data/nope.jsonl, ./no/such/model) resolve in an empty dir
    rc = train_cli.main(["--check", "--config", str(cfg), *ovr])
    out = capsys.readouterr()
    assert rc == 2, out
    expected_line = "config error: " + expected.format(**fmt)
    if name.endswith("backend-tokenizer") or name == "tokenizer-key-named":  # transformers' text continues
        assert out.err.startswith(expected_line[:-1]) and out.err.count("\n") == 1, out.err
    else:
        assert out.err == expected_line + "\n"
    assert "Traceback" not in out.err and out.out == ""


def test_the_good_config_passes_and_nothing_was_written(tmp_path, capsys):
    cfg, _, _ = _write_case(tmp_path, None, [], None)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train_cli.main(["--check", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out == f"config OK: {cfg}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # --check creates no run dir


def test_overwrite_and_auto_resume_make_the_used_run_dir_acceptable(tmp_path, capsys):
    cfg, _, _ = _write_case(tmp_path, None, [], lambda t: _checkpoint_like_run(t / "run"))
    assert train_cli.main(["--check", "--config", str(cfg), "train.overwrite=true"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # --check moves nothing


def test_code_reward_refuses_without_namespaces_unless_allowed(tmp_path, monkeypatch):
    import gdpo.rewards.sandbox as sb

    monkeypatch.setattr(sb, "sandbox_refusal", lambda: "this host refuses the namespaces the sandbox needs "
                        "(userns: Operation not permitted); allow them: sysctl -w user.max_user_namespaces=15000; or "
                        "set rewards.allow_unsandboxed=true to run it with rlimits only")
    text = GOOD.replace("{name: correct, fn: math_correct}", "{name: correct, fn: code_pass}")
    cfg, _, _ = _write_case(tmp_path, text, [], None)
    with pytest.raises(ConfigError) as e:
        preflight(load_config(cfg))
    assert str(e.value) == (
        "rewards.functions.0.fn: code_pass runs generated code, but this host refuses the namespaces the sandbox "
        "needs (userns: Operation not permitted); allow them: sysctl -w user.max_user_namespaces=15000; or set "
        "rewards.allow_unsandboxed=true to run it with rlimits only")
    preflight(load_config(cfg, ["rewards.allow_unsandboxed=true"]))  # the escape hatch


def test_code_reward_passes_where_namespaces_work(tmp_path):
    from gdpo.rewards.sandbox import isolation

    if isolation()["namespaces"] == "none":
        pytest.skip("this host refuses namespaces")
    text = GOOD.replace("{name: correct, fn: math_correct}", "{name: correct, fn: code_pass}")
    cfg, _, _ = _write_case(tmp_path, text, [], None)
    preflight(load_config(cfg))


def test_reward_kwargs_checked_against_the_signature():
    from gdpo.rewards.bank import check_reward_kwargs
    from gdpo.rewards.code import code_pass

    def strict(prompts, completions, *, completion_lengths=None, scale=1.0):
        return [scale] * len(completions)

    def open_ended(prompts, completions, **kw):
        return [1.0] * len(completions)

    check_reward_kwargs(strict, {"scale": 2.0}, "s")
    with pytest.raises(ValueError, match=r"^reward 's': unknown kwargs \['scal'\] for strict; allowed: scale$"):
        check_reward_kwargs(strict, {"scal": 2.0}, "s")
    check_reward_kwargs(open_ended, {"anything": 1}, "o")  # a user's **kwargs takes anything
    # a built-in's ** only swallows dataset columns: its named keywords are all it takes
    check_reward_kwargs(code_pass, {"wall_s": 2.0}, "c", builtin=True)
    with pytest.raises(ValueError, match="unknown kwargs \\['wall'\\] for code_pass; allowed: cpu_s, max_cases"):
        check_reward_kwargs(code_pass, {"wall": 2.0}, "c", builtin=True)


@pytest.mark.parametrize("args,expected", [
    (["model.name_or_path.foo=1"], "config error: override 'model.name_or_path.foo=1': 'model.name_or_path' is a "
                                   "single value (str), not a section; write model.name_or_path=<value>"),
    (["train.seed=-1"], "config error: train.seed: -1 is out of range; allowed [0, 4294967295]"),
    (["data.path=./missing.jsonl"], "config error: data.path: './missing.jsonl' does not exist (expected a .jsonl / "
                                    ".json / .parquet file or directory, a hub dataset id, or demo)"),
])
def test_cli_subprocess(args, expected, tmp_path):
    cfg, _, _ = _write_case(tmp_path, None, [], None)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--check", "--config", str(cfg), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr == expected + "\n" and p.stdout == ""


def test_cli_subprocess_binary_and_duplicate(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for body, expected in ((b"\x00\x01\x02binary", "is a binary file, not YAML text"),
                           (GOOD.replace("RUN", str(tmp_path / "r")) + "model: {}\n", "duplicate key 'model'")):
        cfg = tmp_path / "c.yaml"
        cfg.write_bytes(body if isinstance(body, bytes) else body.encode())
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--check", "--config", str(cfg)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 2 and expected in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.slow
def test_probe_of_every_key_is_clear(capsys):
    """benchmarks/config_probe.py: every key with a wrong-typed / out-of-range value, and the file-level
    mistakes, through --check: all clear (the README's figure)."""
    spec = importlib.util.spec_from_file_location("config_probe", ROOT / "benchmarks" / "config_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert len(probe.cases()) >= 200
    rc = probe.main()
    out = capsys.readouterr().out
    assert rc == 0, out
    n = len(probe.cases())
    assert f"configs tried: {n}\n  clear: {n}\n" in out
