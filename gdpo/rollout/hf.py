"""Rollouts with `transformers.generate`: all prompts x G samples in one left-padded batch (or in chunks).

Design notes
- The sampling distribution is exactly temperature -> top-k -> top-p over the model's logits. The
  checkpoint's own generation_config.json (e.g. Qwen's repetition_penalty=1.05, top_k=20) is NOT
  applied: RL needs samples from the policy whose log-probs the loss uses. We pass a fresh
  GenerationConfig and our own warpers, so nothing is filled in from the model or global defaults.
- Stopping: `generate` stops a row on any EOS id (the tokenizer's, the checkpoint generation
  config's, `stop_token_ids`); `_StopTracker`
  additionally stops it when its completion text contains a stop string, and records the step at
  which each row ended, which gives the completion mask (up to and including the stop token)
  without rescanning the tokens afterwards.
- Sampling log-probs (optional): `_SampledLogprobs` sits last in the logits-processor chain, so it
  sees the final sampling scores; it keeps only one [rows, V] log-softmax alive and gathers the
  sampled token's log-prob from it on the next step (the sampled token is then the last input id).
  Greedy (temperature 0) has no warpers: the log-probs are then those of the temperature-1 policy.
- Shared prompt prefill (`share_prompt_prefill`, on by default): each prompt's first P-1 tokens
  are run once, the KV cache is repeated G times, and `generate` continues from it (it only runs
  the uncached last prompt token). Prefill is compute-bound on CPU, so this removes (G-1)/G of it.
- KV cache on, eval mode (dropout off, and gradient checkpointing would otherwise switch the cache
  off), no autograd. Under ZeRO-3 the parameters are gathered once for the whole call.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gdpo.rollout.types import RolloutBatch, SamplingParams


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the processed scores; must be the last processor."""

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [rows, V] log-softmax of the previous step's scores
        self.cols: list[torch.Tensor] = []  # per generated token: [rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:  # the token sampled from self.prev is now input_ids[:, -1]
            self.cols.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """[rows, T] for the T generated tokens (the last one is gathered here)."""
        T = completion_ids.shape[1]
        if len(self.cols) < T and self.prev is not None:
            self.cols.append(
                self.prev.gather(1, completion_ids[:, len(self.cols) : len(self.cols) + 1]).squeeze(1)
            )
        self.prev = None
        return torch.stack(self.cols[:T], dim=1)


class _StopTracker(StoppingCriteria):
    """Ends rows on EOS ids or stop strings and remembers each row's completion length at its end."""

    def __init__(
        self, prompt_len: int, rows: int, eos_ids: torch.Tensor, stop_strings: Sequence[str], tokenizer
    ):
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids  # [E]
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        # A stop string spans at most its UTF-8 byte count in tokens (+1 for a token that starts before it).
        self.window = max((len(s.encode()) for s in self.stop_strings), default=0) + 1
        self.end = torch.full(
            (rows,), -1, dtype=torch.long, device=eos_ids.device
        )  # [rows], -1 = still running

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        cur = input_ids.shape[1] - self.prompt_len  # completion tokens so far, incl. the new one
        done = torch.isin(input_ids[:, -1], self.eos_ids)  # [rows]
        if self.stop_strings:
            running = (self.end < 0) & ~done
            idx = running.nonzero().flatten().tolist()
            if idx:
                # Only completion tokens: a stop string must not match text that started in the prompt.
                w = min(self.window, cur)
                tails = self.tokenizer.batch_decode(input_ids[idx, -w:].tolist(), skip_special_tokens=False)
                hit = [i for i, text in zip(idx, tails) if any(s in text for s in self.stop_strings)]
                if hit:
                    done[hit] = True
        self.end = torch.where((self.end < 0) & done, torch.full_like(self.end, cur), self.end)
        return self.end >= 0


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """[n, width] ids and mask, each row right-aligned."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _gathered_params(model: torch.nn.Module, engine=None):
    """Under ZeRO-3 a forward fetches each layer's parameters and frees them right after, and the module hooks
    do so even inside GatheredParameters: every generated token would all-gather the whole model again. With
    the DeepSpeed engine at hand, gather everything once and take the ZeRO-3 hooks off for the call
    (DeepSpeed's `unwrap_model_for_generation`); the full weights are freed again on exit. Memory: one full
    copy of the weights per rank while generating."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    if engine is not None:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(engine)
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)  # still fetches per token (no hooks off)


