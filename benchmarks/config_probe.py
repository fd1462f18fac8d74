"""Probe `train.py --check` with malformed configs, as a careless user would write them; print the tally.

    python benchmarks/config_probe.py            # ~150 configs in-process, ~20 s on one CPU core

Every config key gets a value of the wrong type (and every ranged key one out of range), plus the file-level
mistakes of tests/test_config_errors.py. A result is "clear" when the exit code is 2, stderr is exactly one
line, and that line names the key (or the file); "wrong message" when it is one line that names something
else; "traceback" when an exception escapes; "accepted" when the check passes. The README's reliability
figures come from this script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import sys
import tempfile
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdpo.config import Config, field_docs  # noqa: E402

BASE = (ROOT / "configs" / "tiny_gdpo.yaml").read_text()


def _wrong_values(key: str, tp: str) -> list[str]:
    if tp.startswith("one of") or "one of" in tp:
        return ["definitely_not_allowed"]
    if tp.startswith("int"):
        return ["abc", "1.5"]
    if tp.startswith("float"):
        return ["abc", "[1]"]
    if tp.startswith("bool"):
        return ["maybe", "2"]
    if tp.startswith("str"):
        return ["[1, 2]", "{a: 1}"]
    if tp.startswith("a list"):
        return ["{a: 1}", "7"]
    if tp.startswith("a mapping"):
        return ["7", "[1]"]
    return []


def _ranged(key: str) -> list[str]:
    """Values just outside the range declared in gdpo/config.py for `key` (none if it has no range)."""
    cls = Config
    for part in key.split(".")[:-1]:
        if part.isdigit():
            continue
        tp = typing.get_type_hints(cls)[part]
        while not dataclasses.is_dataclass(tp):  # Optional[X] / list[X] -> X
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        cls = tp
    f = {f.name: f for f in dataclasses.fields(cls)}.get(key.split(".")[-1])
    lo, hi, _ = f.metadata.get("range", (None, None, False)) if f else (None, None, False)
    return [str(v) for v in ((lo - 1) if lo is not None else None, (hi + 1) if hi is not None else None)
            if v is not None]


def cases() -> list[tuple[str, bytes | None, list[str], str]]:
    """(label, config file bytes or None = the base config, overrides, what a clear message names)."""
    out = []
    for key, tp, _ in field_docs():
        key = key.replace(".N.", ".0.")
        if key.startswith("rewards.functions.0.condition."):
            continue  # reward 0 has no condition; rewards.functions.2.condition is probed instead
        for v in _wrong_values(key, tp):
            out.append((f"{key}={v}", None, [f"{key}={v}"], key))
        for v in _ranged(key):
            out.append((f"{key}={v}", None, [f"{key}={v}"], key))
    for v in ("abc", "[1]"):
        out.append((f"condition.threshold={v}", None, [f"rewards.functions.2.condition.threshold={v}"],
                    "rewards.functions.2.condition.threshold"))
    files = [
        ("non-utf8", b"model:\n  name_or_path: \xff\n", "UTF-8"),
        ("binary", b"\x00\x01\x02\x03" * 16, "binary"),
        ("scalar-section", b"model: 5\n", "model"),
        ("list-top-level", b"- a\n- b\n", "top level"),
        ("bad-yaml", b"model: [\n", "YAML"),
        ("duplicate-key", BASE.encode() + b"\ntrain: {steps: 1}\n", "train"),
        ("tab-indent", b"model:\n\tname_or_path: demo\n", "YAML"),
    ]
    for label, body, names in files:
        out.append((label, body, [], names))
    more = [
        ("override-into-str", ["model.name_or_path.foo=1"], "model.name_or_path"),
        ("override-into-int", ["train.steps.x=1"], "train.steps"),
        ("override-no-equals", ["train.steps"], "train.steps"),
        ("override-bad-index", ["rewards.functions.9.weight=1"], "9"),
        ("unknown-key", ["train.stesp=3"], "train.stesp"),
        ("unknown-section", ["trian.steps=3"], "trian"),
        ("seed-negative", ["train.seed=-1"], "train.seed"),
        ("seed-huge", ["train.seed=99999999999"], "train.seed"),
        ("attn", ["model.attn_implementation=flash"], "model.attn_implementation"),
        ("kwarg-typo", ["rewards.functions.2.kwargs={max_token: 20}"], "rewards.functions.2.kwargs"),
        ("unknown-fn", ["rewards.functions.0.fn=math_corect"], "rewards.functions.0.fn"),
        ("missing-module", ["rewards.functions.0.fn=nope.mod:f"], "rewards.functions.0.fn"),
        ("no-rewards", ["rewards.functions=[]"], "rewards.functions"),
        ("dup-reward-name", ["rewards.functions.1.name=correct"], "rewards.functions.1.name"),
        ("condition-unknown", ["rewards.functions.2.condition.on=nope"], "rewards.functions.2.condition.on"),
        ("model-missing", ["model.name_or_path=./no/model"], "model.name_or_path"),
        ("data-missing", ["data.path=./no/data.jsonl"], "data.path"),
        ("resume-missing", ["checkpoint.resume=./no/ckpt"], "checkpoint.resume"),
        ("resume-not-ckpt", ["checkpoint.resume=."], "checkpoint.resume"),
        ("run-dir-proc", ["train.run_dir=/proc/x"], "train.run_dir"),
        ("run-dir-under-file", [f"train.run_dir={ROOT / 'README.md'}/x"], "train.run_dir"),
        ("min-over-max-tokens", ["rollout.min_new_tokens=100", "rollout.max_new_tokens=10"],
         "rollout.min_new_tokens"),
        ("betas", ["optim.betas=[0.9]"], "optim.betas"),
        ("offload-stage", ["deepspeed.offload_param=true"], "deepspeed.offload_param"),
    ]
    for label, ovr, names in more:
        out.append((label, None, ovr, names))
    return out


def main() -> int:
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    tally = {"clear": [], "wrong message": [], "traceback": [], "accepted": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.yaml"
        base.write_text(BASE.replace("runs/{name}", str(Path(tmp) / "run")))
        for label, body, overrides, names in cases():
            path = base
            if body is not None:
                path = Path(tmp) / "case.yaml"
                path.write_bytes(body.replace(b"runs/{name}", str(Path(tmp) / "run").encode()))
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = train_cli.main(["--check", "--config", str(path), *overrides])
            except BaseException as e:  # noqa: BLE001 - a traceback is what the probe counts
                tally["traceback"].append(f"{label}: {type(e).__name__}: {e}")
                continue
            text = err.getvalue()
            if rc == 0:
                tally["accepted"].append(label)
            elif rc == 2 and text.count("\n") == 1 and names.lower() in text.lower():
                tally["clear"].append(label)
            else:
                tally["wrong message"].append(f"{label}: rc={rc} {text.strip()[:160]}")
    n = sum(len(v) for v in tally.values())
    print(f"configs tried: {n}")
    for k, v in tally.items():
        print(f"  {k}: {len(v)}")
        for item in v if k != "clear" else []:
            print(f"    {item}")
    print("reproduce: python benchmarks/config_probe.py")
    return 0 if len(tally["clear"]) == n else 1


if __name__ == "__main__":
    sys.exit(main())
