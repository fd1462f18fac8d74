"""The training loop: rollout -> reward bank -> advantages -> clipped policy-gradient update -> log -> checkpoint.

Read `train` top to bottom: `setup` builds every component from its config section, then each step runs the
numbered phases. The phases live in modules that say what they hold: `gdpo.sampling` (generation, rewards,
dynamic sampling), `gdpo.advantage` (the estimators), `gdpo.update` (frozen log-probs and the update),
`gdpo.metrics` (what is logged and how it is reduced over ranks); every collective is in `gdpo.distributed`.

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

import time
from contextlib import contextmanager

from gdpo import distributed as dist
from gdpo.advantage import compute_advantages
from gdpo.config import Config
from gdpo.metrics import step_metrics
from gdpo.sampling import StepBatch, collect_batch, gfpo_filter
from gdpo.setup import TrainContext, setup
from gdpo.update import TrainTensors, frozen_logprobs, update_policy


class Stopwatch(dict):
    """Seconds per phase: ``with clock("update"): ...`` adds the block's wall time under "update"."""

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def train(cfg: Config) -> dict[str, float]:
    """Run training as configured; returns the last step's metrics (reduced over ranks)."""
    ctx = setup(cfg)
    rc, ac, lc, G = cfg.rollout, cfg.advantage, cfg.loss, cfg.rollout.group_size
    # the trainer's log-probs use the sampler's truncation too (top-k / top-p): the IS ratio compares like with like
    lp_kwargs = dict(temperature=rc.temperature, chunk_size=cfg.model.logprob_chunk_size, top_p=rc.top_p,
                     top_k=rc.top_k)
    last: dict[str, float] = {}
    try:
        for step in range(ctx.start_step + 1, cfg.train.steps + 1):
            t_step, clock = time.perf_counter(), Stopwatch()
            # 1. rollouts + rewards (+ dynamic sampling): this rank's P_local prompts x G
            sb = collect_batch(ctx.rollout, ctx.bank, ctx.prompts.next, group_size=G,
                               prompts_per_rank=ctx.plan.prompts_per_rank, pad_id=ctx.rollout.pad_id,
                               dynamic_sampling=rc.dynamic_sampling, max_rounds=rc.dynamic_sampling_max_rounds,
                               any_rank=dist.any_rank, truncated_value=cfg.rewards.truncated_value)
            clock.update(generate=sb.generate_s, reward=sb.reward_s)
            if ac.gfpo_keep:  # GFPO: keep gfpo_keep of each group's G; the group statistics use those only
                sb = gfpo_filter(sb, ac.gfpo_keep, ac.gfpo_metric, ctx.bank.weights)
            # 2. advantages: groups are rank-local; GDPO's batch moments are summed over ranks
            with clock("advantage"):
                adv = compute_advantages(sb.rewards.to(ctx.device), sb.rollout.group_size, weights=ctx.bank.weights,
                                         batch_norm=ac.batch_norm, backend=ac.backend,
                                         reduce_moments=_sum_moments if ctx.info.world_size > 1 else None,
                                         **ctx.adv_kwargs)  # [N] float32
            # 3. frozen log-probs: old (only with several optimizer steps per step) and reference
            x = TrainTensors.from_rollout(sb.rollout, ctx.device, mask_truncated=lc.mask_truncated)
            with clock("logprobs"):
                frozen = frozen_logprobs(ctx.policy, ctx.ref_model, x, need_old=not ctx.plan.reuse_current_logprobs,
                                         plan=ctx.plan, **lp_kwargs)
            # 4. update: epochs x minibatches x micro-batches
            with clock("update"):
                upd = update_policy(ctx.engine, x, adv, frozen, ctx.plan, loss_kwargs=ctx.loss_kwargs,
                                    is_correction=lc.is_correction, is_cap=lc.is_cap, **lp_kwargs)
            # 5. the rollout engine samples from the new weights
            with clock("sync"):
                ctx.rollout.sync_weights(ctx.policy)
            # 6. metrics, each reduced over ranks as it says
            clock["step"] = time.perf_counter() - t_step
            m = step_metrics(sb, adv, upd, names=ctx.bank.names, weights=ctx.bank.weights,
                             adv_kwargs=ctx.adv_kwargs, timings=clock,
                             sync_stats=getattr(ctx.rollout, "last_sync", None))
            last = log_step(ctx, step, sb, adv, m.reduce(dist.all_reduce))
            # 7. checkpoint
            save_if_due(ctx, step)
    finally:
        teardown(ctx)
    return last


def _sum_moments(m):
    return dist.all_reduce_sum(m.clone())


def log_step(ctx: TrainContext, step: int, sb: StepBatch, adv, m: dict[str, float]) -> dict[str, float]:
    """Log a step's reduced metrics, the advantage histogram and (every N steps) sample completions."""
    lg = ctx.cfg.logging
    m["throughput/tokens_per_s"] = m["len/tokens"] / max(m["time/step"], 1e-9)
    m["train/step"] = float(step)
    ctx.logger.log(step, m)
    if lg.wandb.mode != "disabled":  # the same on every rank: all of them join the gather
        ctx.logger.log_histogram(step, "adv/histogram", dist.all_gather_rows(adv))
    if lg.completions_every and (step % lg.completions_every == 0 or step == 1):
        names = ctx.bank.names
        ctx.logger.log_completions(step, [
            {"prompt": sb.prompt_texts[i], "completion": sb.rollout.completion_texts[i],
             **{name: float(sb.rewards[i, k]) for k, name in enumerate(names)}, "advantage": float(adv[i])}
            for i in range(min(lg.completions_to_log, sb.num_rows))
        ])
    return m


def save_if_due(ctx: TrainContext, step: int) -> None:
    from gdpo import checkpoint as ckpt

    cc = ctx.cfg.checkpoint
    if (cc.every and step % cc.every == 0) or (step == ctx.cfg.train.steps and cc.save_final):
        ckpt.save_checkpoint(ctx.run_dir, step, engine=ctx.engine, data_state=ctx.prompts.order.state_dict(),
                             tokenizer=ctx.tokenizer, keep_last=cc.keep_last)


def teardown(ctx: TrainContext) -> None:
    from gdpo import checkpoint as ckpt

    ctx.bank.close()
    png = ctx.logger.finish()
    if dist.is_main():
        where = [f"metrics {ctx.run_dir / 'metrics.jsonl'}"]
        if png:
            where.append(f"reward curves {png}")
        final = ckpt.list_checkpoints(ctx.run_dir)
        if final:
            where.append(f"checkpoint {final[-1][1]}")
        if getattr(ctx.logger, "wandb_mode", "disabled") != "disabled":
            where.append(f"W&B ({ctx.logger.wandb_mode}) {ctx.run_dir / 'wandb'}")
        print("done: " + "; ".join(where), flush=True)
