"""Atomic, resumable checkpoints of a DeepSpeed-engine training run.

One checkpoint is a directory `<run_dir>/checkpoints/step_00000012/`:

    config.json, model.safetensors, ...   HF weights (+ tokenizer): `from_pretrained(<that dir>)` works
                                          (LoRA: adapter_config.json + adapter_model.safetensors instead, for
                                          `PeftModel.from_pretrained(base, <that dir>)`; base weights not saved)
    ds/                                   DeepSpeed engine state: fp32 master weights, optimizer, LR scheduler
    rng/rank_00000.pt                     python / numpy / torch (+ CUDA) RNG states, one file per rank
    trainer_state.json                    step, data position, anything else the loop wants back

It is written under `.tmp-step_00000012/` and renamed when complete (a rename within one
directory is atomic), with `trainer_state.json` written last; a crash mid-save leaves only a
`.tmp-*` directory, which resume ignores and the next save deletes. All ranks must call
`save_checkpoint` / `load_checkpoint` (DeepSpeed saves each rank's optimizer partition; with
ZeRO-3 the full HF weights are gathered layer by layer onto rank 0). The run directory must be on
a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gdpo.distributed import barrier, is_main, rank, world_size

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_DS_TAG = "ds"
_NAME = re.compile(r"^step_(\d+)$")


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
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old copy
            old = root / f".tmp-old-{checkpoint_name(step)}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
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
