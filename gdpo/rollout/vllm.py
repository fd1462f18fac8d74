"""Rollouts with a colocated vLLM engine (`vllm.LLM` in the trainer's own process).

Design notes
- In-process engine. `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core (and, at
  tensor_parallel_size=1, its single worker) in this process, so the trainer's tensors reach the
  engine's `load_weights` without serialisation. Under a multi-rank trainer each rank owns one engine
  (`distributed_executor_backend="external_launcher"`); ranks of one tensor-parallel group then
  generate the same requests (their prompts are all-gathered inside the group) with the same seed.
- Prompt token ids go in as `{"prompt_token_ids": ids}`: no re-tokenisation, so the tokens vLLM
  conditions on are exactly the ones the trainer scores.
- Sampling = temperature -> top-k -> top-p over the raw logits; `generation_config="vllm"` keeps the
  checkpoint's own defaults (repetition penalty, top_k=20, ...) out, as the hf backend does. EOS is
  ours: `ignore_eos=True` plus `stop_token_ids = types.stop_token_ids(...)` (the tokenizer's EOS, the
  checkpoint's generation_config.json EOS ids, sampling.stop_token_ids), exactly the ids the hf backend stops
  on (Qwen2.5-Instruct's generation config adds <|endoftext|> to the tokenizer's <|im_end|>).
- Sampling log-probs: `logprobs=0` returns the sampled token's log-prob; `logprobs_mode=
  "processed_logprobs"` makes it the log-prob under the distribution actually sampled from (after
  temperature / top-k / top-p), which is what the truncated importance weight exp(old - sampling)
  needs. `flat_logprobs=True` returns them as flat lists (no dict per token).
- Weight sync (`sync_weights`): vLLM's layer-wise reload (initialize_layerwise_reload ->
  model.load_weights(chunk) per chunk -> finalize_layerwise_reload) run on the worker through
  `collective_rpc`. Plain `load_weights` is not enough: on CPU vLLM repacks linear weights into oneDNN /
  sgl kernel layouts after loading and frees the original tensors, so new weights must go through the
  same post-load processing (and on GPU quantised layouts need it too). Parameters are streamed in
  chunks of at most `sync_chunk_mb` (ZeRO-3 parameters are gathered one chunk at a time, so peak extra
  memory is one chunk). A LoRA policy (PeftModel) is pushed merged: every base weight under its base-model
  name, the adapted ones as W + scaling * B @ A (`gdpo.policy.lora.merged_sync_weights`; a chunk gathers each
  weight with its A and B), so vLLM serves the plain base architecture and follows the adapter. The whole sync
  runs in a worker thread; the caller waits at most
  `sync_timeout_s` and then raises instead of hanging (a stuck collective is the usual culprit).
  Every engine parameter must receive a value, else the sync fails loudly (a name mismatch would
  otherwise leave stale weights behind silently). The prefix cache is reset after each sync, since
  cached KV blocks were computed with the old weights.
- Sleep / wake (GPU only; vLLM's CPU worker ignores it): after each `generate` the engine sleeps at
  level 2 (weights and KV cache released, nothing copied to host memory), so the update has the GPU.
  `sync_weights` wakes only the weight memory and refills it; `generate` wakes the KV cache. If
  `generate` runs again with no sync in between (e.g. a dynamic-sampling refill round), the weights are
  re-pushed from the trainer model first, since level 2 discarded them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from gdpo import distributed as gd
from gdpo.rollout.hf import _left_pad
from gdpo.rollout.types import RolloutBatch, SamplingParams, stop_token_ids, timing_stats

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Wrapper prefixes that appear in a trainer's parameter names but not in a checkpoint.
_NAME_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


# ---------------------------------------------------------------------------------------------------
# Worker side: called through LLM.collective_rpc(fn, args=...) with the vLLM worker as first argument.
# Module-level functions, so that a multi-process executor (tensor_parallel_size > 1) can pickle them
# by reference.


def _worker_begin_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    worker._gdpo_loaded = set()  # engine parameter names that received a value in this sync
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _worker_load_chunk(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        loaded = worker.model_runner.get_model().load_weights(weights)
    worker._gdpo_loaded.update(loaded or ())
    return len(weights)


class _DropBufferOnlyWarnings(logging.Filter):
    """finalize_layerwise_reload warns "Failed to load weights" for layers that only hold buffers
    (e.g. RotaryEmbedding's cos/sin cache), which no checkpoint carries; our own completeness check
    in `_worker_finish_reload` covers real parameters, so these warnings are noise on every sync."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in str(record.msg)


def _worker_finish_reload(worker) -> list[str]:
    """Finalises the reload (post-load processing of every layer) and returns the engine parameter
    names that received no value (must be empty)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = worker.model_runner.get_model()
    log = logging.getLogger(_RELOAD_LOGGER)
    quiet = _DropBufferOnlyWarnings()
    log.addFilter(quiet)
    try:
        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(model, worker.model_config)
    finally:
        log.removeFilter(quiet)
    loaded = getattr(worker, "_gdpo_loaded", set())
    return sorted(name for name, _ in model.named_parameters() if name not in loaded)


# ---------------------------------------------------------------------------------------------------
# Trainer side


def _vllm_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name.replace("._checkpoint_wrapped_module.", ".")


def _param_bytes(p: torch.Tensor) -> int:
    # A ZeRO-3 partitioned parameter has numel() == 0 locally; ds_numel is its full size.
    return int(getattr(p, "ds_numel", p.numel())) * p.element_size()


def _chunks(
    params: list[tuple[str, torch.nn.Parameter]], max_bytes: int
) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters (model order, so one layer's weights stay together and vLLM can process
    each layer as soon as it is complete) in chunks of at most max_bytes; a larger single parameter
    gets a chunk of its own."""
    out: list[list[tuple[str, torch.nn.Parameter]]] = []
    cur: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, p in params:
        b = _param_bytes(p)
        if cur and size + b > max_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, p))
        size += b
    if cur:
        out.append(cur)
    return out


