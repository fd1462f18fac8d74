"""The training loop: rollout -> reward bank -> advantages -> clipped policy-gradient update -> log -> checkpoint.

Read it top to bottom: ``train`` sets everything up, then every step runs the numbered phases. Components get
flat arguments; this is the only place that reads the config.

Where this departs from the GDPO paper's reference code (TRL / verl):
- one process group for everything, every group of G rollouts lives on one rank, so group statistics need no
  communication; only GDPO's batch normalisation all-reduces its three moments (a rank-local mean/std would
  be a different algorithm);
- with one update epoch over one minibatch, the "old" log-probs are the current ones detached (ratio 1, the same
  gradient), which saves a forward pass over the batch, as TRL does;
- dynamic sampling drops a group only when *every* reward is constant in it, not when their sum is;
- token_mean divides by the tokens of the whole minibatch, summed over micro-batches and ranks (DAPO's global
  token mean: 2 ranks train exactly like 1 process on the same rollouts).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdpo.advantage import compute_advantages
from gdpo.advantage.diagnostics import advantage_stats
from gdpo.config import Config, ConfigError, to_dict


@dataclass
class StepBatch:
    """One step's training data on this rank (rows = rollouts, each prompt's G rollouts contiguous)."""

    rollout: Any  # gdpo.rollout.RolloutBatch [N, ...]
    rewards: torch.Tensor  # [N, K] float32, NaN = does not apply
    prompt_texts: list[str]  # [N]
    reward_metrics: dict[str, float]
    dropped_groups: int  # groups removed by dynamic sampling
    rounds: int  # generation rounds this step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_dtype(name: str) -> torch.dtype | None:
    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _constant_groups(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """[P] bool: groups in which every reward is constant over its applicable rollouts (no signal at all)."""
    r = rewards.view(-1, g, rewards.shape[1])  # [P, G, K]
    valid = ~torch.isnan(r)
    big = torch.finfo(r.dtype).max
    spread = torch.where(valid, r, -big).amax(1) > torch.where(valid, r, big).amin(1)  # [P, K]
    return ~spread.any(1)


def _cat_rollouts(parts: list, pad_id: int):
    """Concatenate RolloutBatches (different P, T widths): left-pad prompts, right-pad completions."""
    from gdpo.rollout import RolloutBatch

    if len(parts) == 1:
        return parts[0]
    p_w = max(b.prompt_ids.shape[1] for b in parts)
    t_w = max(b.completion_ids.shape[1] for b in parts)

    def lpad(x, w, v):
        return torch.nn.functional.pad(x, (w - x.shape[1], 0), value=v)

    def rpad(x, w, v):
        return torch.nn.functional.pad(x, (0, w - x.shape[1]), value=v)

    logps = None
    if all(b.sampling_logprobs is not None for b in parts):
        logps = torch.cat([rpad(b.sampling_logprobs, t_w, 0.0) for b in parts])
    return RolloutBatch(
        prompt_ids=torch.cat([lpad(b.prompt_ids, p_w, pad_id) for b in parts]),
        prompt_mask=torch.cat([lpad(b.prompt_mask, p_w, 0) for b in parts]),
        completion_ids=torch.cat([rpad(b.completion_ids, t_w, pad_id) for b in parts]),
        completion_mask=torch.cat([rpad(b.completion_mask, t_w, 0) for b in parts]),
        completion_lengths=torch.cat([b.completion_lengths for b in parts]),
        truncated=torch.cat([b.truncated for b in parts]),
        completion_texts=[t for b in parts for t in b.completion_texts],
        group_size=parts[0].group_size,
        sampling_logprobs=logps,
    )


def _select_groups(batch, rewards: torch.Tensor, prompts: list[str], keep: torch.Tensor, g: int):
    """Keep the groups whose index is in ``keep`` [P'] (rows follow)."""
    rows = (keep.view(-1, 1) * g + torch.arange(g)).flatten()  # [P' * G]
    return batch.rows(rows), rewards[rows], [prompts[i] for i in rows.tolist()]


def train(cfg: Config) -> dict[str, float]:
    """Run training as configured; returns the last step's metrics."""
    from gdpo import checkpoint as ckpt
    from gdpo import distributed as dist
    from gdpo.data import PromptIterator, collate, load_prompt_dataset
    from gdpo.metrics import RunLogger
    from gdpo.policy.loss import policy_loss
    from gdpo.policy.model import load_causal_lm, load_reference_model, load_tokenizer, token_logprobs
    from gdpo.policy.model import token_logprobs_batched
    from gdpo.rewards import RewardBank
    from gdpo.rollout import SamplingParams
    from gdpo.rollout.factory import make_rollout_engine

    # ---------------------------------------------------------------- 0. processes, seeds, run directory
    info = dist.init_distributed()
    world, rank = info.world_size, info.rank
    device = info.device
    run_dir = Path(cfg.train.run_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and data order
    G = cfg.rollout.group_size
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(
            f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} is not divisible by the {world} processes"
        )
    local_prompts = cfg.rollout.prompts_per_step // world
    local_rows = local_prompts * G
    minibatch = (cfg.loss.minibatch_size // world) if cfg.loss.minibatch_size else local_rows
    if minibatch < 1 or local_rows % minibatch:
        raise ConfigError(
            f"loss.minibatch_size: {cfg.loss.minibatch_size} must split the {local_rows * world} rollouts per "
            f"step evenly across {world} processes"
        )
    micro = cfg.loss.micro_batch_size or minibatch
    if minibatch % micro:
        raise ConfigError(f"loss.micro_batch_size: {micro} does not divide the per-rank minibatch of {minibatch}")
    grad_accum = minibatch // micro
    updates_per_step = cfg.loss.epochs * (local_rows // minibatch)

    # ---------------------------------------------------------------- 1. model, tokenizer, reference
    model_path = cfg.model.name_or_path
    system_prompt, data_path = cfg.data.system_prompt, cfg.data.path
    if model_path == "demo" or data_path == "demo":
        from gdpo.demo import DEMO, TRAIN_FILE, warm_start

        if model_path == "demo":
            if dist.is_main():
                warm_start(run_dir, seed=cfg.train.seed)
            dist.barrier()
            model_path = str(run_dir / "sft")
        if data_path == "demo":
            data_path = str(TRAIN_FILE)
            # the warm start saw no system turn, so by default RL prompts have none either
            system_prompt = system_prompt if system_prompt is not None else DEMO.system_prompt
    if not (Path(model_path).exists() or "/" in model_path):
        raise ConfigError(f"model.name_or_path: {model_path!r} is neither a local directory nor a hub id")
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.tokenizer: cannot load {cfg.model.tokenizer or model_path!r} ({e})") from None
    model_kwargs = dict(
        dtype=_resolve_dtype(cfg.model.dtype),
        device=device,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    try:
        model = load_causal_lm(model_path, gradient_checkpointing=cfg.model.gradient_checkpointing, **model_kwargs)
        ref_model = load_reference_model(cfg.model.ref_name_or_path or model_path, beta=cfg.loss.beta, **model_kwargs)
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot load {model_path!r} ({e})") from None

    # ---------------------------------------------------------------- 2. prompts
    try:
        dataset = load_prompt_dataset(
            data_path,
            tokenizer,
            split=cfg.data.split,
            limit=cfg.data.max_samples,
            prompt_field=cfg.data.prompt_field,
            answer_field=cfg.data.answer_field,
            extra_fields=cfg.data.columns,
            system_prompt=system_prompt,
            prompt_template=cfg.data.prompt_template or "{prompt}",
            use_chat_template=cfg.data.use_chat_template and not cfg.data.prompt_template,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            on_error=cfg.data.on_bad_row,
        )
    except (ValueError, OSError, FileNotFoundError) as e:
        raise ConfigError(f"data.path: {data_path!r}: {e}") from None
    prompts_iter = PromptIterator(
        len(dataset), cfg.rollout.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle
    )

    # ---------------------------------------------------------------- 3. reward bank
    try:
        bank = RewardBank(cfg.rewards.functions, num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    weights = list(bank.weights)

    # ---------------------------------------------------------------- 4. DeepSpeed engine, rollout engine
    bf16 = {"auto": None, "true": True, "false": False}[cfg.deepspeed.bf16]
    total_updates = cfg.train.steps * updates_per_step
    engine = dist.build_engine(
        model,
        lr=cfg.optim.lr,
        total_steps=total_updates,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=int(round(cfg.optim.warmup_ratio * total_updates)),
        schedule=cfg.optim.schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        zero_stage=cfg.deepspeed.zero_stage,
        grad_clip=cfg.optim.grad_clip,
        bf16=bf16,
        offload_optimizer=cfg.deepspeed.offload_optimizer,
        offload_params=cfg.deepspeed.offload_param,
        micro_batch_size=micro,
        grad_accum_steps=grad_accum,
    )
    policy = engine.module
    sampling = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        min_new_tokens=cfg.rollout.min_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop_strings=tuple(cfg.rollout.stop),
        return_logprobs=cfg.rollout.backend != "hf" and cfg.loss.is_correction,
    )
    try:
        rollout_engine = make_rollout_engine(
            cfg.rollout.backend,
            engine if cfg.rollout.backend == "hf" else policy,  # hf: the engine, to gather ZeRO-3 weights once
            tokenizer,
            sampling,
            generation_batch_size=cfg.rollout.generation_batch_size or None,
            fast_decode=cfg.rollout.hf_fast_decode,
            model_path=model_path,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size,
            sleep=cfg.rollout.vllm_sleep,
            sync_chunk_mb=cfg.rollout.weight_sync_chunk_mb,
            sync_timeout_s=cfg.rollout.weight_sync_timeout_s,
            seed=cfg.train.seed,
        )
    except ValueError as e:
        raise ConfigError(f"rollout.backend: {e}") from None

    # ---------------------------------------------------------------- 5. resume
    start_step = 0
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, engine=engine)
        start_step = state.step
        prompts_iter.load_state_dict(state.data_state)
        rollout_engine.sync_weights(policy)
        if dist.is_main():
            print(f"resumed from {resume_from} at step {start_step}", flush=True)

    logger = RunLogger(
        run_dir,
        active=dist.is_main(),
        total_steps=cfg.train.steps,
        start_step=start_step,
        progress_bar=cfg.logging.progress_bar,
        wandb_mode_requested=cfg.logging.wandb.mode,
        project=cfg.logging.wandb.project,
        entity=cfg.logging.wandb.entity,
        name=cfg.logging.wandb.name,
        tags=cfg.logging.wandb.tags,
        config=to_dict(cfg),
        reward_names=bank.names,
    )
    if dist.is_main():
        skipped = f", skipped {dataset.skipped}" if dataset.skipped else ""
        print(f"gdpo: {len(dataset)} prompts{skipped}; {cfg.rollout.prompts_per_step} prompts x G={G} per step; "
              f"rewards {bank.names}; estimator {cfg.advantage.estimator}; {world} process(es) on {device.type}; "
              f"run dir {run_dir}", flush=True)

    def reduce_moments(m: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(m.clone())

    last: dict[str, float] = {}
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            t_step = time.perf_counter()
            timings = {"generate": 0.0, "reward": 0.0}

            # ---------------------------------------------------- 6. rollout + rewards (+ dynamic sampling)
            kept_b, kept_r, kept_p = [], [], []
            spare_b, spare_r, spare_p = [], [], []
            n_kept, dropped, rounds = 0, 0, 0
            reward_seconds: dict[str, float] = {}
            reward_errors: dict[str, float] = {}
            while True:
                rounds += 1
                idx = prompts_iter.next_indices()[rank * local_prompts : (rank + 1) * local_prompts]
                pb = collate(dataset, idx)
                t0 = time.perf_counter()
                rb = rollout_engine.generate(pb.prompt_ids, G)
                timings["generate"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                expand = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
                columns = {"answer": expand(pb.answers), **{k: expand(v) for k, v in pb.extras.items()}}
                res = bank.score(expand(pb.prompt_texts), rb.completion_texts, rb.completion_lengths.tolist(), columns)
                timings["reward"] += time.perf_counter() - t0
                for name in bank.names:
                    reward_seconds[name] = reward_seconds.get(name, 0.0) + res.seconds.get(name, 0.0)
                    for kind, counts in (("errors", res.errors), ("timeouts", res.timeouts)):
                        key = f"rewards/{name}/{kind}"
                        reward_errors[key] = reward_errors.get(key, 0.0) + counts.get(name, 0)
                prompts_n = expand(pb.prompt_texts)
                if not cfg.rollout.dynamic_sampling:
                    kept_b, kept_r, kept_p, n_kept = [rb], [res.matrix], [prompts_n], len(idx)
                    break
                const = _constant_groups(res.matrix, G)  # [P]
                keep, drop = (~const).nonzero().flatten(), const.nonzero().flatten()
                take = keep[: local_prompts - n_kept]
                b, r, p = _select_groups(rb, res.matrix, prompts_n, take, G)
                kept_b.append(b), kept_r.append(r), kept_p.append(p)
                n_kept += len(take)
                dropped += len(drop)
                if len(drop):
                    b, r, p = _select_groups(rb, res.matrix, prompts_n, drop, G)
                    spare_b.append(b), spare_r.append(r), spare_p.append(p)
                # every rank runs the same number of rounds (generation may gather ZeRO-3 shards collectively)
                short = torch.tensor([float(n_kept < local_prompts)])
                if world > 1:
                    short = dist.all_reduce_sum(short)
                if short.item() == 0:
                    break
                if rounds >= cfg.rollout.dynamic_sampling_max_rounds:
                    # out of rounds: fill with signal-free groups (their advantage is ~0) so that every rank
                    # trains on the same number of rows
                    need = local_prompts - n_kept
                    sb = _cat_rollouts(spare_b, rollout_engine.pad_id)
                    sel = torch.arange(need)
                    b, r, p = _select_groups(sb, torch.cat(spare_r), sum(spare_p, []), sel, G)
                    if need:
                        kept_b.append(b), kept_r.append(r), kept_p.append(p)
                    n_kept = local_prompts
                    break
            batch = _cat_rollouts(kept_b, rollout_engine.pad_id)
            rewards = torch.cat(kept_r)  # [N, K]
            prompt_texts = sum(kept_p, [])

            # ---------------------------------------------------- 7. advantages (groups are rank-local)
            t0 = time.perf_counter()
            advantages = compute_advantages(
                rewards.to(device),
                G,
                cfg.advantage.estimator,
                weights=weights,
                eps=cfg.advantage.eps,
                batch_norm=cfg.advantage.batch_norm,
                backend=cfg.advantage.backend,
                aggregate=cfg.advantage.aggregate,
                group_std=cfg.advantage.group_std,
                reduce_moments=reduce_moments if world > 1 else None,
            )  # [N] float32
            timings["advantage"] = time.perf_counter() - t0

            # ---------------------------------------------------- 8. old / reference log-probs
            t0 = time.perf_counter()
            input_ids = batch.input_ids().to(device)  # [N, P + T]
            attn = batch.attention_mask().to(device)  # [N, P + T]
            cmask = batch.completion_mask.to(device).float()  # [N, T]
            P = batch.prompt_len
            lp_kwargs = dict(temperature=cfg.rollout.temperature, chunk_size=cfg.model.logprob_chunk_size)
            reuse_current = updates_per_step == 1  # one update: old = current, detached (no extra forward)
            old_logps = None
            if not reuse_current:
                old_logps = token_logprobs_batched(policy, input_ids, attn, P, micro_batch_size=micro,
                                                   **lp_kwargs).logprobs
            ref_logps = None
            if ref_model is not None:
                ref_logps = token_logprobs_batched(ref_model, input_ids, attn, P, micro_batch_size=micro,
                                                   **lp_kwargs).logprobs
            timings["logprobs"] = time.perf_counter() - t0

            # ---------------------------------------------------- 9. update: epochs x minibatches x micro-batches
            t0 = time.perf_counter()
            policy.train()
            sums: dict[str, float] = {}
            n_micro = 0
            grad_norms, lrs = [], []
            max_len = cfg.rollout.max_new_tokens
            for _epoch in range(cfg.loss.epochs):
                order = torch.randperm(len(advantages)) if cfg.loss.epochs > 1 or minibatch < len(advantages) else None
                for mb_start in range(0, len(advantages), minibatch):
                    mb = (order[mb_start : mb_start + minibatch] if order is not None
                          else torch.arange(mb_start, min(mb_start + minibatch, len(advantages))))
                    # token_mean divides by the tokens of the whole minibatch across ranks and micro-batches (the
                    # engine divides by grad_accum and averages over ranks, hence the two factors)
                    mb_tok = cmask[mb.to(device)].sum().double().view(1)
                    mb_tokens = (dist.all_reduce_sum(mb_tok) if world > 1 else mb_tok).item() / world / grad_accum
                    for u_start in range(0, len(mb), micro):
                        rows = mb[u_start : u_start + micro].to(device)
                        out = dist.engine_forward(engine, token_logprobs, input_ids[rows], attn[rows], P,
                                                  return_entropy=True, **lp_kwargs)
                        old = out.logprobs.detach() if reuse_current else old_logps[rows]
                        is_w = None
                        if batch.sampling_logprobs is not None:
                            samp = batch.sampling_logprobs.to(device)[rows]
                            um = cmask[rows]
                            gap = ((old - samp).abs() * um).sum() / um.sum().clamp(min=1)
                            sums["logprob_gap"] = sums.get("logprob_gap", 0.0) + float(gap)
                            if cfg.loss.is_correction:
                                # truncated importance weight for the engine/trainer log-prob gap
                                is_w = torch.exp(old - samp).clamp(max=cfg.loss.is_cap)
                        loss, st = policy_loss(
                            out.logprobs,
                            old,
                            advantages[rows],
                            cmask[rows],
                            eps_low=cfg.loss.eps_low,
                            eps_high=cfg.loss.eps_high,
                            aggregation=cfg.loss.aggregation,
                            ref_logps=None if ref_logps is None else ref_logps[rows],
                            beta=cfg.loss.beta,
                            max_len=max_len,
                            is_weights=is_w,
                            num_tokens=mb_tokens,
                        )
                        engine.backward(loss)
                        s = dist.optimizer_step(engine)
                        if s is not None:
                            grad_norms.append(s.grad_norm if s.grad_norm is not None else float("nan"))
                            lrs.append(s.lr)
                        n_micro += 1
                        ent = (out.entropy.detach() * cmask[rows]).sum() / cmask[rows].sum().clamp(min=1)
                        for k, v in (*st._asdict().items(), ("entropy", ent)):
                            sums[k] = sums.get(k, 0.0) + float(v)
            rollout_engine.sync_weights(policy)
            timings["update"] = time.perf_counter() - t0

            # ---------------------------------------------------- 10. metrics (averaged over ranks)
            lengths = batch.completion_lengths.float()
            m: dict[str, float] = {}
            for k, name in enumerate(bank.names):
                col = rewards[:, k]
                col = col[~torch.isnan(col)]
                m[f"rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
                m[f"rewards/{name}/std"] = col.std().item() if col.numel() > 1 else 0.0
                m[f"rewards/{name}/seconds"] = reward_seconds.get(name, 0.0)
            m.update(reward_errors)
            w = torch.tensor(weights)
            m["rewards/weighted_sum/mean"] = (torch.nan_to_num(rewards) * w).sum(1).mean().item()
            m.update(advantage_stats(rewards, advantages.cpu(), G, bank.names, estimator=cfg.advantage.estimator,
                                     weights=weights, eps=cfg.advantage.eps, aggregate=cfg.advantage.aggregate,
                                     group_std=cfg.advantage.group_std))
            m.update({f"loss/{k}": v / max(n_micro, 1) for k, v in sums.items() if k != "num_tokens"})
            m["optim/grad_norm"] = float(np.nanmean(grad_norms)) if grad_norms else float("nan")
            m["optim/lr"] = lrs[-1] if lrs else float("nan")
            m["len/mean"] = lengths.mean().item()
            m["len/max"] = lengths.max().item()
            m["len/truncated_frac"] = batch.truncated.float().mean().item()
            m["sampling/dropped_groups"] = float(dropped)
            m["sampling/rounds"] = float(rounds)
            if "loss/logprob_gap" in m:
                m["sampling/logprob_gap"] = m.pop("loss/logprob_gap")
            m.update(getattr(rollout_engine, "last_sync", None) or {})
            m.update({f"time/{k}": v for k, v in timings.items()})
            m.update({f"time/rollout_{k}": float(v) for k, v in batch.stats.items() if isinstance(v, (int, float))})
            keys = sorted(m)
            vals = torch.tensor([m[k] for k in keys], dtype=torch.float64)
            vals = dist.all_reduce_sum(torch.nan_to_num(vals, nan=0.0)) / world if world > 1 else vals
            m = dict(zip(keys, vals.tolist()))
            step_time = time.perf_counter() - t_step
            m["time/step"] = step_time
            m["throughput/tokens_per_s"] = float(lengths.sum().item() * world) / max(step_time, 1e-9)
            m["train/step"] = float(step)
            logger.log(step, m)
            if cfg.logging.completions_every and (step % cfg.logging.completions_every == 0 or step == 1):
                n_show = min(cfg.logging.completions_to_log, len(prompt_texts))
                logger.log_completions(step, [
                    {"prompt": prompt_texts[i], "completion": batch.completion_texts[i],
                     **{name: float(rewards[i, k]) for k, name in enumerate(bank.names)},
                     "advantage": float(advantages[i])}
                    for i in range(n_show)
                ])
            last = m

            # ---------------------------------------------------- 11. checkpoint
            every = cfg.checkpoint.every
            if (every and step % every == 0) or (step == cfg.train.steps and cfg.checkpoint.save_final):
                ckpt.save_checkpoint(run_dir, step, engine=engine, data_state=prompts_iter.state_dict(),
                                     tokenizer=tokenizer, keep_last=cfg.checkpoint.keep_last)
    finally:
        bank.close()
        png = logger.finish()
        if dist.is_main():
            where = [f"metrics {run_dir / 'metrics.jsonl'}"]
            if png:
                where.append(f"reward curves {png}")
            final = ckpt.list_checkpoints(run_dir)
            if final:
                where.append(f"checkpoint {final[-1][1]}")
            if getattr(logger, "wandb_mode", "disabled") != "disabled":
                where.append(f"W&B ({logger.wandb_mode}) {run_dir / 'wandb'}")
            print("done: " + "; ".join(where), flush=True)
    return last
