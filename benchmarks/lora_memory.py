"""Peak memory of full fine-tuning vs LoRA vs LoRA without a reference copy, on the same CPU model and steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py            # ~2 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py --quick    # smoke run (a small model)

Each setting runs `gdpo.trainer.train` for 2 steps in a fresh subprocess (KL on, beta 0.04, so a reference is
needed; AdamW; ZeRO-0; fp32; CPU) on one Qwen2 built in code and saved once:
- full: every weight trained; the reference is a second copy of the model (model.ref_name_or_path unset);
- lora + ref copy: adapters (r=16 on q/k/v/o/gate/up/down), the reference loaded as a second copy
  (model.ref_name_or_path = the same directory);
- lora: the same adapters, the reference is the policy with its adapters off (nothing loaded twice).
Reported per setting: the process's peak RSS (getrusage ru_maxrss), the RSS after imports and before set-up
(interpreter + torch + transformers + DeepSpeed), and the difference (what training the model costs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "full": [],
    "lora + ref copy": ["model.lora.r=16", "model.lora.alpha=32", "model.ref_name_or_path={model}"],
    "lora (adapter-off ref)": ["model.lora.r=16", "model.lora.alpha=32"],
}

CHILD = r"""
import json, resource, sys
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import torch, deepspeed, transformers, peft  # noqa: F401  imports first: the baseline
from gdpo.config import load_config
from gdpo.trainer import train
base = rss_mb()
cfg = load_config(None, sys.argv[2:])
m = train(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump({"base": base, "peak": peak, "step_s": m.get("time/step")}, open(sys.argv[1], "w"))
"""


def build_model(out: Path, quick: bool) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gdpo.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    hidden, layers, inter = (128, 2, 256) if quick else (1024, 8, 2816)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, tie_word_embeddings=False,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model: checks that the script runs")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gdpo-lora-mem-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        n_params = build_model(model, a.quick)
        common = [f"model.name_or_path={model}", f"data.path={ROOT / 'gdpo/demo/train.jsonl'}", "data.max_samples=32",
                  "train.steps=2", "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=16",
                  "loss.beta=0.04", "optim.lr=1e-5", "checkpoint.save_final=false", "logging.progress_bar=false",
                  "logging.wandb.mode=disabled", "logging.completions_every=0", "rewards.num_workers=0",
                  "rewards.functions=[{name: fmt, fn: format, kwargs: {template: think_answer}}]"]
        rows = []
        for name, extra in SETTINGS.items():
            out = tmp / "result.json"
            run_dir = tmp / ("run_" + "".join(c if c.isalnum() else "_" for c in name))  # a fresh dir each
            args = [*common, f"train.run_dir={run_dir}", *[e.format(model=model) for e in extra]]
            p = subprocess.run([sys.executable, "-c", CHILD, str(out), *args], cwd=ROOT, capture_output=True,
                               text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
            if p.returncode:
                sys.exit(f"{name}: failed\n{p.stderr[-3000:]}")
            rows.append((name, json.loads(out.read_text())))
    print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters ({n_params * 4 / 2**20:.0f} MiB fp32); "
          "2 steps, 2 prompts x G=4 x 16 tokens, beta 0.04, AdamW, ZeRO-0, CPU")
    print("| setting | peak RSS MiB | RSS after imports MiB | peak - imports MiB | vs full |")
    print("|---|---|---|---|---|")
    full = rows[0][1]["peak"] - rows[0][1]["base"]
    for name, r in rows:
        d = r["peak"] - r["base"]
        print(f"| {name} | {r['peak']:.0f} | {r['base']:.0f} | {d:.0f} | {d / full:.2f} |")
    print("command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py" + (" --quick" if a.quick else ""))


if __name__ == "__main__":
    main()
