#!/usr/bin/env bash
# The GPU checks, in one script, for a session lent a GPU (under 8 minutes on one H200). Prepare here first:
#     bash benchmarks/gpu_wheels.sh
# then through the device tool (its README): run with carry [".whl"] and the command
#     bash benchmarks/gpu_check.sh
# It writes every figure to $OUT/gpu_check.txt (and the logs beside it); record them in benchmarks/RESULTS.md.
#   1. the Triton advantage kernel's tests on CUDA (tests/advantage, the gpu-marked ones run there);
#   2. benchmarks/advantage.py on CUDA: Triton vs eager torch (goal >= 5x at N*K >= 1M) and the share of the
#      device-to-device copy bandwidth (goal >= 60% at the largest size);
#   3. a bf16 training step of a 0.48B Qwen2 built from a config, HF backend, fixed vs token-budget micro-batches:
#      tokens/s and peak GPU memory (benchmarks/gpu_step.py); packed micro-batches too where flash-attn is installed;
#   4. train.py for 2 steps in one process on NCCL (catches CPU tensors sent to an NCCL group).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled DS_BUILD_OPS=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$REPORT"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
say() { echo "$*" | tee -a "$REPORT"; }
section() { say ""; say "== $1 ($(date -u +%H:%M:%S))"; }
: > "$REPORT"
say "gpu_check $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$REPORT"
python3 -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tail -1 | tee -a "$REPORT"

section "1. Triton advantage kernel tests on CUDA"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/advantage/test_triton_kernel.py \
  tests/advantage/test_compute_advantages.py > "$OUT/1_tests.log" 2>&1
say "exit $?: $(tail -1 "$OUT/1_tests.log")"

section "2. benchmarks/advantage.py on CUDA"
timeout 150 python3 benchmarks/advantage.py --device cuda --sizes 65536 1048576 16777216 --ks 1 3 8 --no-compile \
  > "$OUT/2_advantage.log" 2>&1
say "exit $?"; tail -40 "$OUT/2_advantage.log" >> "$REPORT"

section "3. bf16 training step, 0.48B Qwen2, HF backend"
timeout 200 python3 benchmarks/gpu_step.py --out "$OUT/3_step.json" > "$OUT/3_step.log" 2>&1
say "exit $?"; grep -E "^(gdpo|variant|fixed|token_budget|packed|command)" "$OUT/3_step.log" >> "$REPORT"
tail -5 "$OUT/3_step.log" | grep -iE "error|Traceback" >> "$REPORT"

section "4. train.py, 1 process on NCCL, 2 steps"
timeout 120 python3 - > "$OUT/4_nccl.log" 2>&1 <<'PY'
import subprocess, sys, tempfile
from pathlib import Path
from gdpo.testing import tiny_model, tiny_tokenizer
d = Path(tempfile.mkdtemp())
tok = tiny_tokenizer(); tiny_model(tokenizer=tok, seed=0).save_pretrained(d / "m"); tok.save_pretrained(d / "m")
cmd = [sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", f"model.name_or_path={d / 'm'}",
       "data.path=gdpo/demo/train.jsonl", "train.steps=2", f"train.run_dir={d / 'run'}", "rollout.group_size=4",
       "rollout.prompts_per_step=2", "rollout.max_new_tokens=16", "rewards.num_workers=1",
       "logging.progress_bar=false", "logging.wandb.mode=disabled", "rollout.dynamic_sampling=true",
       "rewards.functions=[{name: f, fn: format, kwargs: {template: think_answer}}, {name: l, fn: length, kwargs: {max_tokens: 8}}]"]
p = subprocess.run(cmd, capture_output=True, text=True)
print(p.stdout[-3000:]); print(p.stderr[-3000:])
print("NCCL RUN", "OK" if p.returncode == 0 and "on cuda" in p.stdout else f"FAILED (exit {p.returncode})")
PY
say "exit $?: $(grep 'NCCL RUN' "$OUT/4_nccl.log" || echo 'no verdict')"; grep "process(es) on" "$OUT/4_nccl.log" >> "$REPORT"
say ""; say "done $(date -u +%H:%M:%S)"
