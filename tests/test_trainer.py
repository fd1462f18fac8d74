"""The training loop end to end on CPU: a subprocess run of train.py, and resume equality."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdpo.checkpoint import FINGERPRINT_FILE
from gdpo.config import load_config
from gdpo.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "gdpo" / "demo" / "train.jsonl"

TINY = [
    "rollout.group_size=4",
    "rollout.prompts_per_step=2",
    "rollout.max_new_tokens=12",
    "rewards.num_workers=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "optim.lr=1e-3",
    f"data.path={DEMO_DATA}",
    "data.max_samples=64",
    # a reward with signal on a random model's text (and a user-defined `module:function` reward)
    "rewards.functions=[{name: correct, fn: math_correct}, {name: vowels, fn: 'user_rewards:vowel_fraction'},"
    " {name: short, fn: length, kwargs: {max_tokens: 8}, condition: {on: vowels, threshold: 0.1}}]",
]
ENV = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


@pytest.mark.slow
def test_train_py_two_steps_changes_parameters_and_writes_metrics(tiny_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", f"model.name_or_path={tiny_dir}",
           "train.steps=2", f"train.run_dir={run}", *TINY, "logging.wandb.mode=offline"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("rewards/correct/mean", "rewards/vowels/mean", "rewards/short/mean", "adv/collapse_ratio",
                "adv/correct/zero_spread_frac", "loss/clip_frac_low", "loss/entropy", "optim/grad_norm",
                "len/truncated_frac", "time/generate", "throughput/tokens_per_s"):
        assert key in rows[-1], key
    assert rows[-1]["optim/lr"] == pytest.approx(1e-3)
    final = run / "checkpoints" / "step_00000002"
    after, before = _params(final), _params(tiny_dir)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert (run / "reward_curves.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*")), "no W&B offline run written"
    assert "step 2 |" in p.stdout and "done: metrics" in p.stdout


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_dir, tmp_path):
    """4 steps straight == a fresh process resuming from the step-2 checkpoint and running steps 3-4."""
    from gdpo.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # user_rewards, for the in-process run
    common = [f"model.name_or_path={tiny_dir}", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3",
              "loss.epochs=2", "loss.minibatch_size=4", *TINY]
    straight = tmp_path / "straight"
    train(load_config(ROOT / "configs/tiny_gdpo.yaml", [*common, f"train.run_dir={straight}"]))
    # the "interrupted" run: everything it knows at step 2 is the step-2 checkpoint
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    shutil.copy(straight / FINGERPRINT_FILE, resumed / FINGERPRINT_FILE)  # the run's identity: auto resumes it
    code = (
        "import sys; from gdpo.config import load_config; from gdpo.trainer import train; "
        f"train(load_config({str(ROOT / 'configs/tiny_gdpo.yaml')!r}, sys.argv[1:]))"
    )
    p = subprocess.run([sys.executable, "-c", code, *common, f"train.run_dir={resumed}", "checkpoint.resume=auto"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stdout
    a = _params(straight / "checkpoints" / "step_00000004")
    b = _params(resumed / "checkpoints" / "step_00000004")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    assert not all(torch.equal(a[k], _params(tiny_dir)[k]) for k in a)


def test_dynamic_sampling_run(tiny_dir, tmp_path):
    from gdpo.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    m = train(load_config(ROOT / "configs/tiny_gdpo.yaml", [
        f"model.name_or_path={tiny_dir}", "train.steps=1", f"train.run_dir={tmp_path}", *TINY,
        "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=2", "checkpoint.save_final=false",
        # a reward that differs whenever the sampled completions do: no group is signal-free, nothing dropped
        "rewards.functions=[{name: correct, fn: math_correct}, {name: h, fn: 'user_rewards:text_hash'}]",
    ]))
    assert m["sampling/rounds"] == 1 and m["sampling/dropped_groups"] == 0
    m = train(load_config(ROOT / "configs/tiny_gdpo.yaml", [
        f"model.name_or_path={tiny_dir}", "train.steps=1", f"train.run_dir={tmp_path / 'b'}", *TINY[:-1],
        "rewards.functions=[{name: correct, fn: math_correct}]",  # always 0 on a random model: every group dropped
        "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=2", "checkpoint.save_final=false",
    ]))
    assert m["sampling/rounds"] == 2 and m["sampling/dropped_groups"] == 4  # 2 groups a round, refilled after 2


def test_packing_through_the_loop_takes_effect_or_says_why(tiny_dir, tmp_path, capsys, monkeypatch):
    """loss.packing on CPU (sdpa): the start says packing is off and why, and the step is the padded one exactly;
    with sdpa admitted as a packing attention (its block-diagonal mask is exact), the step runs packed: the same
    loss and gradient norm to rounding."""
    from gdpo.policy import model as pm
    from gdpo.trainer import train

    common = [f"model.name_or_path={tiny_dir}", "train.steps=1", *TINY, "checkpoint.save_final=false",
              "loss.max_tokens_per_micro_batch=64"]

    def run(name, *extra):
        m = train(load_config(ROOT / "configs/tiny_gdpo.yaml", [*common, f"train.run_dir={tmp_path / name}", *extra]))
        return m, capsys.readouterr().out

    padded, out = run("padded")
    assert "loss.packing" not in out
    note, out = run("note", "loss.packing=true")
    assert "gdpo: loss.packing: off: the sdpa attention has no variable-length kernel" in out
    assert "training runs padded" in out
    assert note["loss/loss"] == padded["loss/loss"] and note["optim/grad_norm"] == padded["optim/grad_norm"]
    monkeypatch.setattr(pm, "VARLEN_ATTENTION", ("sdpa",))
    packed, out = run("packed", "loss.packing=true")
    assert "gdpo: loss.packing: on" in out
    assert packed["loss/loss"] == pytest.approx(padded["loss/loss"], abs=1e-6)
    assert packed["optim/grad_norm"] == pytest.approx(padded["optim/grad_norm"], rel=1e-5)
    assert packed["optim/grad_norm"] > 0


def test_token_budget_micro_batches_run_through_the_loop(tiny_dir, tmp_path):
    """loss.max_tokens_per_micro_batch reaches the update: a step runs with it, and setting it together with
    loss.micro_batch_size is refused at start."""
    from gdpo.config import ConfigError
    from gdpo.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    common = [f"model.name_or_path={tiny_dir}", "train.steps=1", *TINY, "checkpoint.save_final=false"]
    m = train(load_config(ROOT / "configs/tiny_gdpo.yaml", [*common, f"train.run_dir={tmp_path / 'a'}",
                                                          "loss.max_tokens_per_micro_batch=64"]))
    assert m["optim/grad_norm"] > 0 and m["loss/loss"] == m["loss/loss"]
    with pytest.raises(ConfigError, match="are exclusive"):
        train(load_config(ROOT / "configs/tiny_gdpo.yaml", [*common, f"train.run_dir={tmp_path / 'b'}",
                                                          "loss.max_tokens_per_micro_batch=64",
                                                          "loss.micro_batch_size=2"]))
