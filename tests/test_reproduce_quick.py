"""benchmarks/reproduce.py --quick: the whole study pipeline (warm start, 3 estimators x 2 seeds, summary, plot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_quick(tmp_path):
    out = tmp_path / "study"
    p = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for est in ("grpo", "grpo_no_std", "gdpo"):
        assert f"| {est} | 2 |" in p.stdout
        for seed in (0, 1):
            rows = [json.loads(x) for x in (out / est / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["summary"]) == {"grpo", "grpo_no_std", "gdpo"}
    assert (out / "reproduce_curves.png").stat().st_size > 10_000
    assert "command: python benchmarks/reproduce.py --quick" in p.stdout
    # a second call finds every run finished and only re-summarises
    again = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 runs to do" in again.stdout


def test_interval_and_collapse_helpers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce

    m, h = reproduce.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3**0.5)  # sd 1, n 3, t(0.975, 2) = 4.303
    assert reproduce.mean_ci([0.5]) == (0.5, 0.0)
    assert reproduce.collapsed([0.1, 0.3, 0.25, 0.05, 0.01, 0.0, 0.01, 0.0])  # rose, then stuck near 0
    assert not reproduce.collapsed([0.1, 0.3, 0.25, 0.05, 0.01, 0.0, 0.01, 0.05])  # recovering at the end
    assert not reproduce.collapsed([0.0, 0.01, 0.0, 0.0])  # never learned: not a collapse
    assert reproduce.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


@pytest.mark.slow
def test_reproduce_independent_quick(tmp_path):
    # the second study's pipeline: its own warm start, 4 estimators x 1 seed, paired differences, extra table
    out = tmp_path / "independent"
    p = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--task", "independent", "--quick", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    estimators = ("grpo", "grpo_no_std", "gdpo", "gdpo_no_std")
    assert "| estimator | seeds | format | easy | hard | weighted_sum | collapse_ratio | collapsed runs |" in p.stdout
    for est in estimators:
        assert f"| {est} | 1 |" in p.stdout
        rows = [json.loads(x) for x in (out / est / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and "rewards/hard/mean" in rows[0]
        cmd = json.loads((out / est / "seed0" / "command.json").read_text())
        assert "rollout.group_size=4" in cmd and any("gdpo.demo.independent:answer_part" in a for a in cmd)
        assert ("advantage.group_std=false" in cmd) == (est == "gdpo_no_std")
    for est in ("grpo", "grpo_no_std", "gdpo_no_std"):
        assert f"| {est} | " in p.stdout.split("| gdpo minus |")[1]  # a paired row per other estimator
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "independent" and set(summary["summary"]) == set(estimators)
    assert set(summary["paired"]) == {"grpo", "grpo_no_std", "gdpo_no_std"}
    # the warm start trained on this task's SFT file, not the demo's
    marker = json.loads((out / "sft" / "warmstart_complete.json").read_text())
    from gdpo.demo.independent import SFT_FILE
    from gdpo.demo.warmstart import _sha256

    assert marker["settings"]["sft_sha256"] == _sha256(SFT_FILE)
    assert (out / "reproduce_independent_curves.png").stat().st_size > 10_000


def test_paired_differences_and_fading_reward():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce

    def run(values):  # one metrics row per step with a single reward "r"
        return [{"rewards/r/mean": v, "rewards/weighted_sum/mean": 2 * v} for v in values]

    runs = {"gdpo": {0: run([0.0, 0.5, 0.7]), 1: run([0.0, 0.2, 0.4])},
            "grpo": {0: run([0.0, 0.1, 0.3]), 1: run([0.0, 0.3, 0.5])}}
    d = reproduce.paired(runs, ("r",), tail=2)
    # seed 0: (0.5 + 0.7)/2 - (0.1 + 0.3)/2 = 0.4; seed 1: 0.3 - 0.4 = -0.1; mean 0.15, sd 0.5/sqrt(2)
    mean, half, ahead, n = d["grpo"]["r"]
    assert mean == pytest.approx(0.15) and half == pytest.approx(12.706 * (0.5 / 2**0.5) / 2**0.5)
    assert (ahead, n) == (1, 2) and d["grpo"]["weighted_sum"][0] == pytest.approx(0.3)
    assert set(d) == {"grpo"}
    assert reproduce.decayed([0.06] * 10 + [0.05] * 10 + [0.01] * 10 + [0.0] * 10)  # 0.06 -> 0.005
    assert not reproduce.decayed([0.06] * 30 + [0.03] * 10)  # half of the start: not below a third
    assert not reproduce.decayed([0.01] * 10 + [0.0] * 30)  # never above 0.02: nothing to fade


def test_detectable_effect():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce

    # 8 seeds, sd 0.04: (2.365 + 0.896) * 0.04 / sqrt(8)
    assert reproduce.detectable(0.04, 8) == pytest.approx(3.261 * 0.04 / 8**0.5)
    assert reproduce.detectable(0.04, 50) == pytest.approx((1.96 + 0.842) * 0.04 / 50**0.5)
    assert reproduce.detectable(0.04, 16) == pytest.approx((2.131 + 0.866) * 0.04 / 4)
    # 16 seeds: t(0.975, 15) = 2.131, not the normal 1.96; 22 seeds falls back to the df-20 entry (conservative)
    assert reproduce.mean_ci([0.0, 1.0] * 8)[1] == pytest.approx(2.131 * (16 / 15 / 4) ** 0.5 / 4)
    assert reproduce.t975(21) == 2.086 and reproduce.t975(40) == 1.96
