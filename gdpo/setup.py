"""Everything a training run builds before its first step, in one `TrainContext`.

`setup(cfg)` is the only place that turns the config into components: each is built from its own config section
(`RewardBank.from_config(cfg.rewards)`, the rollout engine from `cfg.rollout`, the DeepSpeed engine from
`cfg.optim` + `cfg.deepspeed`, the logger from `cfg.logging`); the maths get flat arguments.

Seeds: every rank seeds identically first (identical initial weights and data order); after set-up, rank r > 0
re-seeds its own streams with seed + r, so ranks sample different rollouts (rank 0 keeps the stream of a
one-process run, so a world of one is unchanged). The RNG states are saved per rank in checkpoints.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdpo import distributed as dist
from gdpo.config import Config, ConfigError, to_dict
from gdpo.data import PromptDataset, PromptIterator
from gdpo.metrics import RunLogger
from gdpo.plan import BatchPlan, plan_batches
from gdpo.rewards import RewardBank
from gdpo.rollout.types import RolloutEngine
from gdpo.sampling import RankPrompts


@dataclass
class TrainContext:
    cfg: Config
    info: dist.DistInfo
    plan: BatchPlan
    run_dir: Path
    tokenizer: Any
    engine: Any  # the DeepSpeed engine around the policy
    ref_model: Any  # nn.Module, AdapterOffReference (LoRA: the policy, adapters off) or None when loss.beta == 0
    rollout: RolloutEngine
    bank: RewardBank
    prompts: RankPrompts
    logger: RunLogger
    start_step: int
    loss_kwargs: dict[str, Any]  # policy_loss keyword arguments fixed for the run
    adv_kwargs: dict[str, Any]  # compute_advantages / advantage_stats keyword arguments fixed for the run

    @property
    def policy(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.info.device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def demo_cache_dir(seed: int) -> Path:
    """Where the demo model's warm start is cached: $XDG_CACHE_HOME/gdpo/demo_sft/seed<seed> (~/.cache by
    default), outside any run directory, so a new run (or train.overwrite moving an old one aside) reuses it."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gdpo" / "demo_sft" / f"seed{seed}"


def resolve_demo(cfg: Config, run_dir: Path) -> tuple[str, str, str | None]:
    """(model path, data path, system prompt) with ``demo`` replaced by the embedded task's files; the demo model
    is warm-started once on rank 0 and cached (`demo_cache_dir`)."""
    model_path, data_path, system_prompt = cfg.model.name_or_path, cfg.data.path, cfg.data.system_prompt
    if model_path != "demo" and data_path != "demo":
        return model_path, data_path, system_prompt
    from gdpo.demo import DEMO, TRAIN_FILE, warm_start

    if model_path == "demo":
        cache = demo_cache_dir(cfg.train.seed)
        if dist.is_main():
            warm_start(run_dir, seed=cfg.train.seed, cache_dir=cache)
        dist.barrier()
        model_path = str(cache)
    if data_path == "demo":
        data_path = str(TRAIN_FILE)
        # the warm start saw no system turn, so by default RL prompts have none either
        system_prompt = system_prompt if system_prompt is not None else DEMO.system_prompt
    return model_path, data_path, system_prompt


def load_models(cfg: Config, model_path: str, device: torch.device):
    """(tokenizer, policy, reference or None)."""
    from gdpo.policy.model import load_causal_lm, load_reference_model, resolve_dtype
    from gdpo.preflight import check_tokenizer

    mc = cfg.model
    if not (Path(model_path).exists() or "/" in model_path):
        raise ConfigError(f"model.name_or_path: {model_path!r} is neither a local directory nor a hub id")
    key = "model.tokenizer" if mc.tokenizer else "model.name_or_path"
    tokenizer = check_tokenizer(mc.tokenizer or model_path, key, trust_remote_code=mc.trust_remote_code)
    kwargs = dict(dtype=resolve_dtype(mc.dtype), device=device, attn_implementation=mc.attn_implementation,
                  trust_remote_code=mc.trust_remote_code)
    lora = mc.lora.r > 0
    try:
        model = load_causal_lm(model_path, gradient_checkpointing=mc.gradient_checkpointing, **kwargs)
        # LoRA without ref_name_or_path: the reference is the policy with its adapters off (no second copy)
        ref_model = None if lora and not mc.ref_name_or_path else load_reference_model(
            mc.ref_name_or_path or model_path, beta=cfg.loss.beta, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loading failure is one line naming the key
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"model.name_or_path: cannot load {model_path!r} ({type(e).__name__}: {first})") from None
    if lora:
        from gdpo.policy.lora import AdapterOffReference, apply_lora

        lc = mc.lora
        try:
            model = apply_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                               bias=lc.bias)
        except ValueError as e:
            raise ConfigError(f"model.lora.target_modules: {e}") from None
        if ref_model is None and cfg.loss.beta != 0:
            ref_model = AdapterOffReference(model)
    return tokenizer, model, ref_model


