"""A bf16 training step of a ~0.5B-parameter Qwen2 (built from a config, no hub download), HF backend, with fixed
micro-batches, with token-budget ones, and (where flash-attn is installed) with padding-free packed token-budget
ones (loss.packing, flash_attention_2): tokens/s, peak GPU memory and the update's padding share, side by side in
one process.

    python benchmarks/gpu_step.py                  # on a GPU: Qwen2.5-0.5B shapes, 32 layers, the byte tokenizer
    python benchmarks/gpu_step.py --quick          # smoke run (CPU or GPU, tiny sizes)

The model: Qwen2.5-0.5B's layer shapes (hidden 896, 14 heads, 2 KV heads, MLP 4864) with 32 layers and gdpo's
byte-level test tokenizer (259 ids, so no hub tokenizer is needed): 0.48B parameters. The workload: 8 prompts x G=8
from the demo task, up to 256 new tokens, natural EOS stopping (a random model rarely stops: most rows run to the
cap), GDPO, token_mean, one update per step. Each variant runs `gdpo.trainer.train` for warm-up + timed steps and
reads its own metrics; peak memory is torch.cuda.max_memory_allocated over the variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FULL = dict(hidden=896, layers=32, heads=14, kv_heads=2, intermediate=4864, prompts=8, group=8, new_tokens=256,
            warmup=1, steps=3, budget=16384, micro=8)
QUICK = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, prompts=2, group=4, new_tokens=16,
             warmup=1, steps=1, budget=256, micro=4)


def build_model_dir(s: dict, out: Path, device: str) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gdpo.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      intermediate_size=s["intermediate"], max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return n_params


def run_variant(s: dict, model_dir: Path, work: Path, name: str, loss: dict, model: dict | None = None) -> dict:
    from gdpo.config import config_from_dict
    from gdpo.trainer import train

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = config_from_dict({
        "model": {"name_or_path": str(model_dir), **(model or {})},
        "data": {"path": str(ROOT / "gdpo/demo/train.jsonl"), "max_samples": 256},
        "rollout": {"group_size": s["group"], "prompts_per_step": s["prompts"], "max_new_tokens": s["new_tokens"]},
        "rewards": {"num_workers": 1, "functions": [{"name": "digits", "fn": "vs_trl:digit_share"},
                                                    {"name": "spaces", "fn": "vs_trl:space_share"}]},
        "loss": {"aggregation": "token_mean", **loss},
        "optim": {"lr": 1e-6},
        "logging": {"progress_bar": False, "completions_every": 0, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every": 0, "save_final": False},
        "train": {"steps": s["warmup"] + s["steps"], "seed": 0, "run_dir": str(work / name)},
    })
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()][s["warmup"]:]
    step = statistics.median(r["time/step"] for r in rows)
    tokens = statistics.median(r["len/tokens"] for r in rows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"variant": name, "step_s": step, "generate_s": statistics.median(r["time/generate"] for r in rows),
            "update_s": statistics.median(r["time/update"] for r in rows), "completion_tokens": tokens,
            "tokens_per_s": tokens / step, "peak_gpu_gib": peak, "wall_s": wall,
            "pad_frac": statistics.median(r["optim/pad_frac"] for r in rows),
            "micro_batches": statistics.median(r["optim/micro_batches"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    s = QUICK if a.quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as tmp:
        tmp = Path(tmp)
        n = build_model_dir(s, tmp / "model", device)
        rows = [run_variant(s, tmp / "model", tmp, "fixed", {"micro_batch_size": s["micro"]}),
                run_variant(s, tmp / "model", tmp, "token_budget", {"max_tokens_per_micro_batch": s["budget"]})]
        if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            rows.append(run_variant(s, tmp / "model", tmp, "packed",
                                    {"max_tokens_per_micro_batch": s["budget"], "packing": True},
                                    {"attn_implementation": "flash_attention_2"}))
        else:
            print("packed: skipped (needs CUDA and flash-attn for model.attn_implementation=flash_attention_2)")
    dtype = "bf16" if device == "cuda" else "fp32"
    print(f"gdpo training step, Qwen2 {n / 1e9:.2f}B parameters ({s['layers']} layers, hidden {s['hidden']}), {dtype}"
          f" on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; {s['prompts']} prompts x G="
          f"{s['group']} x <= {s['new_tokens']} tokens, HF backend; median of {s['steps']} steps after "
          f"{s['warmup']} warm-up")
    print(f"{'variant':14s} {'step s':>8s} {'gen s':>7s} {'upd s':>7s} {'tokens':>7s} {'tokens/s':>9s} "
          f"{'peak GiB':>9s} {'pad':>5s} {'micro':>5s}")
    for r in rows:
        print(f"{r['variant']:14s} {r['step_s']:8.2f} {r['generate_s']:7.2f} {r['update_s']:7.2f} "
              f"{r['completion_tokens']:7.0f} {r['tokens_per_s']:9.0f} {r['peak_gpu_gib']:9.2f} "
              f"{r['pad_frac']:5.2f} {r['micro_batches']:5.0f}")
    print("command: python benchmarks/gpu_step.py" + (" --quick" if a.quick else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
