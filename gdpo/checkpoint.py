"""Atomic, resumable checkpoints of a DeepSpeed-engine training run.

One checkpoint is a directory `<run_dir>/checkpoints/step_00000012/`:

    config.json, model.safetensors, ...   HF weights (+ tokenizer): `from_pretrained(<that dir>)` works
                                          (LoRA: adapter_config.json + adapter_model.safetensors instead, for
                                          `PeftModel.from_pretrained(base, <that dir>)`; base weights not saved)
    ds/                                   DeepSpeed engine state: fp32 master weights, optimizer, LR scheduler
    rng/rank_00000.pt                     python / numpy / torch (+ CUDA) RNG states, one file per rank
    trainer_state.json                    step, data position, anything else the loop wants back

It is written under `.tmp-step_00000012/`, every file and directory of it fsynced, and renamed when
complete (a rename within one directory is atomic), with `trainer_state.json` written last; a crash
mid-save leaves only a `.tmp-*` directory, which resume ignores and the next save deletes. Re-saving
an existing step swaps the two directories in one `renameat2(RENAME_EXCHANGE)`, so `step_N` always
names a complete checkpoint; where the filesystem lacks the exchange, the old copy is parked as
`.tmp-old-step_N` for the one moment between two renames, and `recover_checkpoints` (called by every
save and resume) puts it back if a kill landed there.

A run directory belongs to one run: `prepare_run_dir` (called once at start) refuses a fresh run into a
directory that holds another run's checkpoints or metrics (unless `overwrite`, which moves the old run
aside), and `resume="auto"` resumes only a run whose `fingerprint.json` matches this config's
`config_fingerprint`. All ranks must call
`save_checkpoint` / `load_checkpoint` (DeepSpeed saves each rank's optimizer partition; with
ZeRO-3 the full HF weights are gathered layer by layer onto rank 0). The run directory must be on
a filesystem all ranks share.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdpo.distributed import barrier, is_main, rank, world_size

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_DS_TAG = "ds"
_NAME = re.compile(r"^step_(\d+)$")
FINGERPRINT_FILE = "fingerprint.json"
METRICS_FILE = "metrics.jsonl"
# Keys that may change between a run and its resume without making it another run.
FINGERPRINT_IGNORES = (
    "train.steps", "train.overwrite", "train.run_dir", "checkpoint", "logging", "rewards.num_workers",
    "rewards.timeout_s", "rewards.worker_memory_mb",
)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (one line; train.py reports it as a config error)."""


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under root, then every directory bottom-up (so their entries are durable too)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(dirpath)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    ret = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return ret == 0


def _commit(tmp: Path, final: Path) -> None:
    """Make the complete, fsynced `tmp` the checkpoint `final`; at no moment is `final` missing or partial
    once it existed (a kill at any point leaves either the old or the new complete copy as `final`, or the
    old one parked where `recover_checkpoints` finds it)."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old copy
    else:
        old = root / f".tmp-old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)  # a kill between these two renames: recover_checkpoints puts `old` back
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(root)


def recover_checkpoints(run_dir: str | os.PathLike) -> None:
    """Undo a re-save that was killed between its two renames: a parked `.tmp-old-step_N` whose `step_N` is
    missing becomes `step_N` again. Main rank only (it renames)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for parked in root.glob(".tmp-old-step_*"):
        final = root / parked.name[len(".tmp-old-"):]
        if not final.exists() and (parked / STATE_FILE).is_file():
            os.rename(parked, final)
            _fsync_path(root)


