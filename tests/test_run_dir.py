"""A run directory belongs to one run: a fresh run never mixes with (or deletes) another's checkpoints, and
`checkpoint.resume: auto` resumes only a run made with the same config."""

import json
import re

import pytest

from gdpo.checkpoint import (
    FINGERPRINT_FILE,
    RunDirError,
    config_fingerprint,
    fingerprint_config,
    prepare_run_dir,
)
from gdpo.config import config_from_dict, to_dict


def _cfg(**overrides):
    return to_dict(config_from_dict({}, [f"{k}={v}" for k, v in overrides.items()]))


def _add_checkpoint(run, step):
    ck = run / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ck


def _add_metrics(run):
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')


def test_fingerprint_ignores_what_may_change_on_resume_only():
    base = _cfg()
    for key, value in [("train.steps", 7), ("checkpoint.resume", "auto"), ("checkpoint.every", 3),
                       ("logging.wandb.mode", "disabled"), ("logging.completions_every", 0),
                       ("train.overwrite", "true"), ("rewards.num_workers", 4), ("train.run_dir", "/elsewhere")]:
        assert config_fingerprint(_cfg(**{key: value})) == config_fingerprint(base), key
    for key, value in [("train.seed", 1), ("loss.beta", 0.04), ("advantage.estimator", "grpo"),
                       ("model.name_or_path", "Qwen/Qwen2.5-0.5B"), ("data.path", "x/y")]:
        assert config_fingerprint(_cfg(**{key: value})) != config_fingerprint(base), key
    flat = fingerprint_config(base)
    assert "train.seed" in flat and "train.steps" not in flat and not any(k.startswith("logging.") for k in flat)


def test_fresh_run_into_an_empty_dir_writes_the_fingerprint(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False) is None
    saved = json.loads((run / FINGERPRINT_FILE).read_text())
    assert saved["fingerprint"] == config_fingerprint(_cfg())
    assert saved["config"]["train.seed"] == 0


def test_fresh_run_into_a_used_dir_refuses_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    _add_checkpoint(run, 5)
    _add_metrics(run)
    before = sorted(str(p) for p in run.rglob("*"))
    with pytest.raises(RunDirError) as e:
        prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False)
    assert str(e.value) == (
        f"train.run_dir: {run} already holds a run (1 checkpoint, metrics.jsonl); resume it with "
        "checkpoint.resume=auto, choose another train.run_dir, or set train.overwrite=true to move it aside")
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_metrics_alone_make_a_dir_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _add_metrics(run)
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\)"):
        prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False)


def test_overwrite_moves_the_old_run_aside_never_deletes(tmp_path):
    run = tmp_path / "run"
    ck = _add_checkpoint(run, 5)
    _add_metrics(run)
    logs = []
    assert prepare_run_dir(run, config=_cfg(), resume=None, overwrite=True, log=logs.append) is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and re.fullmatch(r"run\.old-\d{8}-\d{6}", moved[0].name)
    assert (moved[0] / "checkpoints" / ck.name / "trainer_state.json").is_file()
    assert (moved[0] / "metrics.jsonl").read_text().startswith('{"step": 1')
    assert sorted(p.name for p in run.iterdir()) == [FINGERPRINT_FILE]
    assert logs == [f"train.overwrite: moved the previous run in {run} to {moved[0]}"]
    # a second overwrite in the same second gets its own name
    _add_metrics(run)
    prepare_run_dir(run, config=_cfg(), resume=None, overwrite=True, log=logs.append)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 2


def test_auto_resumes_the_same_config_even_with_more_steps(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False)
    _add_checkpoint(run, 2)
    latest = _add_checkpoint(run, 4)
    _add_metrics(run)
    got = prepare_run_dir(run, config=_cfg(**{"train.steps": 500}), resume="auto", overwrite=False)
    assert got == latest


def test_auto_refuses_another_config_and_names_the_key(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False)
    _add_checkpoint(run, 2)
    with pytest.raises(RunDirError) as e:
        prepare_run_dir(run, config=_cfg(**{"loss.beta": 0.04, "train.seed": 3}), resume="auto", overwrite=False)
    assert str(e.value) == (
        f"train.run_dir: {run} holds a run made with another config (loss.beta: 0.0 there, 0.04 now, and 1 more); "
        "use that run's config to resume it, choose another train.run_dir, or set train.overwrite=true to move "
        "it aside")
    # with overwrite: the other run is moved aside and this one starts fresh
    assert prepare_run_dir(run, config=_cfg(**{"loss.beta": 0.04}), resume="auto", overwrite=True) is None
    assert len(list(tmp_path.glob("run.old-*/checkpoints/step_00000002"))) == 1


def test_auto_refuses_a_run_without_a_fingerprint(tmp_path):
    run = tmp_path / "run"
    _add_checkpoint(run, 2)
    with pytest.raises(RunDirError, match="no readable fingerprint.json, so auto cannot tell"):
        prepare_run_dir(run, config=_cfg(), resume="auto", overwrite=False)
    (run / FINGERPRINT_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match="no readable fingerprint.json"):
        prepare_run_dir(run, config=_cfg(), resume="auto", overwrite=False)


def test_auto_into_an_empty_or_unused_dir_starts_fresh(tmp_path):
    assert prepare_run_dir(tmp_path / "new", config=_cfg(), resume="auto", overwrite=False) is None
    assert (tmp_path / "new" / FINGERPRINT_FILE).is_file()


def test_explicit_resume_must_be_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    ck = _add_checkpoint(tmp_path / "other", 3)
    assert prepare_run_dir(run, config=_cfg(), resume=str(ck), overwrite=False) == ck
    with pytest.raises(RunDirError, match=r"is not a checkpoint directory \(no trainer_state.json\) \(did you mean"):
        prepare_run_dir(run, config=_cfg(), resume=str(tmp_path / "other"), overwrite=False)


def test_dry_run_gives_the_same_verdict_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False, dry_run=True) is None
    assert not run.exists()
    _add_checkpoint(run, 1)
    with pytest.raises(RunDirError):
        prepare_run_dir(run, config=_cfg(), resume=None, overwrite=False, dry_run=True)
    assert prepare_run_dir(run, config=_cfg(), resume=None, overwrite=True, dry_run=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing moved
