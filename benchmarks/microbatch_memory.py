"""Peak memory of one update when one row is 8x longer than the rest: fixed micro-batches vs token-budget ones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/microbatch_memory.py          (~1 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/microbatch_memory.py --quick

One update (`gdpo.update.update_policy`, fp32, CPU) of 32 rows on the vs_trl.py model (4.1M parameters), every
completion 64 tokens, or the same with one row of 512. Fixed micro-batches of 8 rows pad the long row's micro-batch
to 8 x 512 tokens; the token budget (loss.max_tokens_per_micro_batch = 8 x 64 + prompt) puts the long row in a
micro-batch of its own. Each case runs in its own process; the figure is that process's peak RSS minus its RSS
just before the update (model, optimizer and batch already built), so it is the update's own working memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rows: int, short: int, long: int, micro: int, budget: int, quick: bool) -> dict:
    import torch

    from gdpo.demo.model import build_model
    from gdpo.demo.tokenizer import build_tokenizer
    from gdpo.distributed import build_engine
    from gdpo.plan import plan_batches
    from gdpo.update import FrozenLogprobs, TrainTensors, update_policy

    torch.manual_seed(0)
    tok = build_tokenizer()
    size = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=128) if quick else dict(hidden_size=256, num_hidden_layers=4,
                                                          num_attention_heads=8, num_key_value_heads=4,
                                                          intermediate_size=1024)
    model = build_model(tok, seed=0, **size)
    P = 32
    lengths = torch.full((rows,), short)
    lengths[0] = long
    T = int(lengths.max())
    ids = torch.randint(0, len(tok), (rows, P + T))
    cmask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    attn = torch.cat([torch.ones(rows, P, dtype=torch.long), cmask.long()], 1)
    x = TrainTensors(ids, attn, cmask, P, None)
    plan = plan_batches(prompts_per_step=rows // 4, group_size=4, world_size=1, micro_batch_size=micro,
                        max_tokens_per_micro_batch=budget)
    engine = build_engine(model, lr=1e-5, total_steps=1, micro_batch_size=plan.micro_batch_rows,
                          grad_accum_steps=plan.grad_accum)
    before = _rss_mb()
    update_policy(engine, x, torch.randn(rows), FrozenLogprobs(None, None), plan,
                  loss_kwargs=dict(eps_low=0.2, eps_high=0.28, aggregation="token_mean"), temperature=1.0,
                  chunk_size=1024)
    return {"update_mb": _rss_mb() - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(**json.loads(a.worker))))
        return
    rows, short, micro = (8, 8, 4) if a.quick else (32, 64, 8)
    budget = micro * (short + 32)
    cases = [("fixed micro-batches", "all rows short", dict(long=short, micro=micro, budget=0)),
             ("fixed micro-batches", "one row 8x longer", dict(long=8 * short, micro=micro, budget=0)),
             ("token budget", "all rows short", dict(long=short, micro=0, budget=budget)),
             ("token budget", "one row 8x longer", dict(long=8 * short, micro=0, budget=budget))]
    print(f"one update of {rows} rows x {short} completion tokens (one row {8 * short} in the 'longer' cases); "
          f"fixed micro-batches of {micro} rows vs a token budget of {budget}")
    print(f"{'micro-batching':22s} {'batch':20s} {'update MB':>10s}")
    for name, batch, kw in cases:
        arg = json.dumps(dict(rows=rows, short=short, quick=a.quick, **kw))
        p = subprocess.run([sys.executable, __file__, "--worker", arg], capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            print(f"{name:22s} {batch:20s} FAILED: {p.stderr.strip().splitlines()[-1:]}")
            continue
        mb = json.loads(p.stdout.strip().splitlines()[-1])["update_mb"]
        print(f"{name:22s} {batch:20s} {mb:10.0f}")
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/microbatch_memory.py" + (" --quick" if a.quick else "")
    print(f"command: {cmd}")


if __name__ == "__main__":
    main()