def choose_packing(cfg: Config, plan: BatchPlan, model) -> BatchPlan:
    """The plan with padding-free micro-batches if loss.packing asks for them and the model's attention supports
    them (`gdpo.policy.model.packing_problem`); otherwise unchanged, and the start says why (main rank). Every rank
    runs the same probe, so all of them decide alike."""
    if not cfg.loss.packing:
        return plan
    from gdpo.policy.model import packing_problem

    problem = packing_problem(model)
    if dist.is_main():
        print(f"gdpo: loss.packing: {'off: ' + problem + '; training runs padded' if problem else 'on'}",
              flush=True)
    return plan if problem else replace(plan, packed=True)


def load_data(cfg: Config, data_path: str, system_prompt: str | None, tokenizer,
              context_length: int | None) -> PromptDataset:
    """The prompts, rendered exactly as the model sees them (gdpo.data.render_prompt: the template filled first,
    then the chat template); a prompt that does not fit the context with max_new_tokens is a bad row."""
    from gdpo.data import load_prompt_dataset

    dc = cfg.data
    try:
        dataset = load_prompt_dataset(
            data_path, tokenizer, split=dc.split, limit=dc.max_samples, where=dc.where, prompt_field=dc.prompt_field,
            answer_field=dc.answer_field, extra_fields=dc.columns, system_prompt=system_prompt,
            prompt_template=dc.prompt_template, use_chat_template=dc.use_chat_template,
            max_prompt_tokens=dc.max_prompt_tokens, context_length=context_length,
            max_new_tokens=cfg.rollout.max_new_tokens, on_error=dc.on_bad_row,
        )
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data.") else f"data.path: {data_path!r}: {msg}") from None
    if dataset.skipped and dist.is_main():
        print("gdpo: " + dataset.skipped_summary(), flush=True)
    return dataset


def claim_run_dir(cfg: Config, run_dir: Path) -> Path | None:
    """Refuse a run directory that holds another run (or move it aside with train.overwrite), write this run's
    config fingerprint; returns the checkpoint to resume (None: start fresh). Rank 0 decides, the others follow."""
    from gdpo.checkpoint import RunDirError, prepare_run_dir

    kw = dict(config=to_dict(cfg), resume=cfg.checkpoint.resume, overwrite=cfg.train.overwrite)
    try:
        if dist.is_main():
            path = prepare_run_dir(run_dir, **kw)
        dist.barrier()
        if not dist.is_main():
            path = prepare_run_dir(run_dir, **kw, dry_run=True, log=lambda _msg: None)
    except RunDirError as e:
        raise ConfigError(str(e)) from None
    return path


def resume(cfg: Config, path: Path | None, engine, order: PromptIterator, rollout: RolloutEngine) -> int:
    """Load the checkpoint ``path`` (if any) into the engine and the data order; returns the step it ended."""
    from gdpo import checkpoint as ckpt

    if path is None:
        return 0
    lora, has_adapter = cfg.model.lora.r > 0, (path / "adapter_config.json").is_file()
    if lora != has_adapter:  # the DeepSpeed state would not match the parameters (LoRA loads it non-strictly)
        raise ConfigError(f"checkpoint.resume: {path} holds {'a LoRA adapter' if has_adapter else 'full weights'}, "
                          f"but model.lora.r is {cfg.model.lora.r}; resume with the setting it was trained with")
    state = ckpt.load_checkpoint(path, engine=engine)
    order.load_state_dict(state.data_state)
    rollout.sync_weights(engine.module)
    if dist.is_main():
        print(f"resumed from {path} at step {state.step}", flush=True)
    return state.step


