"""Launched by tests/test_zero3.py: DeepSpeed ZeRO-3 on N ranks vs one process, on the same fixed data.

    torchrun --nproc_per_node 2 tests/dist_scripts/zero3_parity.py OUT     (2 ranks)
    python tests/dist_scripts/zero3_parity.py OUT                          (a world of one, no launcher)

Rank 0 writes OUT.json (numbers) and OUT.pt (parameters, gathered); the test compares the runs. In order:

1. ZeRO-3 engine of the tiny model: each rank's partition (parameters, fp32 optimizer state) and what it holds
   outside a forward.
2. GDPO advantages of a fixed batch split by whole groups across ranks as gdpo/trainer.py splits prompts, with
   the batch moments all-reduced (the trainer's `reduce_moments`), gathered back; also rank-local ones.
3. Two optimizer steps of the clipped policy loss on that batch through the trainer's own update
   (`gdpo.update.update_policy`: old log-probs from one no-grad pass, micro-batches of MICRO rows, the global
   token count for token_mean), for seq_mean_token_mean and token_mean, with fixed micro-batches and with
   token-budget ones, and padding-free (packed) token-budget ones. Plus the same two steps in plain torch
   (AdamW, clipping) on the whole batch: the reference that no DeepSpeed code touches.
4. (N > 1) ZeRO-2, and ZeRO-3 + CPU optimizer offload: one step each.
5. (N > 1) all-gather collectives during one HFRolloutEngine.generate vs a plain `generate` on the ZeRO-3
   module, for 2 and 8 new tokens; then one training step on the same engine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time


def main(out: str) -> None:
    import torch

    import gdpo.distributed as gd
    from gdpo.advantage import compute_advantages
    from gdpo.plan import plan_batches
    from gdpo.policy.loss import policy_loss
    from gdpo.policy.model import token_logprobs
    from gdpo.testing import tiny_model, tiny_tokenizer
    from gdpo.update import TrainTensors, frozen_logprobs, update_policy

    t_start = time.perf_counter()
    torch.set_num_threads(1)
    info = gd.init_distributed()
    rank, world = info.rank, info.world_size
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Two test-only changes to the config build_engine makes (it looks `deepspeed_config` up at call time):
    # - DeepSpeed keeps any parameter of <= stage3_param_persistence_threshold (default 1e5) elements whole on
    #   every rank; every tensor of the tiny model is smaller, so without 0 here nothing would be partitioned.
    #   (Real models: only biases / norms fall under 1e5; the default is right for them.)
    # - CPU optimizer offload uses DeepSpeed's CPUAdam, a C++ op JIT-compiled on first use (128 s measured on
    #   this 2-core machine); torch's AdamW on the offloaded fp32 partitions needs no build, and DeepSpeed
    #   accepts it with zero_force_ds_cpu_optimizer=false (the same maths; CPUAdam is only faster).
    base_config = gd.deepspeed_config

    def test_config(**kw):
        cfg = base_config(**kw)
        if cfg["zero_optimization"]["stage"] == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if "offload_optimizer" in cfg["zero_optimization"]:
            cfg["optimizer"]["params"]["torch_adam"] = True
            cfg["zero_force_ds_cpu_optimizer"] = False
        return cfg

    gd.deepspeed_config = test_config

    # All-gather collectives (ZeRO-3 parameter fetches), counted at DeepSpeed's comm layer.
    gathers = {"n": 0}

    def counting(fn):
        def wrapped(*a, **k):
            gathers["n"] += 1
            return fn(*a, **k)

        return wrapped

    for name in ("allgather_fn", "all_gather_into_tensor", "all_gather"):
        setattr(ds_comm, name, counting(getattr(ds_comm, name)))

    G, GROUPS, P, T, K = 4, 4, 5, 6, 3  # 4 prompts x G=4, prompts of 5 tokens, completions <= 6, 3 rewards
    N = GROUPS * G
    # lr 1e-4: with larger steps the tiny model (LM head x8) moves so far that step 2 clips every token.
    MICRO, LR, CLIP, STEPS, BUDGET = 4, 1e-4, 1.0, 2, 24
    local_groups = GROUPS // world
    rows = torch.arange(rank * local_groups * G, (rank + 1) * local_groups * G)  # whole groups, as trainer.py
    tok = tiny_tokenizer()

    g = torch.Generator().manual_seed(1000)  # the batch: identical on every rank
    ids = torch.randint(0, 256, (N, P + T), generator=g)
    attn = torch.ones(N, P + T, dtype=torch.long)
    left_pad = torch.randint(0, 3, (N,), generator=g)
    for i in range(N):
        attn[i, : left_pad[i]] = 0
    lengths = torch.randint(1, T + 1, (N,), generator=g)  # completion lengths differ per row and per rank
    cmask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [N, T]
    attn[:, P:] = cmask.long()
    rewards = torch.rand(N, K, generator=g).round(decimals=1)  # [N, K]
    rewards[:, 1] = (rewards[:, 1] > 0.5).float()  # a binary reward
    rewards[torch.rand(N, generator=g) < 0.25, 2] = float("nan")  # a conditional reward: NaN = does not apply

    all_gather_rows = gd.all_gather_rows

    def reduce_moments(m: torch.Tensor) -> torch.Tensor:  # the trainer's
        return gd.all_reduce_sum(m.clone())

    res: dict = {"world": world, "lr": LR}

    # ---- 2. advantages
    adv = compute_advantages(rewards[rows], G, "gdpo", reduce_moments=reduce_moments if world > 1 else None)
    res["adv_split"] = all_gather_rows(adv).tolist()
    res["adv_rank_local"] = all_gather_rows(compute_advantages(rewards[rows], G, "gdpo")).tolist()
    res["adv_whole"] = compute_advantages(rewards, G, "gdpo").tolist()
    adv_whole = torch.tensor(res["adv_whole"])

    def make_engine(zero_stage: int, offload: bool = False):
        return gd.build_engine(tiny_model(tokenizer=tok, seed=0), lr=LR, total_steps=STEPS,
                               zero_stage=zero_stage, grad_clip=CLIP, offload_optimizer=offload,
                               micro_batch_size=MICRO, grad_accum_steps=len(rows) // MICRO)

    def full_params(model) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):  # no-op unless ZeRO-3 partitioned
            return {k: v.detach().clone() for k, v in params.items()}

    def train(engine, steps: int, aggregation: str, budget: int = 0, packed: bool = False):
        """`steps` optimizer steps of the trainer's own update (gdpo.update.update_policy) on this rank's rows:
        old log-probs from one no-grad pass, then one epoch of one minibatch per step, micro-batches of MICRO."""
        plan = plan_batches(prompts_per_step=GROUPS, group_size=G, world_size=world,
                            micro_batch_size=0 if budget else MICRO, max_tokens_per_micro_batch=budget)
        plan = dataclasses.replace(plan, packed=packed)
        x = TrainTensors(ids[rows], attn[rows], cmask[rows], P, None)
        frozen = frozen_logprobs(engine.module, None, x, need_old=True, plan=plan, temperature=1.0,
                                 chunk_size=128)
        kwargs = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation)
        losses, norms, after = [], [], []
        for _ in range(steps):
            st = update_policy(engine, x, adv, frozen, plan, loss_kwargs=kwargs, temperature=1.0, chunk_size=128)
            # the objective the rank-averaged gradient descends: the mean of the ranks' losses
            step_loss = st.means["loss"]  # mean over the micro-batches: this rank's loss of the step
            losses.append(gd.all_reduce_sum(torch.tensor([step_loss], dtype=torch.float64)).item() / world)
            norms.append(st.grad_norm)
            after.append(full_params(engine.module))
        return losses, norms, after

    def train_torch(aggregation: str):
        """The same steps in plain torch on the whole batch (what every DeepSpeed run should reproduce)."""
        model = tiny_model(tokenizer=tok, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        with torch.no_grad():
            old = token_logprobs(model, ids, attn, P).logprobs
        losses, norms, after = [], [], []
        for _ in range(STEPS):
            loss, _ = policy_loss(token_logprobs(model, ids, attn, P).logprobs, old, adv_whole, cmask,
                                  eps_low=0.2, eps_high=0.28, aggregation=aggregation)
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            after.append(full_params(model))
        return losses, norms, after

    # ---- 1. + 3.
    params = {"init": full_params(tiny_model(tokenizer=tok, seed=0))}
    # *_budget: token-budget micro-batches (BUDGET tokens: 1-3 rows each, their number differs per rank);
    # *_packed: padding-free ones (loss.packing) of at most BUDGET real tokens, through sdpa's block-diagonal mask
    runs = (("seq_mean", "seq_mean_token_mean", 0, False), ("token_mean", "token_mean", 0, False),
            ("seq_mean_budget", "seq_mean_token_mean", BUDGET, False),
            ("token_mean_budget", "token_mean", BUDGET, False), ("token_mean_packed", "token_mean", BUDGET, True))
    for mode, aggregation, budget, packed in runs:
        engine = make_engine(3)
        if mode == "seq_mean":
            ps = list(engine.module.parameters())
            res["full_numel"] = sum(p.ds_numel for p in ps)
            owned = sum(p.ds_tensor.numel() for p in ps)
            res["partition_numel"] = all_gather_rows(torch.tensor([owned])).tolist()
            # outside a forward the full tensors are freed (numel 0): a rank holds only its partition
            res["resident_numel"] = all_gather_rows(torch.tensor([sum(p.numel() for p in ps)])).tolist()
            fp32 = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
            res["optimizer_fp32_numel"] = all_gather_rows(torch.tensor([fp32])).tolist()
        losses, norms, after = train(engine, STEPS, aggregation, budget, packed)
        res[f"{mode}/loss"], res[f"{mode}/grad_norm"] = losses, norms
        for s, p in enumerate(after, 1):
            params[f"{mode}/step{s}"] = p
    for mode, aggregation in (("torch/seq_mean", "seq_mean_token_mean"), ("torch/token_mean", "token_mean")):
        res[f"{mode}/loss"], res[f"{mode}/grad_norm"], after = train_torch(aggregation)
        for s, p in enumerate(after, 1):
            params[f"{mode}/step{s}"] = p

    if world > 1:
        # ---- 4. ZeRO-2 and ZeRO-3 with CPU optimizer offload: one step each
        for mode, stage, offload in (("zero2", 2, False), ("zero3_offload", 3, True)):
            engine = make_engine(stage, offload)
            res[f"{mode}/optimizer"] = type(engine.optimizer.optimizer).__name__
            res[f"{mode}/offload"] = bool(engine.zero_cpu_offload())
            losses, norms, after = train(engine, 1, "seq_mean_token_mean")
            res[f"{mode}/loss"], res[f"{mode}/grad_norm"] = losses, norms
            params[f"{mode}/step1"] = after[0]

        # ---- 5. generation on the partitioned policy (greedy: every rank generates the same)
        from gdpo.rollout import HFRolloutEngine, SamplingParams

        engine = make_engine(3)
        module = engine.module
        prompts = [[72, 105, 32, 116, 104], [50, 43, 50, 61]]
        x = torch.tensor([prompts[0]])
        with torch.no_grad():  # warm-up: the first forward records ZeRO-3's module trace (extra fetches)
            module.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=1,
                            pad_token_id=tok.pad_token_id)
        for new in (2, 8):
            gathers["n"] = 0
            with torch.no_grad():
                plain = module.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                        max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
            res[f"gen/plain_gathers/{new}"] = gathers["n"]
            res[f"gen/plain_tokens/{new}"] = plain.shape[1] - x.shape[1]
            rollout = HFRolloutEngine(engine, tok, SamplingParams(max_new_tokens=new, temperature=0.0))
            gathers["n"] = 0
            batch = rollout.generate(prompts, 2)
            res[f"gen/hf_gathers/{new}"] = gathers["n"]
            res[f"gen/hf_tokens/{new}"] = batch.completion_lengths.tolist()
            # the full weights gathered for generation must be freed again afterwards
            available = sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in module.parameters())
            res[f"gen/available_after/{new}"] = available
        res["gen/train_loss"], _, after = train(engine, 1, "seq_mean_token_mean")
        params["gen/train_step1"] = after[0]

    res["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        torch.save(params, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump(res, f, indent=1)
    gd.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
