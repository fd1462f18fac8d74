"""One typed config tree, loaded from YAML with ``key=value`` overrides, validated once at start.

    cfg = load_config("configs/math_gdpo.yaml", ["advantage.estimator=grpo", "rewards.functions.1.weight=0.5"])

Every field has a docstring (the string under it; ``python train.py --help-config`` prints them). A mistake in a
config fails here with one ``ConfigError`` line that names the key, the value and what is allowed; components
never see the config, the training script passes them flat arguments.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override: printed as one line, exit code 2, no traceback."""


# ----------------------------------------------------------------------------------------------------------
# The tree. Ranges are declared with rng(lo, hi) in field metadata; choices with Literal.


def rng(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    return field(default=default, metadata={"range": (lo, hi, lo_open)})


LORA_ALL_LINEAR = "all-linear"
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    r: int = rng(0, 0)
    """LoRA rank; 0 = off (full fine-tuning). With r > 0 the policy is the base model with PEFT LoRA adapters and
    only the adapter parameters (plus biases, per ``bias``) are trained; the KL reference is the same model with
    its adapters switched off unless ``model.ref_name_or_path`` is set."""
    alpha: float = rng(16.0, 0.0, lo_open=True)
    """LoRA alpha: the update B @ A is scaled by alpha / r."""
    dropout: float = rng(0.0, 0.0, 1.0)
    """Dropout on the adapter input during training (0 = off; rollouts and frozen log-probs never drop)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """Module names (suffixes, as PEFT matches them) that get adapters; ``[all-linear]`` = every linear layer but
    the LM head. The default covers the attention and MLP projections of Llama-family models."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Biases trained with the adapters: none, all of the model's, or only those of adapted layers. Trained biases
    change the base model, so with a KL term they need ``model.ref_name_or_path`` (refused otherwise)."""


@dataclass
class ModelConfig:
    name_or_path: str = "demo"
    """Policy: a local directory or hub id of a causal LM, or ``demo`` for the embedded tiny Qwen2 (warm-started
    on the package's arithmetic task once and cached in $XDG_CACHE_HOME/gdpo/demo_sft)."""
    tokenizer: Optional[str] = None
    """Tokenizer path or hub id; None = same as ``name_or_path``."""
    ref_name_or_path: Optional[str] = None
    """Reference model for the KL term; None = the initial policy. Not loaded when ``loss.beta`` is 0."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype: ``auto`` = bfloat16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs ~30% more compute)."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained``."""
    attn_implementation: Optional[
        Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]
    ] = None
    """Attention kernel passed to ``from_pretrained``: eager, sdpa, flash_attention_2, flash_attention_3 or
    flex_attention; None = the transformers default."""
    logprob_chunk_size: int = rng(1024, 1)
    """Sequence positions per chunk when computing per-token log-probs (bounds the [B, T, V] float32 memory).
    With rollout.top_p < 1 each chunk is also sorted over V (about 3x more memory): halve it if memory is tight."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (PEFT); ``lora.r: 0`` = full fine-tuning."""


@dataclass
class DataConfig:
    path: str = "demo"
    """Prompts: a local .jsonl / .json / .parquet file or directory, a hub dataset id, or ``demo`` (the embedded
    arithmetic task)."""
    split: str = "train"
    """Split name for hub datasets and directories."""
    prompt_field: str = "problem"
    """Field holding the prompt: a string, or a list of chat messages ({role, content}). Dots reach nested
    fields."""
    answer_field: Optional[str] = "answer"
    """Field passed to rewards as the ``answer`` column (None = no answer column)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Extra columns passed to rewards: {column name: field path}, e.g. {ground_truth: reward_model.ground_truth}."""
    system_prompt: Optional[str] = None
    """System message: a system turn under the chat template, else the text before a blank line and the prompt.
    A template like ``prompt_template`` (``{instruction}`` takes the row's field; ``{{``/``}}`` = literal braces).
    A message-list prompt that already has a system turn keeps its own."""
    prompt_template: Optional[str] = None
    """User message built from the row, filled before the chat template: ``{prompt}`` = the prompt field, ``{name}``
    = any field (dotted paths), ``{{`` and ``}}`` = literal braces (YAML ``"\\\\boxed{{}}"`` reaches the model
    as ``\\boxed{}``). A placeholder no row has fails at start. None = the prompt field as is."""
    use_chat_template: bool = True
    """Wrap the (templated) prompt in the tokenizer's chat template with the generation prompt; independent of
    ``prompt_template``. ``python train.py --config X --dry-run`` prints the exact first prompt."""
    max_prompt_tokens: int = rng(1024, 1)
    """Prompts longer than this many tokens (or than the model's context minus ``rollout.max_new_tokens``) are bad
    rows (skipped or fatal per ``on_bad_row``), never truncated."""
    on_bad_row: Literal["skip", "error"] = "skip"
    """Bad rows (missing field, wrong type, empty or too-long prompt, a line that is not UTF-8 or not JSON): skip
    and count them (the first ones are named with their line numbers), or fail at start."""
    where: dict[str, Any] = field(default_factory=dict)
    """Keep only the rows whose fields equal these values, e.g. {split: train} for a file holding every split
    (dotted paths; all must match). Rows left out are not bad rows. Empty = every row."""
    shuffle: bool = True
    """Shuffle the prompts every epoch (seeded by ``train.seed`` and the epoch)."""
    max_samples: Optional[int] = rng(None, 1)
    """Use only the first N rows (None = all)."""


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: transformers ``generate`` or a colocated vLLM engine."""
    group_size: int = rng(8, 2)
    """G: rollouts per prompt; the group whose statistics normalise each reward."""
    prompts_per_step: int = rng(8, 1)
    """Prompts per training step (across all ranks); the batch is prompts_per_step x group_size rollouts."""
    max_new_tokens: int = rng(256, 1)
    """Longest completion; longer ones are truncated (and flagged)."""
    min_new_tokens: int = rng(0, 0)
    """EOS / stop token ids are suppressed before this many completion tokens (0 = off). Benchmarks use it to
    force fixed-length completions; it shifts samples away from the policy, so leave it 0 for real training."""
    temperature: float = rng(1.0, 0.0, lo_open=True)
    """Sampling temperature (also applied to the trainer's log-probs so the ratio compares like with like)."""
    top_p: float = rng(1.0, 0.0, 1.0, lo_open=True)
    """Nucleus sampling mass. The trainer's log-probs are renormalised over the same kept tokens (temperature,
    then top-k, then top-p), so the importance ratio compares like with like (TRL issue #6789)."""
    top_k: int = rng(0, 0)
    """Top-k sampling (0 = off); the trainer's log-probs use the same truncation, as for top_p."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; the completion keeps the stop string."""
    generation_batch_size: int = rng(0, 0)
    """Sequences generated per ``generate`` call (0 = the whole batch at once)."""
    hf_fast_decode: bool = True
    """hf backend: decode Llama-family models (llama, qwen2, qwen3, mistral) with a plain-tensor step on the
    model's own weights instead of the HF module forward; same maths, less per-token overhead. Other
    architectures always decode with the HF forward."""
    dynamic_sampling: bool = False
    """Drop groups in which every reward is constant and generate more prompts to refill the batch (DAPO-style,
    but a group whose *sum* is constant is kept: summing hides signal that GDPO keeps)."""
    dynamic_sampling_max_rounds: int = rng(3, 1)
    """Generation rounds per step at most when refilling; the step trains on what it has after that."""
    vllm_gpu_memory_utilization: float = rng(0.5, 0.0, 1.0, lo_open=True)
    """vLLM: share of GPU memory for weights and KV cache (colocated with training)."""
    vllm_tensor_parallel_size: int = rng(1, 1)
    """vLLM: tensor-parallel degree of the rollout engine."""
    vllm_sleep: bool = True
    """vLLM: release the engine's GPU memory during the update (sleep/wake), GPU only."""
    weight_sync_chunk_mb: int = rng(512, 1)
    """vLLM: parameters are streamed into the engine in chunks of at most this many MB."""
    weight_sync_timeout_s: float = rng(600.0, 0.0, lo_open=True)
    """vLLM: a weight sync slower than this fails with a clear error instead of hanging."""


@dataclass
class ConditionConfig:
    on: str = ""
    """Name of the reward this one is conditioned on."""
    threshold: float = 1.0
    """This reward counts only where ``on`` reaches the threshold; elsewhere it is 0."""


@dataclass
class RewardConfig:
    name: str = ""
    """Name used in logs (``rewards/<name>/mean``) and in conditions; unique."""
    fn: str = ""
    """A built-in (math_correct, length, overlong, format, toolcall_correct, code_pass, code_bug, integer) or
    ``package.module:function``."""
    weight: float = 1.0
    """Weight w_k in the sum over rewards."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the function (e.g. {max_tokens: 4000} for length)."""
    condition: Optional[ConditionConfig] = None
    """Optional: count this reward only where another reward reaches a threshold (the paper's conditioned
    length reward)."""
    fallback: float = 0.0
    """Value given to rollouts whose reward call raised, hung or returned garbage."""


@dataclass
class RewardsConfig:
    functions: list[RewardConfig] = field(default_factory=list)
    """The reward bank: one entry per reward (K of them)."""
    num_workers: int = rng(0, 0)
    """Reward worker processes (0 = one per CPU core)."""
    timeout_s: float = rng(30.0, 0.0, lo_open=True)
    """Per-call timeout of a reward on one worker's batch."""
    worker_memory_mb: int = rng(0, 0)
    """Memory a reward worker may add, in MB, over what it shares with the trainer it was forked from (0 = off):
    enforced by a soft RLIMIT_AS over its size at start and a watch of its private memory. A worker over it is
    replaced, its rows get the fallback and are counted in ``rewards/<name>/memory_kills``."""
    allow_unsandboxed: bool = False
    """Let the code rewards (code_pass, code_bug) run generated programs where the host refuses namespaces. Then
    only rlimits, a cleared environment and a process group hold: the program can read every file the trainer's
    user can, and signal that user's processes (as root it runs under a private uid, or is refused). Off =
    refuse to start."""
    truncated_value: Optional[float] = None
    """DLER's hard truncation: every reward of a rollout that hit rollout.max_new_tokens without EOS is set to
    this value (DLER: 0), whatever its text scored; NaN (does not apply) stays NaN. None = off. Penalties too:
    with an ``overlong`` reward, a truncated rollout then gets this value instead of its -1."""


@dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "grpo_no_std", "gdpo", "dler"] = "gdpo"
    """Preset: grpo (sum, group z-score), grpo_no_std (sum, group centring), gdpo (per-reward group z-score,
    weighted sum, batch z-score), dler (sum, group centring, batch z-score: DLER / REINFORCE++'s baseline)."""
    aggregate: Optional[Literal["sum_then_normalize", "normalize_then_sum"]] = None
    """Override the preset's aggregation (None = the preset's)."""
    group_std: Optional[bool] = None
    """Override: divide by the group's sample std (None = the preset's)."""
    batch_norm: Optional[bool] = None
    """Override: z-score the aggregated advantage over the whole batch (None = the preset's)."""
    eps: float = rng(1e-4, 0.0)
    """Added to every std (group and batch). 1e-4 as in TRL and the GDPO reference code."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """auto = the fused Triton kernel on CUDA, vectorised torch otherwise."""
    baseline: Literal["mean", "leave_one_out"] = "mean"
    """Group baseline: mean of the group, or leave_one_out (RLOO: the mean of the other G - 1 rollouts, per
    reward under GDPO). leave_one_out runs on the torch path (the Triton kernel computes the mean only)."""
    gfpo_keep: Optional[int] = rng(None, 0)
    """GFPO: of the rollout.group_size rollouts sampled per prompt keep this many (>= 2, < group_size) by
    gfpo_metric, and compute group statistics and train on those only. 0 or None = off."""
    gfpo_metric: Literal["length", "efficiency"] = "length"
    """GFPO's filter: length (the shortest) or efficiency (the highest weighted reward sum / length)."""


@dataclass
class LossConfig:
    eps_low: float = rng(0.2, 0.0)
    """PPO clip below: ratio >= 1 - eps_low."""
    eps_high: float = rng(0.2, 0.0)
    """PPO clip above: ratio <= 1 + eps_high (clip-higher: eps_high > eps_low, e.g. 0.28)."""
    beta: float = rng(0.0, 0.0)
    """KL coefficient (k3 estimator against the reference model); 0 = no reference model."""
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """token_mean (DAPO), seq_mean_token_mean (GRPO paper), seq_mean_token_sum_norm (Dr.GRPO, constant
    denominator = max_new_tokens)."""
    epochs: int = rng(1, 1)
    """Passes of updates over each rollout batch."""
    minibatch_size: int = rng(0, 0)
    """Rollouts per optimizer step (0 = the whole batch: one step per epoch)."""
    micro_batch_size: int = rng(0, 0)
    """Rollouts per forward/backward (gradient accumulation inside a minibatch; 0 = the minibatch)."""
    max_tokens_per_micro_batch: int = rng(0, 0)
    """Token-budget micro-batching (verl's dynamic batch size; 0 = off): each minibatch's rows are sorted by length
    and packed into micro-batches of at most this many tokens (rows x longest prompt + completion in it), each
    trimmed to its own longest row, for the update and the log-prob passes. The loss is the same as with fixed
    micro-batches. Excludes ``micro_batch_size``."""
    packing: bool = False
    """Padding-free micro-batches (verl's use_remove_padding, OpenRLHF's packing): each micro-batch's rows without
    their padding are concatenated into one sequence, position ids restarting per row, for the update and the
    log-prob passes; the same loss, no compute on padding. With ``max_tokens_per_micro_batch`` a micro-batch then
    holds that many real tokens. Takes effect where the attention has a variable-length kernel
    (model.attn_implementation flash_attention_2 / flash_attention_3, i.e. flash-attn installed, on GPU) and a
    probe at start finds packed rows kept apart; elsewhere (sdpa, eager, flex_attention; every CPU run) training
    runs padded and the start says why."""
    is_correction: bool = True
    """Truncated importance weights for the gap between the engine's sampling log-probs and the trainer's (when
    the engine returns log-probs)."""
    is_cap: float = rng(2.0, 1.0)
    """Cap of the truncated importance weight."""
    importance_level: Literal["token", "sequence"] = "token"
    """token: one ratio per token (PPO / GRPO); sequence: GSPO's per-row ratio exp(mean_t (logp - old_logp)),
    clipped with eps_low / eps_high (GSPO's own: 3e-4 / 4e-4, configs/tiny_gspo.yaml); needs loss.aggregation
    seq_mean_token_mean."""
    objective: Literal["clip", "cispo", "sapo"] = "clip"
    """clip: PPO clipped surrogate (eps_low / eps_high); cispo: -sg(min(r, cispo_eps_max)) A logp (CISPO: the
    weight is capped, the gradient never cut); sapo: soft gate -sigmoid(tau (r - 1)) 4 / tau A (SAPO)."""
    cispo_eps_max: float = rng(5.0, 0.0, lo_open=True)
    """CISPO's cap on the (stop-gradient) importance weight; 5.0 as TRL."""
    sapo_tau_pos: float = rng(1.0, 0.0, lo_open=True)
    """SAPO's gate temperature for tokens with A > 0."""
    sapo_tau_neg: float = rng(1.05, 0.0, lo_open=True)
    """SAPO's gate temperature for tokens with A <= 0 (higher = faster decay off-policy)."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: rollouts that hit rollout.max_new_tokens without EOS contribute nothing to the
    loss (no policy gradient, no KL); they still count in the reward and advantage statistics."""


@dataclass
class OptimConfig:
    lr: float = rng(1e-6, 0.0, lo_open=True)
    """Peak learning rate (AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = rng(0.0, 0.0)
    """AdamW weight decay."""
    warmup_ratio: float = rng(0.0, 0.0, 1.0)
    """Linear warm-up over this share of the steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after warm-up."""
    min_lr_ratio: float = rng(0.0, 0.0, 1.0)
    """Cosine floor as a share of the peak."""
    grad_clip: float = rng(1.0, 0.0)
    """Clip the global gradient norm (0 = off)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = rng(0, 0, 3)
    """ZeRO stage 0-3 (3 partitions parameters, gradients and optimizer state across ranks)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 2/3)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO 3)."""
    bf16: Literal["auto", "true", "false"] = "auto"
    """bf16 mixed precision: auto = on with CUDA."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    """online needs an API key (WANDB_API_KEY): without one, offline is used and said so."""
    project: str = "gdpo"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    name: Optional[str] = None
    """Run name (None = the run directory's name)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    completions_every: int = rng(10, 0)
    """Log a table of sample completions every N steps (0 = never)."""
    completions_to_log: int = rng(8, 1)
    """Rows in that table."""
    progress_bar: bool = True
    """tqdm progress bar over steps."""


@dataclass
class CheckpointConfig:
    every: int = rng(0, 0)
    """Save every N steps (0 = only at the end)."""
    keep_last: int = rng(2, 1)
    """Keep this many most recent checkpoints."""
    resume: Optional[str] = None
    """``auto`` = latest complete checkpoint in the run directory (if any), a path, or None = start fresh."""
    save_final: bool = True
    """Save a checkpoint at the end of training."""


@dataclass
class TrainConfig:
    steps: int = rng(100, 1)
    """Training steps (rollout batch + updates each)."""
    seed: int = rng(0, 0, 2**32 - 1)
    """Seed for data order, sampling and initialisation (0 .. 2**32-1)."""
    run_dir: str = "runs/{name}"
    """Where metrics.jsonl, checkpoints and W&B files go; {name} = the config file's stem."""
    overwrite: bool = False
    """A fresh run (no resume) into a run directory that holds another run refuses to start; true = move the
    old run aside to ``<run_dir>.old-<timestamp>`` (never deleted) and start fresh."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt dataset and formatting."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """The reward bank."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimator and its switches."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Clipped policy-gradient loss and update epochs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B, stdout and metrics.jsonl."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, seed and run directory."""


# ----------------------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _closest(key: str, options: list[str], prefix: str = "") -> str:
    m = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{m[0]}'?" if m else f"; valid keys under '{prefix or '.'}': {', '.join(options)}"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        deeper = [e for e in errors if str(e).startswith(f"{path}.")]
        if deeper:  # e.g. a bad key inside an optional section: name that key, not the section
            raise deeper[0]
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{path}.{k}"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{path}: got {value!r}, expected a finite number")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 as a string (YAML 1.1); accept it
            try:
                return _coerce(float(value), float, path)
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a string")
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{path}'" + _closest(str(key), list(fields), f"{prefix}." if prefix else "")
            )
        value = _coerce(value, hints[key], path)
        lo, hi, lo_open = fields[key].metadata.get("range", (None, None, False))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
                lo_s = "-inf" if lo is None else lo
                hi_s = "inf" if hi is None else hi
                raise ConfigError(
                    f"{path}: {value!r} is out of range; allowed {'(' if lo_open else '['}{lo_s}, {hi_s}]"
                )
        kwargs[key] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Cross-field checks that a single field cannot express."""
    names = [r.name for r in cfg.rewards.functions]
    for i, r in enumerate(cfg.rewards.functions):
        if not r.name:
            raise ConfigError(f"rewards.functions.{i}.name: every reward needs a name")
        if not r.fn:
            raise ConfigError(f"rewards.functions.{i}.fn: every reward needs a function (built-in or module:fn)")
        if r.name in names[:i]:
            raise ConfigError(f"rewards.functions.{i}.name: duplicate reward name {r.name!r} (also "
                              f"rewards.functions.{names.index(r.name)}); names must be unique")
        if r.condition is not None and r.condition.on not in names:
            raise ConfigError(
                f"rewards.functions.{i}.condition.on: {r.condition.on!r} is not a reward name; "
                f"rewards are {names}"
            )
        if r.condition is not None and r.condition.on == r.name:
            raise ConfigError(f"rewards.functions.{i}.condition.on: reward {r.name!r} is conditioned on itself")
    # a cycle of conditions (a on b, b on a) can never be resolved
    deps = {r.name: r.condition.on for r in cfg.rewards.functions if r.condition is not None}
    for start in deps:
        seen, cur = [start], start
        while cur in deps:
            cur = deps[cur]
            if cur in seen:
                raise ConfigError(f"rewards: conditions form a cycle: {' -> '.join(seen + [cur])}")
            seen.append(cur)
    if cfg.rollout.min_new_tokens > cfg.rollout.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens: {cfg.rollout.min_new_tokens} exceeds rollout.max_new_tokens "
                          f"{cfg.rollout.max_new_tokens}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: got {cfg.optim.betas}, expected two numbers in [0, 1)")
    if cfg.loss.minibatch_size and cfg.loss.micro_batch_size and cfg.loss.minibatch_size % cfg.loss.micro_batch_size:
        raise ConfigError(
            f"loss.micro_batch_size: {cfg.loss.micro_batch_size} does not divide loss.minibatch_size "
            f"{cfg.loss.minibatch_size}"
        )
    _validate_variants(cfg)
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param: needs deepspeed.zero_stage 3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage < 1:
        raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
    _validate_lora(cfg.model.lora)
    if cfg.model.lora.r and cfg.model.lora.bias != "none" and cfg.loss.beta and not cfg.model.ref_name_or_path:
        raise ConfigError(f"model.lora.bias: {cfg.model.lora.bias!r} trains base-model biases, so the policy with its "
                          "adapters off is no longer the initial policy the KL term needs; set model.ref_name_or_path "
                          "(a separate reference) or model.lora.bias none")
    if cfg.checkpoint.resume not in (None, "auto") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume: {cfg.checkpoint.resume!r} does not exist (use auto, null or a path)")


def _validate_variants(cfg: Config) -> None:
    """The related-work switches (GSPO, CISPO, SAPO, GFPO, RLOO): combinations that would not take effect."""
    adv, loss, defaults = cfg.advantage, cfg.loss, LossConfig()
    if adv.gfpo_keep and not 2 <= adv.gfpo_keep < cfg.rollout.group_size:
        raise ConfigError(f"advantage.gfpo_keep: {adv.gfpo_keep} must be >= 2 and < rollout.group_size "
                          f"{cfg.rollout.group_size} (GFPO samples more rollouts than it keeps; 0 = off)")
    if not adv.gfpo_keep and adv.gfpo_metric != "length":
        raise ConfigError(f"advantage.gfpo_metric: {adv.gfpo_metric!r} has no effect without advantage.gfpo_keep")
    if adv.baseline != "mean" and adv.backend == "triton":
        raise ConfigError(f"advantage.baseline: {adv.baseline!r} is computed on the torch path; the Triton kernel "
                          "does the mean baseline only (use advantage.backend auto or torch)")
    if loss.importance_level == "sequence" and loss.aggregation != "seq_mean_token_mean":
        raise ConfigError(f"loss.aggregation: {loss.aggregation!r} with loss.importance_level sequence; GSPO's "
                          "sequence ratio needs seq_mean_token_mean (a token sum weights each row by its length)")
    unused = []
    if loss.objective != "clip":
        unused += [k for k in ("eps_low", "eps_high") if getattr(loss, k) != getattr(defaults, k)]
    if loss.objective != "cispo" and loss.cispo_eps_max != defaults.cispo_eps_max:
        unused.append("cispo_eps_max")
    if loss.objective != "sapo":
        unused += [k for k in ("sapo_tau_pos", "sapo_tau_neg") if getattr(loss, k) != getattr(defaults, k)]
    if unused:
        raise ConfigError(f"loss.{unused[0]}: {getattr(loss, unused[0])!r} has no effect with loss.objective "
                          f"{loss.objective!r} (eps_low / eps_high belong to clip, cispo_eps_max to cispo, "
                          "sapo_tau_* to sapo)")


def _validate_lora(lc: LoraConfig) -> None:
    if lc.r == 0:  # off: a LoRA setting the user changed would be ignored silently, so it is refused
        changed = [f.name for f in dataclasses.fields(LoraConfig)
                   if f.name != "r" and getattr(lc, f.name) != getattr(LoraConfig(), f.name)]
        if changed:
            raise ConfigError(f"model.lora.{changed[0]}: set, but model.lora.r is 0 (LoRA off); set model.lora.r > 0 "
                              "or leave it out")
        return
    if not lc.target_modules or any(not t for t in lc.target_modules):
        raise ConfigError("model.lora.target_modules: needs at least one (non-empty) module name, or [all-linear]")
    if LORA_ALL_LINEAR in lc.target_modules and len(lc.target_modules) > 1:
        raise ConfigError(f"model.lora.target_modules: {LORA_ALL_LINEAR!r} stands alone, got {lc.target_modules}")
    if lc.dropout >= 1.0:
        raise ConfigError(f"model.lora.dropout: {lc.dropout} drops everything; allowed [0, 1)")


# ----------------------------------------------------------------------------------------------------------
# Overrides and loading


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans and floats: only true/false are booleans (so ``on:`` in a reward condition
    stays a key, not True), and 1e-6 is a float, not a string."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys silently; a config that says a thing twice is a mistake.
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            dup = key in seen
        except TypeError:
            continue  # an unhashable key: the base constructor reports it
        if dup:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML 1.2-ish load; a key given twice in one mapping is a ConfigError naming it."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(
            f"line {e.line}: duplicate key {e.key!r} (the later one would silently replace the earlier); "
            "give each key once"
        ) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. advantage.estimator=grpo")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict, parts: list[str], value: Any, full: str) -> None:
    node: Any = data
    cls: Any = Config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not isinstance(node, (dict, list)):
            above = ".".join(parts[:i])
            raise ConfigError(f"override {full!r}: '{above}' is a single value ({node!r}), not a section")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {full!r}: {part!r} is not an index of a list of length {len(node)}")
            idx = int(part)
            if last:
                node[idx] = value
                return
            node, cls = node[idx], _inner(cls)
            continue
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                pre = ".".join(parts[:i]) + "." if i else ""
                raise ConfigError(f"unknown config key '{pre}{part}'" + _closest(part, names, pre))
            sub_tp = typing.get_type_hints(cls)[part]
        else:
            sub_tp = Any
        here = ".".join(parts[: i + 1])
        if last:
            node[part] = value
            return
        inner_tp = _strip_optional(sub_tp)
        if not (dataclasses.is_dataclass(inner_tp) or typing.get_origin(inner_tp) in (list, dict) or inner_tp is Any):
            raise ConfigError(
                f"override {full!r}: '{here}' is a single value ({_type_name(sub_tp)}), not a section; "
                f"write {here}=<value>"
            )
        if node.get(part) is None:
            node[part] = [] if typing.get_origin(inner_tp) is list else {}
        if not isinstance(node[part], (dict, list)) and inner_tp is not Any:
            raise ConfigError(f"{here}: got {node[part]!r}, expected {_type_name(inner_tp)}")
        node, cls = node[part], inner_tp


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _inner(tp: Any) -> Any:
    tp = _strip_optional(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else Any


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from plain data (as read from YAML) plus ``key=value`` overrides."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = _parse_override(item)
        _set_path(data, parts, value, item)
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or None for all defaults), apply overrides, validate. Raises ConfigError."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        raw = p.read_bytes()
        if b"\x00" in raw:
            raise ConfigError(f"config file {str(p)!r} is a binary file, not YAML text")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ) from None
        try:
            data = yaml_load(text)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    cfg = config_from_dict(data, list(overrides))
    if path is not None:
        cfg.train.run_dir = cfg.train.run_dir.replace("{name}", Path(path).stem)
    else:
        cfg.train.run_dir = cfg.train.run_dir.replace("{name}", "default")
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain data (for YAML dumps and W&B config)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, doc) for every leaf field, read from the attribute docstrings in this file."""
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(_strip_optional(tp)) and typing.get_origin(tp) is None:
            out.extend(field_docs(tp, key + "."))
        else:
            out.append((key, _type_name(tp), docs.get(f.name, "")))
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                out.extend(field_docs(typing.get_args(tp)[0], key + ".N."))
            if dataclasses.is_dataclass(_strip_optional(tp)) and typing.get_origin(tp) is not None:
                out.extend(field_docs(_strip_optional(tp), key + "."))
    return out
