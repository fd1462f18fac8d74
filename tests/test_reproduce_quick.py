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
