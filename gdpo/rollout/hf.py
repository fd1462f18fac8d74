"""Rollouts from the live HF policy: all prompts x G samples in one left-padded batch (or in chunks).

Design notes
- A lean decode loop instead of `transformers.generate`: one model call per token with a KV cache, the sampling
  maths, and nothing else. On a small model `generate`'s per-token machinery (input preparation, processor and
  stopping-criteria plumbing, cache-position bookkeeping) costs as much as the model itself; the loop below does
  the same computation as `generate(do_sample=...)` with our warpers (softmax + `torch.multinomial`, or argmax).
  On `sdpa` models, one-token steps use `_decode_attention` (no copy of the KV cache per step, see there).
- The sampling distribution is exactly temperature -> top-k -> top-p over the model's logits. The
  checkpoint's own generation_config.json (e.g. Qwen's repetition_penalty=1.05, top_k=20) is never read:
  RL needs samples from the policy whose log-probs the loss uses.
- Stopping: a row stops on any EOS id (the tokenizer's, the checkpoint generation config's,
  `stop_token_ids`); `_StopTracker` additionally stops it when its completion text contains a stop string,
  and records the step at which each row ended, which gives the completion mask (up to and including the
  stop token) without rescanning the tokens afterwards. `min_new_tokens` masks the EOS ids before that many
  tokens (fixed-length rollouts for benchmarks).
- Sampling log-probs (optional): log-softmax of the final sampling scores, gathered at the sampled token.
  Greedy (temperature 0) has no warpers: the log-probs are then those of the temperature-1 policy.
- Shared prompt prefill (`share_prompt_prefill`, on by default): each prompt's first P-1 tokens
  are run once, the KV cache is repeated G times, and decoding continues from it (the first step runs
  the uncached last prompt token). Prefill is compute-bound on CPU, so this removes (G-1)/G of it.
- The KV cache is reserved for P + T positions up front (`ReservedLayer`) instead of growing by `cat`.
- Llama-family models (Llama, Qwen2, Qwen3, Mistral) decode with `fast_decode.FastDecoder`: the same one-token
  step as plain tensor code on the model's own weights, without the HF module forward (~20% less generation
  time on small models). The prompt is still prefilled by the HF forward; its cache is copied in.
- Finished rows leave the decode batch (`compact_finished`): once a quarter of the batch has finished, their
  rows are dropped from the KV cache and the step runs on the live rows only. The sampling noise is drawn for
  every row as `torch.multinomial` would, so the tokens do not change; only the cost does.
- KV cache on, eval mode (dropout off, and gradient checkpointing would otherwise switch the cache
  off), no autograd. Under ZeRO-3 the parameters are gathered once for the whole call.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gdpo.rollout.fast_decode import FastDecoder, unsupported_reason
from gdpo.rollout.types import RolloutBatch, SamplingParams, stop_token_ids, timing_stats


class _StopTracker:
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


def _reserve_cache(cache, capacity: int):
    """Swap each plain `DynamicLayer` of `cache` for a `ReservedLayer` of `capacity` positions (same contents)."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            filled = layer.is_initialized and layer.keys.numel() > 0
            cache.layers[i] = _reserved_layer_class()(capacity, *((layer.keys, layer.values) if filled else ()))
    return cache


