"""``python train.py --config X --dry-run [overrides]``: everything a run checks before its first step, without a GPU
and without model weights.

It validates the config, resolves every reward function, loads the tokenizer (and the model's config.json when
it is reachable, for its context length), reads and renders the whole dataset exactly as training does, and
prints the batch plan (`gdpo.plan.plan_batches`, world size from ``WORLD_SIZE`` or 1), the tokens per step at
the configured maximum lengths and the first training prompt, exactly as the model will see it, as one JSON
string on a line beginning ``first prompt: ``. Any problem it can find is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from gdpo.config import Config, ConfigError

_LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id: it exists, starts like a path, or names a data file."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.lower().endswith(_LOCAL_SUFFIXES)


def _model_context(model_path: str, trust_remote_code: bool) -> tuple[int | None, str]:
    """(max_position_embeddings or None, a note) from the model's config.json only (no weights)."""
    try:
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - an offline hub id: the context check is left to the real run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return None, f"unknown (model config not loadable here: {first})"
    n = getattr(mc, "max_position_embeddings", None)
    if not n:
        return None, "unknown (no max_position_embeddings)"
    return int(n), f"{int(n)} tokens (max_position_embeddings)"


def dry_run(cfg: Config, *, out: Callable[[str], None] = print) -> int:
    """Check `cfg` as far as possible without weights and print the plan; 0, or 2 after one line on stderr."""
    try:
        _dry_run(cfg, out)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def _dry_run(cfg: Config, out: Callable[[str], None]) -> None:
    from gdpo import checkpoint as ckpt
    from gdpo.data import PromptIterator, build_prompt_dataset, prompt_token_limit, read_rows, select_rows
    from gdpo.plan import plan_batches
    from gdpo.rewards.bank import resolve_reward_fn

    # 1. rewards: every fn resolves (built-in or importable module:function)
    if not cfg.rewards.functions:
        raise ConfigError("rewards.functions: no rewards configured (at least one is needed)")
    for i, r in enumerate(cfg.rewards.functions):
        try:
            resolve_reward_fn(r.fn, r.name)
        except ValueError as e:
            raise ConfigError(f"rewards.functions.{i}.fn: {e}") from None

    # 2. the batch plan (every divisibility rule)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    plan = plan_batches(prompts_per_step=cfg.rollout.prompts_per_step, group_size=cfg.rollout.group_size,
                        world_size=world, minibatch_size=cfg.loss.minibatch_size,
                        micro_batch_size=cfg.loss.micro_batch_size, epochs=cfg.loss.epochs)

    # 3. resume: a path must be a complete checkpoint
    try:
        resume = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.train.run_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint.resume: {e}") from None

    # 4. model and tokenizer (no weights)
    model_path, data_path, system_prompt = cfg.model.name_or_path, cfg.data.path, cfg.data.system_prompt
    demo = model_path == "demo" or data_path == "demo"
    if demo:
        from gdpo.demo import DEMO, TRAIN_FILE
    if model_path != "demo" and _looks_local(model_path) and not Path(model_path).exists():
        raise ConfigError(f"model.name_or_path: {model_path!r} does not exist (a local directory or a hub id)")
    tok_ref = cfg.model.tokenizer or model_path
    if tok_ref == "demo":
        from gdpo.demo import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        from gdpo.policy.model import load_tokenizer

        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        if _looks_local(tok_ref) and not Path(tok_ref).exists():
            raise ConfigError(f"{key}: tokenizer {tok_ref!r} does not exist")
        try:
            tokenizer = load_tokenizer(tok_ref, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError ("couldn't instantiate the backend")...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{key}: cannot load the tokenizer {tok_ref!r} ({first})") from None
    if model_path == "demo":
        from gdpo.demo import tiny_qwen2_config

        context = getattr(tiny_qwen2_config(len(tokenizer)), "max_position_embeddings", None)
        context_note = f"{context} tokens (the demo model)"
    else:
        context, context_note = _model_context(model_path, cfg.model.trust_remote_code)

    # 5. data: read, validate and render every row exactly as training does
    if data_path == "demo":
        data_path = str(TRAIN_FILE)
        system_prompt = system_prompt if system_prompt is not None else DEMO.system_prompt
    if _looks_local(data_path) and not Path(data_path).exists():
        raise ConfigError(f"data.path: {data_path!r} does not exist")
    try:
        read = read_rows(data_path, split=cfg.data.split)
        rows = select_rows(read, cfg.data.where)
        if cfg.data.where and not rows:
            raise ValueError(f"data.where {cfg.data.where} keeps none of the {len(read)} rows")
        if cfg.data.max_samples is not None:
            rows = rows[: cfg.data.max_samples]
        dataset = build_prompt_dataset(
            rows, tokenizer, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
            extra_fields=cfg.data.columns, system_prompt=system_prompt, prompt_template=cfg.data.prompt_template,
            use_chat_template=cfg.data.use_chat_template, max_prompt_tokens=cfg.data.max_prompt_tokens,
            context_length=context, max_new_tokens=cfg.rollout.max_new_tokens, on_error=cfg.data.on_bad_row,
        )
    except (ValueError, OSError) as e:
        raise ConfigError(f"data.path: {data_path!r}: {e}") from None
    order = PromptIterator(len(dataset), cfg.rollout.prompts_per_step, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle).order(0)
    first = dataset[order[0]]

    # 6. the report
    longest = max(len(e.prompt_ids) for e in dataset.examples)
    prompt_max = prompt_token_limit(cfg.data.max_prompt_tokens, context, cfg.rollout.max_new_tokens)
    max_seq = prompt_max + cfg.rollout.max_new_tokens
    out(f"dry run: config OK; rewards {[r.name for r in cfg.rewards.functions]}; estimator "
        f"{cfg.advantage.estimator}; backend {cfg.rollout.backend}")
    out(f"model: {model_path}; tokenizer: {tok_ref}; context: {context_note}")
    skipped = dataset.skipped_summary()
    kept = f" ({len(rows)} of {len(read)} rows kept by data.where)" if cfg.data.where else ""
    out(f"data: {data_path}{kept}: {len(dataset)} prompts of {dataset.num_rows} rows (longest {longest} tokens)"
        + (f"; {skipped}" if skipped else ""))
    out("batch plan: " + ", ".join(f"{k}={v}" for k, v in plan.as_dict().items())
        + f", micro_batches_per_update={plan.grad_accum}, minibatches_per_epoch={plan.minibatches_per_epoch}, "
        f"epochs={plan.epochs}")
    if cfg.loss.packing:
        from gdpo.policy.model import VARLEN_ATTENTION

        impl = cfg.model.attn_implementation
        out("loss.packing: " + (f"on if the start's probe passes ({impl})" if impl in VARLEN_ATTENTION else
                                f"off: model.attn_implementation {impl or 'default (sdpa)'} has no variable-length "
                                f"kernel; training runs padded (one of {', '.join(VARLEN_ATTENTION)} packs)"))
    out(f"tokens per step at the max lengths: {plan.rows_per_step} rollouts x ({prompt_max} prompt "
        f"+ {cfg.rollout.max_new_tokens} completion) = {plan.rows_per_step * max_seq:,} "
        f"({plan.rows_per_rank * max_seq:,} per rank); with this data's longest prompt "
        f"{plan.rows_per_step * (longest + cfg.rollout.max_new_tokens):,}")
    out(f"steps: {cfg.train.steps} x {plan.updates_per_step} optimizer updates; run dir {cfg.train.run_dir}"
        + (f"; resumes from {resume}" if resume is not None else ""))
    out("first prompt: " + json.dumps(first.prompt_text, ensure_ascii=False))