def _gathered(params: list[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters for the duration of the block (no-op otherwise)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


@dataclass
class _SyncProgress:
    chunks_done: int = 0
    bytes_done: int = 0
    stage: str = "not started"
    error: BaseException | None = None
    error_stage: str = ""
    missing: list[str] | None = None


def vllm_import_error() -> str | None:
    """None if vLLM imports, else why not (a one-line reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA build failing on a machine without CUDA
        return f"{type(e).__name__}: {e}"
    return None


def _generation_config(model: torch.nn.Module | None, model_path: str):
    """The trainer model's generation config, else the checkpoint's generation_config.json (eval passes no
    model), else None."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        return gen
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(model_path))
    except Exception:  # noqa: BLE001 - no generation_config.json (or an offline hub id): tokenizer EOS only
        return None


def _process_env(on_gpu: bool, kv_cache_memory_bytes: int | None) -> int | None:
    """Set the environment vLLM reads at start; returns the KV cache size to ask for."""
    # Weight sync passes tensors and callables straight to the worker: the engine core must live in
    # this process (otherwise every sync would serialise the whole model over ZMQ).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        # vLLM's default binds OMP threads to cores, which would pin the trainer's threads too.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            return 1 << 30  # CPU: 1 GiB unless VLLM_CPU_KVCACHE_SPACE says otherwise
    return kv_cache_memory_bytes


class VLLMRolloutEngine:
    """`RolloutEngine` on a colocated `vllm.LLM`; see the module docstring for the design."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        sampling: SamplingParams,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        sleep: bool = True,
        sync_chunk_mb: float = 512,
        sync_timeout_s: float = 600.0,
        seed: int = 0,
        max_model_len: int | None = None,
        dtype: str | torch.dtype | None = None,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        """model: the trainer's policy (weights are pushed from it); model_path: directory / hub id vLLM
        builds the architecture (and initial weights) from. dtype None = the trainer model's dtype.
        kv_cache_memory_bytes: explicit KV cache size (CPU default 1 GiB unless VLLM_CPU_KVCACHE_SPACE
        is set; GPU default None = gpu_memory_utilization decides). enforce_eager None = eager on CPU
        (torch.compile start-up is minutes there), CUDA graphs on GPU. llm_kwargs: passed to vllm.LLM."""
        if sync_chunk_mb <= 0:
            raise ValueError(f"sync_chunk_mb must be > 0, got {sync_chunk_mb}")
        if sync_timeout_s <= 0:
            raise ValueError(f"sync_timeout_s must be > 0, got {sync_timeout_s}")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling  # may be replaced between generate calls; read on every call
        self.sync_chunk_mb = sync_chunk_mb
        self.sync_timeout_s = float(sync_timeout_s)
        self.generation_config = _generation_config(model, model_path)  # its EOS ids end completions too
        if not self.eos_ids:
            raise ValueError("need an EOS: the tokenizer has no eos_token_id and stop_token_ids is empty")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.last_sync: dict[str, float] = {}  # metrics of the latest sync_weights, for the loop to log
        self._sync_thread: threading.Thread | None = None  # a timed-out sync that may still be running

        on_gpu = torch.cuda.is_available()
        self.sleep_enabled = bool(sleep) and on_gpu
        kv_cache_memory_bytes = _process_env(on_gpu, kv_cache_memory_bytes)

        kwargs, seed = self._placement(int(tensor_parallel_size), seed)
        if dtype is None:
            dtype = next(model.parameters()).dtype
        if isinstance(dtype, torch.dtype):
            dtype = _DTYPE_NAMES.get(dtype, "auto")
        tokenizer_path = self._private_tokenizer(model, tokenizer)

        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            tokenizer=tokenizer_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=self.tp,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            enable_sleep_mode=self.sleep_enabled,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            **kwargs,
            **(llm_kwargs or {}),
        )
        self.init_seconds = time.perf_counter() - t0
        self._asleep: set[str] = set()  # vLLM memory tags currently released
        self._weights_stale = False  # True after a level-2 sleep discarded the weights
        if self.sleep_enabled:
            # The trainer still has to build its optimizer etc.; the first generate pushes the weights.
            self._sleep()

    def _placement(self, tp: int, seed: int) -> tuple[dict[str, Any], int]:
        """Ranks of a multi-rank trainer: one engine each; a TP group shares one sharded engine. Returns the
        vllm.LLM placement keyword arguments and this engine's seed (the same inside a TP group, different
        across groups, so data-parallel ranks sample differently)."""
        self.world, self.rank, self.tp = gd.world_size(), gd.rank(), tp
        if self.world % self.tp:
            raise ValueError(f"tensor_parallel_size {self.tp} must divide the trainer's world size {self.world}")
        self._tp_group = None
        if self.world == 1:
            return {}, seed
        if self.tp > 1:  # every rank must create every subgroup, in the same order
            self._tp_group = gd.new_subgroups([list(range(i, i + self.tp)) for i in range(0, self.world, self.tp)])
        return {"distributed_executor_backend": "external_launcher"}, seed + self.rank // self.tp

    def _private_tokenizer(self, model, tokenizer) -> str | None:
        """vLLM needs the tokenizer only to match stop strings; give it the trainer's own (saved to a private
        directory) so that it cannot disagree with the one that built the prompt ids. None: the one next to
        the weights (a tokenizer that cannot be saved)."""
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="gdpo-vllm-tokenizer-")
        try:
            tokenizer.save_pretrained(self._tokenizer_dir.name)
            if getattr(model, "config", None) is not None:
                # vLLM reads config.json next to a tokenizer (model_type); without one it logs errors, retries
                model.config.save_pretrained(self._tokenizer_dir.name)
            return self._tokenizer_dir.name
        except Exception:  # noqa: BLE001
            return None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a completion (`types.stop_token_ids`, the same set as the hf backend's)."""
        return tuple(stop_token_ids(self.tokenizer, self.generation_config, self.sampling.stop_token_ids))

    # ------------------------------------------------------------------ sleep / wake (GPU)
    def _sleep(self) -> None:
        self.llm.sleep(level=2)
        self._asleep = {"weights", "kv_cache"}
        self._weights_stale = True

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # ------------------------------------------------------------------ weight sync
    def _named_params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        from gdpo.policy.lora import is_peft_model, merged_sync_weights

        if is_peft_model(model):  # LoRA: base-model names, adapted weights merged (W + scaling * B @ A)
            return [(_vllm_name(n), p) for n, p in merged_sync_weights(model)]
        return [(_vllm_name(n), p) for n, p in model.named_parameters()]

    def _load_chunk(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc(_worker_load_chunk, args=(weights,))

    def _check_no_stuck_sync(self) -> None:
        if self._sync_thread is not None and self._sync_thread.is_alive():
            raise RuntimeError(
                "a vLLM weight sync that timed out is still running; the engine's weights are undefined "
                "until it ends (see the earlier 'vLLM weight sync timed out' error)"
            )
        self._sync_thread = None

    def _sync_loop(self, chunks, progress: _SyncProgress, cancel: threading.Event, cuda_device: int | None):
        """Runs in the sync thread; errors are stored in `progress` and re-raised by the caller."""
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)  # a new thread starts on device 0
            progress.stage = "starting the layer-wise reload"
            self.llm.collective_rpc(_worker_begin_reload)
        except BaseException as e:
            progress.error, progress.error_stage = e, progress.stage
            return
        try:
            for i, chunk in enumerate(chunks):
                if cancel.is_set():
                    return
                progress.stage = f"loading chunk {i + 1}/{len(chunks)} (first parameter {chunk[0][0]})"
                with torch.no_grad(), _gathered([q for _, p in chunk for q in getattr(p, "params", [p])]):
                    self._load_chunk([(name, p.value() if hasattr(p, "value") else p.data) for name, p in chunk])
                progress.chunks_done += 1
                progress.bytes_done += sum(_param_bytes(p) for _, p in chunk)
        except BaseException as e:
            progress.error, progress.error_stage = e, progress.stage
        finally:
            # Always close the reload session (also after an error or a cancel), so that the engine is left
            # with processed (if partly old) weights rather than half-materialised layers.
            progress.stage = "finalising the layer-wise reload"
            try:
                per_worker = self.llm.collective_rpc(_worker_finish_reload)
                progress.missing = sorted(set().union(*per_worker))
                progress.stage = "done"
            except BaseException as e:
                if progress.error is None:
                    progress.error, progress.error_stage = e, progress.stage

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s parameters into the engine (chunked, timed, bounded by sync_timeout_s)."""
        self._check_no_stuck_sync()
        self.model = model
        params = self._named_params(model)
        chunks = _chunks(params, int(self.sync_chunk_mb * 2**20))
        if self.sleep_enabled:
            self._wake("weights")
        progress, cancel = _SyncProgress(), threading.Event()
        cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        thread = threading.Thread(
            target=self._sync_loop,
            args=(chunks, progress, cancel, cuda_device),
            name="gdpo-vllm-weight-sync",
            daemon=True,
        )
        t0 = time.perf_counter()
        thread.start()
        thread.join(self.sync_timeout_s)
        elapsed = time.perf_counter() - t0
        if thread.is_alive():
            cancel.set()  # stops after the current chunk, then closes the reload session
            self._sync_thread = thread
            total = sum(_param_bytes(p) for _, p in params)
            raise RuntimeError(
                f"vLLM weight sync timed out after {elapsed:.1f}s (rollout.weight_sync_timeout_s="
                f"{self.sync_timeout_s:g}) while {progress.stage}: {progress.chunks_done}/{len(chunks)} "
                f"chunks, {progress.bytes_done / 1e6:.1f} of {total / 1e6:.1f} MB loaded. A stuck "
                "collective (a rank that skipped the sync, a dead peer) is the usual cause; a very large "
                "model on a slow link may just need a larger timeout. The engine's weights are now a mix "
                "of old and new."
            )
        if progress.error is not None:
            raise RuntimeError(
                f"vLLM weight sync failed while {progress.error_stage}: {progress.error!r}"
            ) from progress.error
        if progress.missing:
            shown = ", ".join(progress.missing[:8]) + (" ..." if len(progress.missing) > 8 else "")
            raise RuntimeError(
                f"vLLM weight sync: {len(progress.missing)} engine parameter(s) got no value from the "
                f"trainer model ({shown}); do the trainer's parameter names match the checkpoint at "
                "model_path?"
            )
        self.llm.reset_prefix_cache()  # cached KV blocks hold keys/values of the old weights
        self._weights_stale = False
        self.last_sync = {
            "weight_sync/seconds": elapsed,
            "weight_sync/mb": progress.bytes_done / 1e6,
            "weight_sync/chunks": float(len(chunks)),
            "weight_sync/mb_per_s": progress.bytes_done / 1e6 / max(elapsed, 1e-9),
        }

    # ------------------------------------------------------------------ generation
    def _vllm_sampling(self, n: int):
        from vllm import SamplingParams as VSamplingParams

        s = self.sampling
        return VSamplingParams(
            n=n,  # 1 when greedy (vLLM refuses n > 1 there; generate repeats the one completion)
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,  # 0 = off in both
            max_tokens=s.max_new_tokens,
            min_tokens=s.min_new_tokens,  # suppresses EOS and stop_token_ids before that many tokens
            ignore_eos=True,  # EOS handling is ours: stop_token_ids below (see the module docstring)
            stop_token_ids=list(self.eos_ids),
            stop=list(s.stop_strings) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,  # stop strings may be special tokens, as in the hf backend
            detokenize=bool(s.stop_strings),  # text is only needed to find stop strings
            logprobs=0 if s.return_logprobs else None,  # 0 = just the sampled token's log-prob
            flat_logprobs=True,
        )

    def _gather_tp(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """Ranks of a TP group run one sharded engine, which needs the same requests on every rank:
        all-gather the group's prompts; returns them and the offset of this rank's own prompts."""
        if self._tp_group is None:
            return prompts, 0
        parts = gd.all_gather_object(prompts, group=self._tp_group)
        me = gd.group_rank(self._tp_group)
        return [p for part in parts for p in part], sum(len(part) for part in parts[:me])

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int) -> RolloutBatch:
        """n samples per prompt, rows i*n .. (i+1)*n-1 for prompt i (see RolloutBatch for shapes)."""
        if n < 1 or not prompt_ids:
            raise ValueError(f"need n >= 1 and at least one prompt, got n={n}, {len(prompt_ids)} prompts")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        self._check_no_stuck_sync()
        t0 = time.perf_counter()
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if self._weights_stale:  # a level-2 sleep discarded them and no sync came since
            self.sync_weights(self.model)
        if self.sleep_enabled:
            self._wake("weights")
            self._wake("kv_cache")
        all_prompts, offset = self._gather_tp(prompts)
        greedy = self.sampling.temperature == 0
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in all_prompts],
                self._vllm_sampling(1 if greedy else n),
                use_tqdm=False,
            )
        finally:
            if self.sleep_enabled:
                self._sleep()
        outputs = outputs[offset : offset + len(prompts)]

        rows: list[list[int]] = []  # completion ids, N of them
        lps: list[list[float]] = []
        stopped: list[bool] = []
        for out in outputs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                comps = comps * n  # greedy decoding is deterministic: the n samples are one completion
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for a prompt, expected {n}")
            for c in comps:
                ids = list(c.token_ids)
                rows.append(ids)
                # "stop": EOS / stop id / stop string. An EOS on the very last allowed token is a stop too.
                stopped.append(c.finish_reason == "stop" or (len(ids) > 0 and ids[-1] in self.eos_ids))
                if self.sampling.return_logprobs:
                    flat = (
                        c.logprobs
                    )  # FlatLogprobs: with logprobs=0, one entry (the sampled token) per position
                    starts = flat.start_indices
                    if len(starts) != len(ids) or any(flat.token_ids[s] != t for s, t in zip(starts, ids)):
                        raise RuntimeError(
                            "vLLM returned log-probs that do not line up with the sampled tokens"
                        )
                    lps.append([flat.logprobs[s] for s in starts])

        N = len(rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # [N]
        T = max(1, int(lengths.max()))
        completion_ids = torch.full((N, T), self.pad_id, dtype=torch.long)  # [N, T]
        logprobs = torch.zeros((N, T), dtype=torch.float32) if self.sampling.return_logprobs else None
        for i, r in enumerate(rows):
            if r:
                completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                if logprobs is not None:
                    logprobs[i, : len(r)] = torch.tensor(lps[i], dtype=torch.float32)
        completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # [N, T]
        truncated = ~torch.tensor(stopped, dtype=torch.bool)  # [N]
        prompt_ids_t, prompt_mask = _left_pad([p for p in prompts for _ in range(n)], self.pad_id)  # [N, P]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return RolloutBatch(
            prompt_ids=prompt_ids_t,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            completion_lengths=lengths,
            truncated=truncated,
            completion_texts=texts,
            group_size=n,
            sampling_logprobs=logprobs,
            stats=timing_stats(time.perf_counter() - t0, lengths),
        )
