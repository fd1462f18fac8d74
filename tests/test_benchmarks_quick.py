"""The benchmark scripts' quick modes run and print their tables."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_advantage_benchmark_quick():
    p = subprocess.run(
        [sys.executable, "benchmarks/advantage.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "eager" in p.stdout and "copy" in p.stdout and "command: python benchmarks/advantage.py --quick" in p.stdout


def test_vs_trl_benchmark_quick():
    pytest.importorskip("trl")
    p = subprocess.run(
        [sys.executable, "benchmarks/vs_trl.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    # the table: a header and one row per framework: step, generate, reward, update (s), peak RSS, tokens per row
    assert "framework" in out and "generate" in out and "peak RSS MB" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["gdpo"], ["trl"])}
    assert set(rows) == {"gdpo", "trl"}
    for fw, cells in rows.items():
        step, gen, reward, update, rss, tokens = map(float, cells)
        assert step > 0 and gen > 0 and reward >= 0 and update > 0 and rss > 100, (fw, cells)
        assert gen < step and update < step, (fw, cells)
        assert tokens == 8.0  # exactly --quick's 8 new tokens per completion in both frameworks
    ratio = [line for line in out.splitlines() if line.startswith("ratio gdpo / TRL: step ")]
    assert len(ratio) == 1 and float(ratio[0].split()[5]) > 0
    assert "max |gdpo - TRL| =" in out and "(OK)" in out
    assert "command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --quick" in out


def test_vs_trl_natural_workload_quick():
    """EOS stopping in both frameworks on a model whose EOS logit was calibrated: ragged lengths, the histogram."""
    pytest.importorskip("trl")
    p = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--quick", "--workload", "natural"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    assert "natural workload: completion lengths of 16 sampled rows (cap 24)" in out
    assert sum(line.startswith("  ") and "-" in line for line in out.splitlines()) == 8  # histogram bins
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["gdpo"], ["trl"])}
    for fw, cells in rows.items():
        tokens = float(cells[-1])
        assert 0 < tokens < 24, (fw, cells)  # rows end on EOS, not at the cap
    ratio = [line for line in out.splitlines() if line.startswith("ratio gdpo / TRL: step ")]
    assert len(ratio) == 1 and "natural workload, goal <= 0.45" in ratio[0]


def test_step_floor_benchmark_quick():
    p = subprocess.run(
        [sys.executable, "benchmarks/step_floor.py", "--quick", "--gdpo-trl-ratio", "0.5"], cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    sec = {}
    for line in out.splitlines():
        name, _, val = line.rpartition(" ")
        if name.startswith(("gen:", "update:")):
            sec[name.strip()] = float(val)
    assert set(sec) == {"gen: gdpo (HF rollout engine)", "gen: minimal decode, eager", "gen: GEMMs only",
                        "update: gdpo (ref + policy fwd/bwd)", "update: GEMMs only"}
    assert all(v > 0 for v in sec.values()), sec
    # GEMMs alone are a lower bound of the same work
    assert sec["gen: GEMMs only"] < sec["gen: gdpo (HF rollout engine)"]
    assert sec["update: GEMMs only"] < sec["update: gdpo (ref + policy fwd/bwd)"]
    totals = {line[:42].strip(): line[42:].split() for line in out.splitlines()
              if line.startswith(("gdpo gen + update", "minimal decode +", "floor (GEMMs"))}
    assert len(totals) == 4
    assert totals["gdpo gen + update"][1:] == ["1.00", "0.50"]  # itself, and x the ratio given
    floor = totals["floor (GEMMs only, all else free)"]
    assert 0 < float(floor[1]) < 1 and float(floor[2]) == pytest.approx(float(floor[1]) * 0.5, abs=0.011)
    assert "command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_floor.py --quick" in out


def test_gpu_step_benchmark_quick(tmp_path):
    """The bf16 GPU step script (benchmarks/gpu_check.sh part 3) runs end to end at tiny sizes on CPU."""
    out = tmp_path / "rows.json"
    p = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = {r["variant"]: r for r in __import__("json").loads(out.read_text())}
    assert set(rows) == {"fixed", "token_budget"}  # "packed" needs CUDA and flash-attn
    for r in rows.values():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["completion_tokens"] > 0
        assert 0 <= r["pad_frac"] < 1 and r["micro_batches"] >= 1
    assert "command: python benchmarks/gpu_step.py --quick" in p.stdout


def test_packing_benchmark_quick():
    """benchmarks/packing.py: padded vs packed token-budget updates run side by side; packed computes no padding."""
    p = subprocess.run([sys.executable, "benchmarks/packing.py", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith(("padded ", "packed "))}
    assert set(lines) == {"padded", "packed"}
    assert float(lines["packed"][-1]) == 0.0 and float(lines["padded"][-1]) > 0.1  # the padding share
    assert int(lines["packed"][-3]) < int(lines["padded"][-3])  # positions computed
    assert "ratio packed / padded (sdpa, no varlen kernel): update " in p.stdout
    assert "command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py --quick" in p.stdout


def test_microbatch_memory_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/microbatch_memory.py", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith(("fixed micro-batches", "token budget"))]
    assert len(rows) == 4 and all(float(r.split()[-1]) > 0 for r in rows), p.stdout


def test_lora_memory_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/lora_memory.py", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = {cells[1].strip(): cells[2:6] for cells in (line.split("|") for line in p.stdout.splitlines())
            if len(cells) == 7 and cells[2].strip().isdigit()}
    assert set(rows) == {"full", "lora + ref copy", "lora (adapter-off ref)"}
    for cells in rows.values():
        peak, base, diff = (int(c) for c in cells[:3])
        assert peak > base > 100 and abs(diff - (peak - base)) <= 1  # MiB, each rounded
    assert rows["full"][3].strip() == "1.00"
    assert "command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py --quick" in p.stdout