@dataclass
class TrainerState:
    step: int  # optimizer steps (or loop iterations) completed when saved
    data_state: dict = field(default_factory=dict)  # the prompt iterator's state_dict()


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict:
    """This process's RNG states: python `random`, numpy's global RNG, torch CPU and (if present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model):
    return getattr(model, "module", model)


def _has_frozen(model) -> bool:
    """A LoRA policy (PeftModel): its save is the adapter in PEFT format (`PeftModel.from_pretrained` loads it) and
    the frozen base weights stay out of the DeepSpeed state too (they are reloaded from the base model)."""
    from gdpo.policy.lora import is_peft_model

    return is_peft_model(model)


def save_hf_model(engine_or_model, out_dir: str | os.PathLike, *, tokenizer=None) -> None:
    """HF-format weights (+ tokenizer) in out_dir, from a DeepSpeed engine at any ZeRO stage or a plain model.

    Collective under ZeRO-3 (all ranks call it; rank 0 writes).
    """
    model = _unwrap(engine_or_model)
    state_dict = None
    zero3 = getattr(engine_or_model, "zero_optimization_partition_weights", lambda: False)()
    if zero3:
        # Gathers each partitioned parameter to rank 0, one layer at a time (None on other ranks); a LoRA
        # (PeftModel) save writes only the adapter, so only the trained parameters are gathered.
        state_dict = engine_or_model._zero3_consolidated_16bit_state_dict(
            exclude_frozen_parameters=_has_frozen(model))
    if is_main():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first (temp dirs / dirs without a state file skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """`checkpoint.resume` -> a checkpoint dir or None.

    None / "" / "none" / "never": start fresh. "auto": the latest complete checkpoint in run_dir,
    if any. Anything else is a path, which must be a complete checkpoint.
    """
    if resume is None or str(resume).lower() in ("", "none", "never", "false"):
        return None
    if str(resume).lower() == "auto":
        if is_main():
            recover_checkpoints(run_dir)
        return find_latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint (no {STATE_FILE})"
        )
    return path


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    engine,
    data_state: dict | None = None,
    tokenizer=None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep_last` (None/0: all). All ranks call."""
    rng_state = capture_rng_state()  # first, so nothing below can advance a generator before it is saved
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(run_dir)  # first: a parked old copy may be the only one of its step
        for stale in root.glob(".tmp-*"):  # left by a crash mid-save: never complete, safe to drop
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    save_hf_model(engine, tmp, tokenizer=tokenizer)
    # client_state stays empty: step and data position live in trainer_state.json, readable without torch.
    engine.save_checkpoint(str(tmp), tag=_DS_TAG, save_latest=False,
                           exclude_frozen_parameters=_has_frozen(_unwrap(engine)))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state, tmp / "rng" / f"rank_{rank():05d}.pt")
    barrier()

    if is_main():
        state = {
            "step": int(step),
            "data_state": data_state or {},
            "world_size": world_size(),
        }
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=2)
        fsync_tree(tmp)  # every file and directory on disk before the rename publishes them
        _commit(tmp, final)
        if keep_last:
            for _, path in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, *, engine, load_optimizer: bool = True) -> TrainerState:
    """Restore engine weights, optimizer and LR scheduler, and this rank's RNG; return step / data position.

    All ranks call. The RNG file of this rank is used; if the world size changed, rank 0's file is
    used (streams then differ from an uninterrupted run, but training continues).
    """
    path = Path(path)
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=_DS_TAG,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=load_optimizer,
        load_module_strict=not _has_frozen(_unwrap(engine)),  # LoRA: frozen base weights were not saved
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path / _DS_TAG}")
    rng_file = path / "rng" / f"rank_{rank():05d}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng" / "rank_00000.pt"
    restore_rng_state(
        torch.load(rng_file, weights_only=False)
    )  # our own file: python/numpy states need pickle
    return TrainerState(
        step=int(state["step"]), data_state=state.get("data_state", {})
    )


# ------------------------------------------------------------------------------------------------ run dirs


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def fingerprint_config(cfg_dict: dict) -> dict[str, Any]:
    """The flat {key: value} of a config (``to_dict(cfg)``) that defines a run: `FINGERPRINT_IGNORES` removed."""
    flat = _flatten(cfg_dict)
    return {k: v for k, v in sorted(flat.items())
            if not any(k == ig or k.startswith(ig + ".") for ig in FINGERPRINT_IGNORES)}


