"""What the padding-free packed path (loss.packing) costs where no variable-length attention kernel exists (CPU,
sdpa): one update's forward + backward over ragged rows, padded token-budget micro-batches vs packed ones of the
same budget, alternated rounds in one process, medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py            (~2 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py --quick

The rows: 32 completions of geometric lengths (mean ~48, cap 256, the vs_trl natural workload's shape) after
prompts of 20..40 tokens, left-padded; the vs_trl.py-sized model (4.1M parameters, fp32). Packed, a micro-batch's
rows are one sequence and sdpa attends over a dense block-diagonal [L, L] mask: no compute on padding in the
projections and MLP, but attention over L^2 positions instead of rows x width^2. This is why gdpo runs packing only
on flash_attention_2 / 3 (varlen kernels) and falls back to padded micro-batches elsewhere, saying so at start.
It also prints the share of positions that were padding (optim/pad_frac) in each case.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from gdpo.demo.model import build_model
    from gdpo.demo.tokenizer import build_tokenizer
    from gdpo.distributed import build_engine
    from gdpo.plan import plan_batches
    from gdpo.update import FrozenLogprobs, TrainTensors, update_policy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args()
    rows, cap, mean, budget, rounds = (8, 64, 12.0, 256, 2) if a.quick else (32, 256, 48.0, 2048, 5)
    rounds = a.rounds or rounds
    torch.manual_seed(0)
    tok = build_tokenizer()
    size = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=128) if a.quick else dict(hidden_size=256, num_hidden_layers=4,
                                                            num_attention_heads=8, num_key_value_heads=4,
                                                            intermediate_size=1024)
    g = torch.Generator().manual_seed(0)
    comp = torch.distributions.Geometric(probs=torch.tensor(1 / mean)).sample((rows,)).long().clamp(1, cap)
    prompt = torch.randint(20, 41, (rows,), generator=g)
    P, T = int(prompt.max()), int(comp.max())
    ids = torch.randint(0, len(tok) - 3, (rows, P + T), generator=g)
    attn = torch.zeros(rows, P + T, dtype=torch.long)
    for i in range(rows):
        attn[i, P - int(prompt[i]) : P + int(comp[i])] = 1
    cmask = attn[:, P:].float()
    x = TrainTensors(ids, attn, cmask, P, None)
    base = plan_batches(prompts_per_step=rows // 4, group_size=4, world_size=1, max_tokens_per_micro_batch=budget)
    cases = {"padded": base, "packed": dataclasses.replace(base, packed=True)}
    engines = {name: build_engine(build_model(tok, seed=0, **size), lr=1e-6, total_steps=rounds + 1,
                                  micro_batch_size=base.micro_batch_rows, grad_accum_steps=base.grad_accum)
               for name in cases}
    times: dict[str, list[float]] = {n: [] for n in cases}
    stats = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (cases if r % 2 else reversed(list(cases))):
            t0 = time.perf_counter()
            stats[name] = update_policy(engines[name], x, torch.randn(rows, generator=g), FrozenLogprobs(None, None),
                                        cases[name], loss_kwargs=dict(eps_low=0.2, eps_high=0.28,
                                                                      aggregation="token_mean"),
                                        temperature=1.0, chunk_size=1024)
            if r:
                times[name].append(time.perf_counter() - t0)
    print(f"one update of {rows} rows: prompts 20..40, completions geometric mean {mean:g} (cap {cap}; "
          f"min {int(comp.min())}, median {int(comp.median())}, max {int(comp.max())}), token budget {budget}; "
          f"{sum(p.numel() for p in engines['padded'].module.parameters()) / 1e6:.1f}M parameters, fp32, "
          f"{torch.get_num_threads()} thread(s), sdpa on CPU; median of {rounds} alternated rounds")
    for name in cases:
        st = stats[name]
        print(f"{name:7s} update {statistics.median(times[name]):7.3f} s  micro-batches {st.micro_batches:3d}  "
              f"positions {st.tokens_computed:6d}  padding {st.pad_frac:.2f}")
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    print(f"ratio packed / padded (sdpa, no varlen kernel): update {ratio:.2f}")
    print("command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py" + (" --quick" if a.quick else ""))


if __name__ == "__main__":
    main()