def setup(cfg: Config) -> TrainContext:
    """Processes, seeds, batch plan, models, data, reward bank, engines, resume and logger, in that order."""
    from gdpo.rollout.factory import rollout_engine_from_config

    from gdpo.preflight import preflight

    preflight(cfg)  # every check that needs no weights, on every rank (no side effects): the same verdict
    info = dist.init_distributed()
    run_dir = Path(cfg.train.run_dir)
    resume_from = claim_run_dir(cfg, run_dir)
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and data order
    # the update trains on the rollouts GFPO keeps (advantage.gfpo_keep of each prompt's group_size), if on
    plan = plan_batches(prompts_per_step=cfg.rollout.prompts_per_step,
                        group_size=cfg.advantage.gfpo_keep or cfg.rollout.group_size,
                        world_size=info.world_size, minibatch_size=cfg.loss.minibatch_size,
                        micro_batch_size=cfg.loss.micro_batch_size, epochs=cfg.loss.epochs,
                        max_tokens_per_micro_batch=cfg.loss.max_tokens_per_micro_batch)
    model_path, data_path, system_prompt = resolve_demo(cfg, run_dir)
    tokenizer, model, ref_model = load_models(cfg, model_path, info.device)
    plan = choose_packing(cfg, plan, model)
    dataset = load_data(cfg, data_path, system_prompt, tokenizer,
                        getattr(model.config, "max_position_embeddings", None))
    order = PromptIterator(len(dataset), cfg.rollout.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    try:
        bank = RewardBank.from_config(cfg.rewards)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    engine = dist.engine_from_config(model, cfg.optim, cfg.deepspeed,
                                     total_updates=cfg.train.steps * plan.updates_per_step,
                                     micro_batch_size=plan.micro_batch_rows, grad_accum_steps=plan.grad_accum)
    try:
        rollout = rollout_engine_from_config(
            cfg.rollout, engine, tokenizer, model_path=model_path, seed=cfg.train.seed,
            return_logprobs=cfg.rollout.backend != "hf" and cfg.loss.is_correction)
    except ValueError as e:
        raise ConfigError(f"rollout.backend: {e}") from None
    if info.rank > 0:  # before resume: a resumed rank continues its own saved stream, not a fresh seed + rank
        seed_everything(cfg.train.seed + info.rank)  # this rank's own sampling stream (see the module docstring)
    start_step = resume(cfg, resume_from, engine, order, rollout)
    logger = RunLogger.from_config(cfg.logging, run_dir, active=dist.is_main(), total_steps=cfg.train.steps,
                                   start_step=start_step, config=to_dict(cfg), reward_names=bank.names)
    if dist.is_main():
        skipped = f", skipped {dataset.skipped}" if dataset.skipped else ""
        print(f"gdpo: {len(dataset)} prompts{skipped}; {cfg.rollout.prompts_per_step} prompts x "
              f"G={cfg.rollout.group_size} per step; rewards {bank.names}; estimator {cfg.advantage.estimator}; "
              f"{info.world_size} process(es) on {info.device.type}; run dir {run_dir}", flush=True)
    ac = cfg.advantage
    return TrainContext(
        cfg=cfg, info=info, plan=plan, run_dir=run_dir, tokenizer=tokenizer, engine=engine, ref_model=ref_model,
        rollout=rollout, bank=bank, prompts=RankPrompts(dataset, order, info.rank, plan.prompts_per_rank),
        logger=logger, start_step=start_step,
        loss_kwargs=dict(eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, aggregation=cfg.loss.aggregation,
                         beta=cfg.loss.beta, max_len=cfg.rollout.max_new_tokens,
                         importance_level=cfg.loss.importance_level, objective=cfg.loss.objective,
                         cispo_eps_max=cfg.loss.cispo_eps_max, sapo_tau_pos=cfg.loss.sapo_tau_pos,
                         sapo_tau_neg=cfg.loss.sapo_tau_neg),
        adv_kwargs=dict(estimator=ac.estimator, eps=ac.eps, aggregate=ac.aggregate, group_std=ac.group_std,
                        baseline=ac.baseline),
    )
