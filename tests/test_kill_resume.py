"""kill -9 of a real training run: nothing it started survives, and a resume from what it left equals an
uninterrupted run (the trainer side of issue 13's kill trials)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from gdpo.checkpoint import list_checkpoints
from gdpo.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--config", str(ROOT / "configs/tiny_gdpo.yaml"), f"data.path={ROOT / 'gdpo/demo/train.jsonl'}",
    "data.max_samples=32", "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
    "rewards.num_workers=2", "logging.progress_bar=false", "logging.wandb.mode=disabled", "optim.lr=1e-3",
    "train.steps=5", "checkpoint.every=1", "checkpoint.keep_last=5",
    "rewards.functions=[{name: vowels, fn: 'user_rewards:vowel_fraction'}, {name: h, fn: 'user_rewards:text_hash'}]",
]


def _env(marker: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "GDPO_KILL_TRIAL": marker, "OMP_NUM_THREADS": "1"}


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries the trial's marker (the trainer, its reward workers, their children)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if f"GDPO_KILL_TRIAL={marker}".encode() in Path(f"/proc/{d}/environ").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


def _params(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


@pytest.mark.slow
def test_kill_9_leaves_nothing_and_resume_equals_uninterrupted(tmp_path):
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = [f"model.name_or_path={tmp_path / 'm'}"]
    straight = tmp_path / "straight"
    p = subprocess.run([sys.executable, "train.py", *COMMON, *model, f"train.run_dir={straight}"], cwd=ROOT,
                       env=_env("none"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    killed = tmp_path / "killed"
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "train.py", *COMMON, *model, f"train.run_dir={killed}"], cwd=ROOT,
                            env=_env(marker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [s for s, _ in list_checkpoints(killed) if s >= 2] and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    assert len(_marked(marker)) >= 3  # the trainer and its 2 reward workers
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: after step 2's checkpoint, during a later step
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == [], "processes of the killed run are still alive"
    last = list_checkpoints(killed)[-1][0]
    assert 2 <= last < 5

    p = subprocess.run([sys.executable, "train.py", *COMMON, *model, f"train.run_dir={killed}",
                        "checkpoint.resume=auto"], cwd=ROOT, env=_env("none"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {last}" in p.stdout
    a = _params(straight / "checkpoints" / "step_00000005")
    b = _params(killed / "checkpoints" / "step_00000005")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged from the uninterrupted one"
