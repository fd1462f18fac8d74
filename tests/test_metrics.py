"""Metrics: each metric reduces over ranks as it says (max is max, NaN stays NaN, stds from moments)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdpo.metrics import Metrics, RunLogger

ROOT = Path(__file__).resolve().parents[1]
nan = float("nan")


def _two_rank_reduce(a: Metrics, b: Metrics) -> dict:
    """Reduce two ranks' metrics in one process: the all-reduce combines both ranks' vectors."""
    vectors = {}

    def capture(v, op):
        vectors.setdefault(op, []).append(v.clone())
        return v

    a.reduce(capture), b.reduce(capture)
    combine = {"sum": lambda x, y: x + y, "max": torch.maximum, "min": torch.minimum}
    total = {op: combine[op](*vs) for op, vs in vectors.items()}
    return a.reduce(lambda v, op: total[op])


def test_world_of_one_by_hand():
    m = Metrics()
    m.mean_of("mean", torch.tensor([1.0, nan, 4.0]))
    m.std("std", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m.std("std_one", torch.tensor([5.0]))
    m.corr("corr", torch.tensor([1.0, 2.0, 3.0, nan]), torch.tensor([2.0, 4.0, 7.0, 1.0]))
    m.corr("corr_const", torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 4.0, 7.0]))
    m.ratio("ratio", 3.0, 4.0)
    m.ratio("ratio_empty", 0.0, 0.0, empty=0.0)
    m.max("max", nan)
    out = m.reduce()
    assert out["mean"] == 2.5
    assert out["std"] == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).std().item())
    assert out["std_one"] == 0.0
    ref = torch.corrcoef(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 7.0]], dtype=torch.float64))[0, 1].item()
    assert out["corr"] == pytest.approx(ref, rel=1e-12)
    assert math.isnan(out["corr_const"])
    assert out["ratio"] == 0.75 and out["ratio_empty"] == 0.0
    assert math.isnan(out["max"])


def test_two_ranks_combine_exactly():
    a, b = Metrics(), Metrics()
    xa, xb = torch.tensor([1.0, 2.0, nan]), torch.tensor([10.0])
    for m, x, mx in ((a, xa, 2.0), (b, xb, 10.0)):
        m.mean_of("len/mean", x)
        m.max("len/max", mx)
        m.min("len/min", mx)
        m.std("rewards/x/std", x)
        m.sum("len/tokens", x.nan_to_num().sum().item())
        m.mean("loss/loss", nan if m is b else 0.5)  # NaN on one rank counts for nothing
    out = _two_rank_reduce(a, b)
    whole = torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64)
    assert out["len/mean"] == pytest.approx(13 / 3)  # the mean of all 3 values, not of the ranks' means (6.25)
    assert out["len/max"] == 10.0 and out["len/min"] == 2.0  # max is max, not a mean of maxima
    assert out["rewards/x/std"] == pytest.approx(whole.std().item())  # not a mean of stds
    assert out["len/tokens"] == 13.0
    assert out["loss/loss"] == 0.5


def test_ranks_with_different_keys_are_refused():
    a, b = Metrics(), Metrics()
    a.sum("x", 1.0)
    b.sum("y", 1.0)
    with pytest.raises(RuntimeError, match="different metrics"):
        _two_rank_reduce(a, b)


@pytest.mark.slow
@pytest.mark.distributed
def test_reduction_and_dynamic_sampling_on_two_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_scripts" / "loop_two_ranks.py"), str(tmp_path / "out")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2
    m = r0["metrics"]
    assert m == r1["metrics"] or all(m[k] == r1["metrics"][k] or math.isnan(m[k]) for k in m)
    assert m["mean"] == pytest.approx(13 / 3) and m["max"] == 10.0 and m["min"] == 3.0 and m["sum"] == 3.0
    assert m["std"] == pytest.approx(torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64).std().item())
    assert math.isnan(m["all_nan"]) and math.isnan(m["max_nan"])  # NaN stays NaN, not 0
    assert m["corr"] == pytest.approx(1.0)  # y = 2x on both ranks together
    assert "different metrics" in r0["mismatch"] and "different metrics" in r1["mismatch"]
    for rounds in (1, 3):
        a, b = r0[f"rounds{rounds}"], r1[f"rounds{rounds}"]
        assert a["rounds"] == b["rounds"] == rounds  # the full rank keeps pace with the short one
        assert a["rows"] == b["rows"] == 4
        assert a["dropped"] == 0 and b["dropped"] == 2 * rounds
        assert b["prompts"] == ["q11", "q11", "q12", "q12"]  # filled with its first dropped groups


def test_wandb_dashboard_axes_and_groups(tmp_path, monkeypatch):
    """train/step is every group's x axis, and a step's advantages go out as a histogram."""
    import wandb

    calls = {"define": [], "log": []}

    class FakeRun:
        def define_metric(self, name, **kw):
            calls["define"].append((name, kw.get("step_metric")))

        def log(self, data, step=None):
            calls["log"].append((sorted(data), step))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    lg = RunLogger(tmp_path, wandb_mode_requested="offline", progress_bar=False, reward_names=["r"])
    lg.log(1, {"rewards/r/mean": 1.0, "train/step": 1.0})
    lg.log_histogram(1, "adv/histogram", torch.tensor([0.5, -0.5]))
    lg.finish()
    assert ("train/step", None) in calls["define"]
    for group in ("rewards", "adv", "loss", "len", "time", "optim"):
        assert (f"{group}/*", "train/step") in calls["define"]
    assert (["adv/histogram"], 1) in calls["log"]
