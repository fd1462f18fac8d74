"""Checkpoints: save -> load restores weights, optimizer, scheduler, RNG, data position; atomicity; ZeRO-3."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gdpo.checkpoint import (
    STATE_FILE,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from gdpo.distributed import build_engine, optimizer_step
from gdpo.testing import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def _engine(zero_stage=0, seed=0):
    return build_engine(
        tiny_model(tokenizer=TOK, seed=seed),
        lr=1e-2,
        total_steps=10,
        warmup_steps=3,
        schedule="cosine",
        zero_stage=zero_stage,
    )


def _train(engine, steps):
    # Batches drawn from the global torch RNG, so a correct RNG restore is needed for equal continuations.
    for _ in range(steps):
        x = torch.randint(0, 259, (2, 8))
        engine.backward(engine(input_ids=x, labels=x).loss)
        optimizer_step(engine)


def _full_params(engine):
    """Full fp32 parameters (gathered under ZeRO-3)."""
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_save_load_restores_everything(tmp_path, zero_stage):
    torch.manual_seed(0)
    engine = _engine(zero_stage)
    _train(engine, 2)
    path = save_checkpoint(
        tmp_path,
        2,
        engine=engine,
        data_state={"epoch": 1, "position": 7},
        tokenizer=TOK,
    )
    assert path.name == "step_00000002" and (path / STATE_FILE).is_file()
    saved = _full_params(engine)

    # HF weights: from_pretrained on the checkpoint dir gives the engine's (gathered) weights.
    hf = AutoModelForCausalLM.from_pretrained(path)
    for a, b in zip(saved, hf.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Continue the original run: 3 more steps, then random draws from every generator.
    _train(engine, 3)
    expected_params = _full_params(engine)
    expected_lr = engine.get_lr()[0]
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())

    # Fresh engine (other init, other RNG), load, continue the same way: identical.
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    resumed = _engine(zero_stage, seed=9)
    state = load_checkpoint(resolve_resume("auto", tmp_path), engine=resumed)
    assert state.step == 2 and state.data_state == {"epoch": 1, "position": 7}
    for a, b in zip(saved, _full_params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch - 3
    _train(resumed, 3)
    assert resumed.get_lr()[0] == expected_lr
    for a, b in zip(expected_params, _full_params(resumed)):
        # exact: the same optimizer moments, LR steps and batches (restored torch RNG)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(draws[0], expected_draws[0], rtol=0, atol=0)
    np.testing.assert_array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]


def test_optimizer_state_is_restored_not_reset(tmp_path):
    torch.manual_seed(0)
    engine = _engine()
    _train(engine, 2)
    save_checkpoint(tmp_path, 2, engine=engine)
    resumed = _engine(seed=5)
    load_checkpoint(find_latest_checkpoint(tmp_path), engine=resumed)
    for p, q in zip(engine.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        s, r = engine.optimizer.state[p], resumed.optimizer.state[q]
        assert int(s["step"]) == int(r["step"]) == 2
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=0, atol=0)


def test_half_written_checkpoints_are_ignored_and_keep_last(tmp_path):
    torch.manual_seed(0)
    engine = _engine()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, engine=engine, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]

    root = tmp_path / "checkpoints"
    # A crash mid-save leaves a temp dir; a dir without the state file is not complete either.
    (root / ".tmp-step_00000009").mkdir()
    (root / ".tmp-step_00000009" / "config.json").write_text("{}")
    (root / "step_00000010").mkdir()
    (root / "step_00000010" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume("auto", tmp_path) == root / "step_00000003"

    # The next save drops stale temp dirs; re-saving an existing step replaces it atomically.
    save_checkpoint(tmp_path, 3, engine=engine, data_state={"epoch": 2}, keep_last=2)
    assert not (root / ".tmp-step_00000009").exists()
    assert json.loads((root / "step_00000003" / STATE_FILE).read_text())["data_state"] == {"epoch": 2}
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # empty run dir: fresh start
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


# ---------------------------------------------------------------------------------------- crash safety


def _fsync_recorder(monkeypatch):
    """Record the path of every fsync'd descriptor."""
    import os

    synced = set()
    real = os.fsync

    def fsync(fd):
        synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _files_under(root):
    import os

    out = set()
    for d, _, files in os.walk(root):
        out.add(os.path.realpath(d))
        out.update(os.path.realpath(os.path.join(d, f)) for f in files)
    return out


def test_resave_fsyncs_every_file_before_publishing_and_never_lacks_the_step(tmp_path, monkeypatch):
    import gdpo.checkpoint as ck

    engine = _engine()
    _train(engine, 1)
    first = save_checkpoint(tmp_path, 2, engine=engine, data_state={"position": 1})
    synced = _fsync_recorder(monkeypatch)
    seen = []
    real_exchange, real_rename = ck._exchange, ck.os.rename

    def check_before_publish(src, dst):
        # at the moment the new copy is published, every file and directory of it is on disk, and the
        # step's name still points at a complete checkpoint
        assert _files_under(src) <= synced, sorted(_files_under(src) - synced)[:3]
        assert (first / STATE_FILE).is_file()
        seen.append((Path(src).name, Path(dst).name))

    def exchange(a, b):
        check_before_publish(a, b)
        return real_exchange(a, b)

    monkeypatch.setattr(ck, "_exchange", exchange)
    _train(engine, 1)
    again = save_checkpoint(tmp_path, 2, engine=engine, data_state={"position": 2})
    assert seen == [(".tmp-step_00000002", "step_00000002")]
    assert json.loads((again / STATE_FILE).read_text())["data_state"] == {"position": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert real_rename is ck.os.rename


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resave_killed_between_renames_keeps_a_complete_step(tmp_path, monkeypatch, kill_after):
    """Where the filesystem has no RENAME_EXCHANGE: a kill after the first (or second) rename of the swap still
    leaves step_N complete once recover_checkpoints has run (every save and resume runs it)."""
    import gdpo.checkpoint as ck

    root = tmp_path / "checkpoints"
    final = root / "step_00000004"
    final.mkdir(parents=True)
    (final / STATE_FILE).write_text('{"step": 4, "v": "old"}')
    tmp = root / ".tmp-step_00000004"
    tmp.mkdir()
    (tmp / STATE_FILE).write_text('{"step": 4, "v": "new"}')
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    calls = []
    real = ck.os.rename

    class Killed(BaseException):
        pass

    def rename(a, b):
        calls.append(1)
        real(a, b)
        if len(calls) == kill_after:
            raise Killed

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(Killed):
        ck._commit(tmp, final)
    monkeypatch.setattr(ck.os, "rename", real)
    ck.recover_checkpoints(tmp_path)
    state = json.loads((final / STATE_FILE).read_text())
    assert state["v"] == ("old" if kill_after == 1 else "new")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_commit_swaps_atomically_where_the_kernel_can(tmp_path):
    import gdpo.checkpoint as ck

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    if not ck._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"