@functools.cache
def _reserved_layer_class():
    """`ReservedLayer`, defined at first use (transformers.cache_utils is heavy to import)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A `DynamicLayer` that writes new positions into buffers reserved for the whole rollout: `cat` would
        reallocate (and page-fault) every layer's whole cache at every step, which on a small model costs more
        than the step's attention. `keys` / `values` are views of the filled part [B, H, n, D], as before."""

        def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            super().__init__()
            self.capacity = capacity
            self._k = self._v = None
            if keys is not None:
                self.update(keys, values)

        def update(self, key_states, value_states, *args, **kwargs):
            n = self.get_seq_length()
            m = n + key_states.shape[-2]
            if self._k is None or m > self._k.shape[-2]:  # first write, or past the reservation: (re)allocate
                size = max(self.capacity, m)
                k = key_states.new_empty((*key_states.shape[:2], size, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:2], size, value_states.shape[-1]))
                if n:
                    k[:, :, :n], v[:, :, :n] = self.keys, self.values
                self._k, self._v = k, v
                self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._k[:, :, n:m] = key_states
            self._v[:, :, n:m] = value_states
            self.keys, self.values = self._k[:, :, :m], self._v[:, :, :m]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the rows `indices` (finished rows leaving the decode batch), reservation included."""
            if self._k is None:
                return
            n = self.get_seq_length()
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    return ReservedLayer


_DECODE_ATTN = "gdpo_decode_sdpa"


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`sdpa`, except for one-token decoding with grouped KV heads: there two batched matmuls per layer.

    query [B, Hq, 1, D], key / value [B, Hkv, L, D] (the whole cache), attention_mask bool [B, 1, 1, L] or None.
    With a padding mask, HF's sdpa path first copies the whole cache Hq / Hkv times (`repeat_kv`) and then runs
    the flash kernel for a single query row; both cost more than the attention itself on CPU. Here the query
    heads that share a KV head are stacked (head h reads KV head h // rep, as in repeat_kv), which needs no copy.
    Returns [B, 1, Hq, D], as sdpa does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, q_len, D = query.shape
    Hkv = key.shape[1]
    if q_len != 1 or Hq == Hkv or dropout or kwargs.get("softcap") or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, rep, D]
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # [B, Hkv, rep, L]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, rep, D]
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None


@functools.cache
def _register_decode_attention() -> None:
    """Once per process, at the first rollout (the imports are heavy)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_DECODE_ATTN, _decode_attention)
    AttentionMaskInterface.register(_DECODE_ATTN, sdpa_mask)  # the same masks as sdpa


