#!/usr/bin/env bash
# 5 steps of the demo task with each related-work switch (issue 14): every run must exit 0 with finite rewards.
#     bash benchmarks/variants_demo.sh          (~5 min on 2 cores once the demo warm start is cached)
# Prints one line per variant: its name, exit code and the step-5 line.
cd "$(dirname "$0")/.."
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$PWD/.cache}  # the demo warm start `make demo` cached
out=runs/variants
mkdir -p "$out"
common="model.name_or_path=demo train.steps=5 logging.progress_bar=false logging.wandb.mode=disabled
        checkpoint.save_final=false train.overwrite=true"
run() {
  name=$1; shift
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 .venv/bin/python train.py --config configs/tiny_gdpo.yaml $common train.run_dir="$out/$name" \
    "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(grep '^step 5 |' "$out/$name.log")"
}
run gspo --config configs/tiny_gspo.yaml
run cispo loss.objective=cispo loss.eps_low=0.2 loss.eps_high=0.2
run sapo loss.objective=sapo loss.eps_low=0.2 loss.eps_high=0.2
run dler advantage.estimator=dler
run leave_one_out advantage.baseline=leave_one_out advantage.estimator=grpo
run gfpo_length advantage.gfpo_keep=4 advantage.gfpo_metric=length
run gfpo_efficiency advantage.gfpo_keep=5 advantage.gfpo_metric=efficiency
run mask_truncated loss.mask_truncated=true rewards.truncated_value=0
run top_p_top_k rollout.top_p=0.9 rollout.top_k=20