class HFRolloutEngine:
    """`RolloutEngine` on `transformers.generate`, sampling from the (live) policy model itself."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        sampling: SamplingParams,
        *,
        generation_batch_size: int | None = None,
        share_prompt_prefill: bool = True,
    ):
        """generation_batch_size: rows (prompts x G) per `generate` call, rounded down to whole groups
        (at least one group); None = all rows at once. share_prompt_prefill: see the module docstring.
        A DeepSpeed engine may be passed for `model`: its HF module is used."""
        self.engine = model if hasattr(model, "module") else None  # a DeepSpeed engine (see _gathered_params)
        model = getattr(model, "module", model)
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.generation_batch_size = generation_batch_size
        self.share_prompt_prefill = share_prompt_prefill
        # EOS ids: the tokenizer's, the checkpoint's generation_config ones (Qwen2.5-Instruct ends turns
        # with <|im_end|> but also lists <|endoftext|>), and any configured stop ids.
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = tuple(dict.fromkeys(eos + gen_eos + list(sampling.stop_token_ids)))
        if not self.eos_ids:
            raise ValueError("need an EOS: the tokenizer has no eos_token_id and stop_token_ids is empty")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: generation runs on the training model object, so it always has the current weights."""
        if hasattr(model, "module"):
            self.engine = model
        self.model = getattr(model, "module", model)

    def _processors(self) -> tuple[LogitsProcessorList, _SampledLogprobs | None]:
        s = self.sampling
        procs = LogitsProcessorList()
        if s.temperature > 0:
            if s.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k > 0:
                procs.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=s.top_p))
        recorder = _SampledLogprobs() if s.return_logprobs else None
        if recorder is not None:
            procs.append(recorder)
        return procs, recorder

    def _prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """KV cache of the first P-1 columns of the u unique prompts [u, P], repeated n times per prompt."""
        from transformers import DynamicCache

        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
        out = self.model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=position_ids[:, :-1],
            past_key_values=DynamicCache(config=self.model.config),
            use_cache=True,
            logits_to_keep=1,  # the logits are not needed; this skips the LM head for all but one column
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # row i -> rows i*n .. i*n+n-1, matching the expanded batch
        return cache

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], n: int, device: torch.device):
        """One `generate` call for n samples of each prompt.

        Returns completion ids [u*n, Tc], lengths [u*n], truncated [u*n], logprobs [u*n, Tc] | None.
        """
        s = self.sampling
        uniq_ids, uniq_mask = _left_pad(prompts, self.pad_id)  # [u, Pc]
        uniq_ids, uniq_mask = uniq_ids.to(device), uniq_mask.to(device)
        input_ids = uniq_ids.repeat_interleave(n, dim=0)  # [u*n, Pc], groups contiguous
        attention_mask = uniq_mask.repeat_interleave(n, dim=0)
        rows, prompt_len = input_ids.shape
        extra = {}
        if self.share_prompt_prefill and n > 1 and prompt_len > 1:
            extra["past_key_values"] = self._prefix_cache(uniq_ids, uniq_mask, n)
        # Fresh config: every field we do not set stays neutral (no repetition penalty, no top-k 50 default).
        gen_config = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens,  # generate suppresses eos_token_id before that
            do_sample=s.temperature > 0,
            temperature=1.0,  # the warpers are ours (see _processors); these keep generate's own off
            top_k=0,
            top_p=1.0,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        procs, recorder = self._processors()
        tracker = _StopTracker(
            prompt_len, rows, torch.tensor(self.eos_ids, device=device), s.stop_strings, self.tokenizer
        )
        saved_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()  # keep the checkpoint's sampling defaults out
        try:
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                logits_processor=procs,
                stopping_criteria=StoppingCriteriaList([tracker]),
                **extra,
            )
        finally:
            self.model.generation_config = saved_config
        completion = sequences[:, prompt_len:]  # [rows, Tc]
        Tc = completion.shape[1]
        truncated = tracker.end < 0  # [rows]
        lengths = torch.where(truncated, torch.full_like(tracker.end, Tc), tracker.end).clamp(max=Tc)
        logprobs = recorder.result(completion) if recorder is not None else None
        return completion, lengths, truncated, logprobs

    def generate(self, prompt_ids: list[list[int]], n: int) -> RolloutBatch:
        """n samples per prompt, rows i*n .. (i+1)*n-1 for prompt i (see RolloutBatch for shapes)."""
        if n < 1 or not prompt_ids:
            raise ValueError(f"need n >= 1 and at least one prompt, got n={n}, {len(prompt_ids)} prompts")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        device = next(self.model.parameters()).device
        # Whole groups per generate call, so a prompt's shared prefill serves all its G rows.
        per_call = max(1, (self.generation_batch_size or len(rows)) // n)

        was_training = self.model.training
        self.model.eval()
        try:
            with _gathered_params(self.model, self.engine):
                parts = [
                    self._generate_chunk([list(p) for p in prompt_ids[i : i + per_call]], n, device)
                    for i in range(0, len(prompt_ids), per_call)
                ]
        finally:
            self.model.train(was_training)

        # Merge chunks: prompts re-padded to the global P, completions to the global T.
        prompt_ids_t, prompt_mask = _left_pad(rows, self.pad_id)  # [N, P]
        T = max(c.shape[1] for c, _, _, _ in parts)
        N = len(rows)
        completion_ids = torch.full((N, T), self.pad_id, dtype=torch.long, device=device)
        lengths = torch.empty(N, dtype=torch.long, device=device)
        truncated = torch.empty(N, dtype=torch.bool, device=device)
        logprobs = None if not self.sampling.return_logprobs else torch.zeros((N, T), device=device)
        r = 0
        for comp, lens, trunc, lps in parts:
            k, Tc = comp.shape
            completion_ids[r : r + k, :Tc] = comp
            lengths[r : r + k] = lens
            truncated[r : r + k] = trunc
            if logprobs is not None:
                logprobs[r : r + k, :Tc] = lps
            r += k
        completion_mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()  # [N, T]
        # Tokens after a row's end are whatever generate padded with; make them pad_id / 0 explicitly.
        completion_ids = torch.where(
            completion_mask.bool(), completion_ids, torch.full_like(completion_ids, self.pad_id)
        )
        if logprobs is not None:
            logprobs = torch.where(completion_mask.bool(), logprobs, torch.zeros_like(logprobs))
        ids_list = completion_ids.tolist()
        texts = self.tokenizer.batch_decode(
            [ids[:L] for ids, L in zip(ids_list, lengths.tolist())], skip_special_tokens=True
        )
        elapsed = time.perf_counter() - t0
        n_tokens = int(lengths.sum())
        return RolloutBatch(
            prompt_ids=prompt_ids_t.to(device),
            prompt_mask=prompt_mask.to(device),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            completion_lengths=lengths,
            truncated=truncated,
            completion_texts=texts,
            group_size=n,
            sampling_logprobs=logprobs,
            stats={
                "rollout/seconds": elapsed,
                "rollout/tokens_per_second": n_tokens / max(elapsed, 1e-9),
                "rollout/completion_tokens": float(n_tokens),
            },
        )