@contextlib.contextmanager
def _decode_attention_on(model: torch.nn.Module):
    """Use `_decode_attention` for the duration of a rollout when the model runs on `sdpa` or `flex_attention`.

    flex_attention (chosen for the packed update, loss.packing) pays in training; decoding a padded KV cache with
    it compiles a kernel per cache length, so rollouts use sdpa's math there (the same attention)."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "flex_attention"):
        yield
        return
    _register_decode_attention()
    config._attn_implementation = _DECODE_ATTN
    try:
        yield
    finally:
        config._attn_implementation = impl


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


def _sample(scores: torch.Tensor, rows: int, act: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """The next token of each row in the decode batch: scores [a, V] of rows `act` out of `rows`.

    Sampling is `torch.multinomial(softmax(scores), 1)` written out: argmax of p / E with E ~ Exp(1) noise drawn
    for all `rows` rows, then the decode batch's rows taken. multinomial draws exactly that noise, so the samples
    do not depend on which rows already left the batch (compaction changes the cost, not the tokens).
    """
    if not do_sample:
        return scores.argmax(-1)
    noise = torch.empty((rows, scores.shape[1]), dtype=scores.dtype, device=scores.device).exponential_()
    return (torch.softmax(scores, dim=-1) / noise[act]).argmax(-1)


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
        fast_decode: bool = True,
        compact_finished: bool = True,
    ):
        """generation_batch_size: rows (prompts x G) per `generate` call, rounded down to whole groups
        (at least one group); None = all rows at once. share_prompt_prefill: see the module docstring.
        fast_decode: decode Llama-family models with `fast_decode.FastDecoder` (same maths without the HF
        module forward); other models, and fast_decode=False, decode with the HF forward. compact_finished:
        finished rows leave the decode batch once a quarter of it has finished (their KV cache rows are dropped),
        so the cost follows the live rows; the sampled tokens are the same either way.
        A DeepSpeed engine may be passed for `model`: its HF module is used."""
        self.engine = model if hasattr(model, "module") else None  # a DeepSpeed engine (see _gathered_params)
        model = getattr(model, "module", model)
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.generation_batch_size = generation_batch_size
        self.share_prompt_prefill = share_prompt_prefill
        self.fast_decode = fast_decode
        self.compact_finished = compact_finished
        # EOS ids: the tokenizer's, the checkpoint's generation_config ones (Qwen2.5-Instruct ends turns
        # with <|im_end|> but also lists <|endoftext|>), and any configured stop ids.
        # (types.stop_token_ids: the vLLM backend stops on the same set).
        self.eos_ids = tuple(stop_token_ids(tokenizer, getattr(model, "generation_config", None),
                                            sampling.stop_token_ids))
        if not self.eos_ids:
            raise ValueError("need an EOS: the tokenizer has no eos_token_id and stop_token_ids is empty")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: generation runs on the training model object, so it always has the current weights."""
        if hasattr(model, "module"):
            self.engine = model
        self.model = getattr(model, "module", model)

    def _processors(self) -> LogitsProcessorList:
        """The sampling warpers, in vLLM's order: temperature -> top-k -> top-p (none when greedy)."""
        s = self.sampling
        procs = LogitsProcessorList()
        if s.temperature > 0:
            if s.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k > 0:
                procs.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=s.top_p))
        return procs

    def _use_fast_decode(self, max_len: int) -> bool:
        """FastDecoder reads the parameters directly: under ZeRO-3 only with the DeepSpeed engine at hand
        (`_gathered_params` then gathers them for the whole call; without it the module hooks free them again
        after every module forward)."""
        if not self.fast_decode or unsupported_reason(self.model, max_len) is not None:
            return False
        return self.engine is not None or not any(hasattr(p, "ds_id") for p in self.model.parameters())

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
        """n samples of each prompt, decoded token by token with a KV cache (the module docstring says why
        this is not `generate`).

        Returns completion ids [u*n, Tc], lengths [u*n], truncated [u*n], logprobs [u*n, Tc] | None.
        """
        from transformers import DynamicCache

        s = self.sampling
        uniq_ids, uniq_mask = _left_pad(prompts, self.pad_id)  # [u, P]
        uniq_ids, uniq_mask = uniq_ids.to(device), uniq_mask.to(device)
        rows, P, T = len(prompts) * n, uniq_ids.shape[1], s.max_new_tokens
        # Preallocated [rows, P + T]: the sequences grow in place; every generated column is attended to (a
        # finished row keeps receiving pad tokens, as in `generate`; the completion mask drops them later).
        seq = torch.full((rows, P + T), self.pad_id, dtype=torch.long, device=device)
        seq[:, :P] = uniq_ids.repeat_interleave(n, dim=0)  # groups contiguous
        mask = torch.ones((rows, P + T), dtype=torch.long, device=device)
        mask[:, :P] = uniq_mask.repeat_interleave(n, dim=0)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [rows, P + T], left padding ignored
        fast = self._use_fast_decode(P + T)
        shared = self.share_prompt_prefill and n > 1
        if P > 1 and (shared or fast):  # prefill P-1 columns; decoding starts at the last prompt column
            prefill_ids, prefill_mask = (uniq_ids, uniq_mask) if shared else (seq[:, :P], mask[:, :P])
            cache, start = self._prefix_cache(prefill_ids, prefill_mask, n if shared else 1), P - 1
        else:
            cache, start = DynamicCache(config=self.model.config), 0
        if fast:  # one-token steps as plain tensor code (fast_decode.py), the prefill's cache copied in
            decoder = FastDecoder(self.model, positions, mask)
            if start:
                decoder.load_cache(cache, start)
            cache = None  # copied: do not hold the prefill's cache for the whole rollout
        else:
            decoder, cache = None, _reserve_cache(cache, P + T)
        eos = torch.tensor(self.eos_ids, device=device)  # [E]
        procs = self._processors()
        tracker = _StopTracker(P, rows, eos, s.stop_strings, self.tokenizer)
        running = torch.ones(rows, dtype=torch.bool, device=device)  # [rows]
        act = torch.arange(rows, device=device)  # [a] rows still in the decode batch (finished ones leave it)
        logps: list[torch.Tensor] = []  # per token: [rows]
        width = P  # filled columns of seq
        for t in range(T):
            if decoder is not None:
                scores = decoder.step(seq[act, width - 1], width - 1).float()  # [a, V]
            else:
                out = self.model(input_ids=seq[act, start:width], attention_mask=mask[act, :width],
                                 position_ids=positions[act, start:width], past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
                cache, start = out.past_key_values, width
                scores = out.logits[:, -1].float()  # [a, V]
            if t < s.min_new_tokens:
                scores[:, eos] = -float("inf")
            scores = procs(seq[act, :width], scores)  # temperature -> top-k -> top-p
            nxt = _sample(scores, rows, act, s.temperature > 0)  # [a]
            if s.return_logprobs:
                lp = torch.zeros(rows, device=device)
                lp[act] = torch.log_softmax(scores, dim=-1).gather(1, nxt[:, None]).squeeze(1)
                logps.append(lp)
            seq[act, width] = torch.where(running[act], nxt, torch.full_like(nxt, self.pad_id))
            width += 1
            running &= ~tracker(seq[:, :width], None)
            if not running.any():
                break
            done = ~running[act]  # [a]
            if self.compact_finished and 4 * int(done.sum()) >= len(act):  # a quarter finished: drop those
                keep = (~done).nonzero().flatten()
                act = act[keep]
                if decoder is not None:
                    decoder.keep(keep)
                else:
                    cache.batch_select_indices(keep)
        completion = seq[:, P:width]  # [rows, Tc]
        Tc = completion.shape[1]
        truncated = tracker.end < 0  # [rows]
        lengths = torch.where(truncated, torch.full_like(tracker.end, Tc), tracker.end).clamp(max=Tc)
        logprobs = torch.stack(logps, dim=1) if s.return_logprobs else None
        return completion, lengths, truncated, logprobs

    def generate(self, prompt_ids: list[list[int]], n: int) -> RolloutBatch:
        """n samples per prompt, rows i*n .. (i+1)*n-1 for prompt i (see RolloutBatch for shapes)."""
        if n < 1 or not prompt_ids:
            raise ValueError(f"need n >= 1 and at least one prompt, got n={n}, {len(prompt_ids)} prompts")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        # Whole groups per generate call, so a prompt's shared prefill serves all its G rows.
        per_call = max(1, (self.generation_batch_size or len(prompt_ids) * n) // n)
        groups = [[list(p) for p in prompt_ids[i : i + per_call]] for i in range(0, len(prompt_ids), per_call)]
        was_training = self.model.training
        self.model.eval()
        try:
            with _gathered_params(self.model, self.engine), _decode_attention_on(self.model):
                parts = [self._generate_chunk(g, n, device) for g in groups]
        finally:
            self.model.train(was_training)
        chunks = [self._as_batch(g, n, *part, device) for g, part in zip(groups, parts)]
        batch = RolloutBatch.cat(chunks, self.pad_id)  # prompts re-padded to the global P, completions to T
        batch.stats = timing_stats(time.perf_counter() - t0, batch.completion_lengths)
        return batch

    def _as_batch(self, prompts: list[list[int]], n: int, completion: torch.Tensor, lengths: torch.Tensor,
                  truncated: torch.Tensor, logprobs: torch.Tensor | None, device: torch.device) -> RolloutBatch:
        """One chunk's RolloutBatch: prompts left-padded, tokens after each row's end set to pad_id / 0."""
        prompt_ids, prompt_mask = _left_pad([p for p in prompts for _ in range(n)], self.pad_id)  # [u*n, P]
        T = completion.shape[1]
        completion_mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()  # [u*n, T]
        completion = torch.where(completion_mask.bool(), completion, torch.full_like(completion, self.pad_id))
        if logprobs is not None:
            logprobs = torch.where(completion_mask.bool(), logprobs, torch.zeros_like(logprobs))
        texts = self.tokenizer.batch_decode(
            [ids[:L] for ids, L in zip(completion.tolist(), lengths.tolist())], skip_special_tokens=True
        )
        return RolloutBatch(
            prompt_ids=prompt_ids.to(device),
            prompt_mask=prompt_mask.to(device),
            completion_ids=completion,
            completion_mask=completion_mask,
            completion_lengths=lengths,
            truncated=truncated,
            completion_texts=texts,
            group_size=n,
            sampling_logprobs=logprobs,
        )
