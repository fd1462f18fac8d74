"""plan_batches: every divisibility rule of the step, once."""

import pytest

from gdpo.config import ConfigError
from gdpo.plan import plan_batches


def test_plan_numbers():
    p = plan_batches(prompts_per_step=8, group_size=4, world_size=2, minibatch_size=16, micro_batch_size=4, epochs=3)
    assert (p.prompts_per_rank, p.rows_per_rank, p.rows_per_step) == (4, 16, 32)
    assert (p.minibatch_rows, p.micro_batch_rows, p.grad_accum) == (8, 4, 2)
    assert (p.minibatches_per_epoch, p.updates_per_step) == (2, 6)
    assert not p.reuse_current_logprobs
    one = plan_batches(prompts_per_step=8, group_size=4, world_size=1)
    assert (one.minibatch_rows, one.micro_batch_rows, one.grad_accum, one.updates_per_step) == (32, 32, 1, 1)
    assert one.reuse_current_logprobs
    assert one.as_dict()["rows_per_step"] == 32


@pytest.mark.parametrize("kw, key", [
    (dict(prompts_per_step=6, world_size=4), "rollout.prompts_per_step"),
    # 6 rollouts on 4 ranks used to be rounded down to 1 per rank (4 in total): refused now
    (dict(prompts_per_step=4, world_size=4, minibatch_size=6), "loss.minibatch_size: 6 rollouts do not split"),
    (dict(prompts_per_step=4, world_size=2, minibatch_size=12), "loss.minibatch_size: 12 does not divide"),
    (dict(prompts_per_step=4, world_size=1, minibatch_size=64), "loss.minibatch_size: 64 does not divide"),
    (dict(prompts_per_step=4, world_size=1, micro_batch_size=3), "loss.micro_batch_size: 3"),
    (dict(prompts_per_step=4, world_size=1, minibatch_size=8, micro_batch_size=16), "loss.micro_batch_size: 16"),
])
def test_plan_refuses_uneven_splits(kw, key):
    with pytest.raises(ConfigError, match=key):
        plan_batches(group_size=4, **kw)


def test_minibatch_refused_at_start_by_train_py(tmp_path):
    """The CLI path: one line, exit 2, before any model loads (6 on a world of 4 is not testable here; a size
    that does not divide the step is)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # where the demo warm start would go
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", "loss.minibatch_size=7",
                        f"train.run_dir={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("config error: loss.minibatch_size: 7")
    assert not (tmp_path / "cache" / "gdpo").exists()  # refused before the warm start