def config_fingerprint(cfg_dict: dict) -> str:
    """sha256 of the run-defining part of a config (steps, resume, logging... may change on resume).

    >>> a = {"train": {"steps": 10, "seed": 0}, "logging": {"x": 1}}
    >>> config_fingerprint(a) == config_fingerprint({"train": {"steps": 99, "seed": 0}, "logging": {"x": 2}})
    True
    >>> config_fingerprint(a) == config_fingerprint({"train": {"steps": 10, "seed": 1}})
    False
    """
    text = json.dumps(fingerprint_config(cfg_dict), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _run_contents(run_dir: Path) -> list[str]:
    """What makes run_dir another run's: its checkpoints and its metrics (empty list: free to use)."""
    found = []
    n = len(list_checkpoints(run_dir))
    if n:
        found.append(f"{n} checkpoint{'s' * (n > 1)}")
    elif (run_dir / CHECKPOINTS_DIR).is_dir() and any((run_dir / CHECKPOINTS_DIR).glob("*step_*")):
        found.append("partial checkpoints")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        found.append(METRICS_FILE)
    return found


def _fingerprint_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if not keys:
        return "same keys, other fingerprint"
    k = keys[0]
    more = f", and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} now{more}"


def _move_aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    os.rename(run_dir, dest)
    return dest


def prepare_run_dir(
    run_dir: str | os.PathLike,
    *,
    config: dict,
    resume: str | None,
    overwrite: bool,
    dry_run: bool = False,
    log: Any = print,
) -> Path | None:
    """Claim `run_dir` for this run and return the checkpoint to resume from (None: start fresh).

    `config` is ``to_dict(cfg)``. Raises RunDirError (one line) where the directory holds another run:
    a fresh run (`resume` None) into a directory with checkpoints or metrics, unless `overwrite` (the old
    run is renamed to ``<run_dir>.old-<timestamp>``, never deleted); ``resume="auto"`` into a run made
    with another config fingerprint (the first differing key is named). An explicit `resume` path must be
    a complete checkpoint. Then (unless `dry_run`) creates run_dir and writes its ``fingerprint.json``.
    Main rank only; the other ranks call it after a barrier with ``dry_run=True`` and get the same answer.
    """
    run_dir = Path(run_dir)
    new_flat = fingerprint_config(config)
    new_fp = config_fingerprint(config)
    fp_path = run_dir / FINGERPRINT_FILE
    old: dict | None = None
    if fp_path.is_file():
        try:
            old = json.loads(fp_path.read_text())
            if not isinstance(old, dict) or "fingerprint" not in old:
                old = None
        except ValueError:
            old = None
    contents = _run_contents(run_dir) if run_dir.is_dir() else []
    same = old is not None and old.get("fingerprint") == new_fp
    mode = None if resume is None or str(resume).lower() in ("", "none", "never", "false") else str(resume)
    result: Path | None = None
    move = False
    if mode is None or mode.lower() == "auto":
        if contents and not (mode is not None and same):
            if mode is None:
                why = f"already holds a run ({', '.join(contents)})"
                hint = "resume it with checkpoint.resume=auto, choose another train.run_dir"
            elif old is None:
                why = f"holds a run ({', '.join(contents)}) with no readable {FINGERPRINT_FILE}, so auto cannot " \
                      "tell whether it is this config's"
                hint = "resume it with checkpoint.resume=<its checkpoint dir>, choose another train.run_dir"
            else:
                why = f"holds a run made with another config ({_fingerprint_diff(old.get('config', {}), new_flat)})"
                hint = "use that run's config to resume it, choose another train.run_dir"
            if not overwrite:
                raise RunDirError(f"train.run_dir: {run_dir} {why}; {hint}, or set train.overwrite=true to "
                                  "move it aside")
            move = True
        elif mode is not None:
            result = resolve_resume("auto", run_dir) if not dry_run else find_latest_checkpoint(run_dir)
    else:
        path = Path(mode)
        if not (path / STATE_FILE).is_file():
            latest = find_latest_checkpoint(path) if path.is_dir() else None
            hint = f" (did you mean its latest checkpoint {latest}?)" if latest else ""
            raise RunDirError(f"checkpoint.resume: {mode!r} is not a checkpoint directory (no {STATE_FILE})"
                              f"{hint}; expected auto, null or a path such as "
                              f"{run_dir / CHECKPOINTS_DIR / checkpoint_name(10)}")
        result = path
    if dry_run:
        return None if move else result
    if move:
        dest = _move_aside(run_dir)
        log(f"train.overwrite: moved the previous run in {run_dir} to {dest}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not same:
        _write_json_atomic(fp_path, {"fingerprint": new_fp, "config": new_flat})
    return result
