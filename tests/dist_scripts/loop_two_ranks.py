"""Launched by tests/test_metrics.py on 2 CPU ranks (torchrun --standalone --nproc_per_node 2 ... OUT):

1. metric reduction: rank-dependent values through Metrics.reduce(gdpo.distributed.all_reduce);
2. collect_batch with dynamic sampling where rank 0 is full after round 1 and never drops a group while rank 1
   never finds signal, for dynamic_sampling_max_rounds 1 and 3: both ranks must finish, with the same rounds.
Rank r writes OUT.rank<r>.json.
"""

import json
import sys

import torch

import gdpo.distributed as gd
from gdpo.metrics import Metrics
from gdpo.sampling import collect_batch
from gdpo.testing import FakePrompts, FakeRolloutEngine, FakeScorer


def main(out: str) -> None:
    info = gd.init_distributed()
    rank = info.rank
    res: dict = {"world": info.world_size}
    nan = float("nan")
    m = Metrics()
    values = [torch.tensor([1.0, 2.0, nan]), torch.tensor([10.0, nan])][rank]
    m.mean_of("mean", values)
    m.max("max", values.nan_to_num(nan=-1.0).max().item())
    m.min("min", [5.0, 3.0][rank])
    m.sum("sum", [1.0, 2.0][rank])
    m.std("std", values)
    m.mean("all_nan", nan)
    m.max("max_nan", nan)
    m.corr("corr", [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])][rank],
           [torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])][rank])
    res["metrics"] = m.reduce(gd.all_reduce)
    bad = Metrics()
    bad.sum(["a", "b"][rank], 1.0)
    try:
        bad.reduce(gd.all_reduce)
        res["mismatch"] = "accepted"
    except RuntimeError as e:
        res["mismatch"] = str(e)

    def signal(p, c):  # rank 0: every group has signal; rank 1: none ever
        return [float(c.split("s")[1][0]) if rank == 0 else 0.0, 1.0]

    for rounds in (1, 3):
        sb = collect_batch(FakeRolloutEngine(), FakeScorer(["a", "b"], signal), FakePrompts(2, start=10 * rank).next,
                           group_size=2, prompts_per_rank=2, pad_id=0, dynamic_sampling=True, max_rounds=rounds,
                           any_rank=gd.any_rank)
        res[f"rounds{rounds}"] = {"rounds": sb.rounds, "rows": sb.num_rows, "dropped": sb.dropped_groups,
                                  "prompts": sb.prompt_texts}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(res, f)
    gd.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
