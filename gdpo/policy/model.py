"""Loading the policy / reference model and computing per-token log-probs of completions.

Sequence layout (the one `RolloutBatch.input_ids()` produces): every row is
`[left-padded prompt (P) | right-padded completion (T)]`, so completion token t of every row sits at
column P + t and is predicted by the hidden state at column P + t - 1.

Truncated sampling (top-k / top-p): the sampler draws from the renormalised kept set, and both rollout backends
return that distribution's log-probs (hf: log-softmax of the warped scores; vLLM: `processed_logprobs`). With
`top_k` / `top_p` given, `token_logprobs` renormalises over the same kept set (temperature, then top-k, then
top-p, with the tie and boundary rules of HF's warpers and vLLM's sampler), so with identical weights
trainer and sampler log-probs agree and exp(old - sampling) is 1; over the full softmax it would be the kept
mass S < 1 on every token (TRL issue #6789). The kept set is a constant of the backward pass: the gradient
flows through the kept logits. The sampled token is always kept (it was in the sampler's set; a rounding
difference at the top-p boundary must not give -inf).

Memory: only the T completion positions go through the LM head, and they go through it in chunks of
`chunk_size` positions, so at most a [B, chunk, V] float32 logits block exists at a time. With
autograd on, each chunk is recomputed in backward (activation checkpointing on the head), so the
saved state per chunk is its [B, chunk, H] hidden states, not its logits.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy for the small test models)."""
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | None:
    """The torch dtype for a config / CLI name (``auto`` = None: `default_dtype` of the device decides).

    >>> resolve_dtype("bfloat16"), resolve_dtype("auto")
    (torch.bfloat16, None)
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM from a local directory or a hub id (offline runs need it in the HF cache).

    dtype None = bf16 on GPU, fp32 on CPU. Gradient checkpointing uses the non-reentrant variant;
    it only applies in train mode, so rollouts (eval mode) keep their KV cache.
    """
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": dtype or default_dtype(device), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reference_model(name_or_path: str | os.PathLike, *, beta: float, **kwargs) -> torch.nn.Module | None:
    """The frozen reference policy for the KL term; None (nothing loaded) when beta == 0."""
    if beta == 0:
        return None
    kwargs.pop("gradient_checkpointing", None)  # no backward through the reference
    model = load_causal_lm(name_or_path, **kwargs).eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer; a missing pad token falls back to EOS (padding is masked, so its id is cosmetic)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class TokenLogprobs(NamedTuple):
    logprobs: torch.Tensor  # [B, T] float32, log p(completion token t | prefix); 0 where mask is 0
    entropy: torch.Tensor | None  # [B, T] float32 entropy of the next-token distribution, or None


def _decoder_and_head(model: torch.nn.Module):
    """The transformer body (returns hidden states) and the LM head of a HF causal LM."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    return model, model.get_decoder(), model.get_output_embeddings()


def sampling_removed(
    scores: torch.Tensor,  # [..., V] logits after temperature
    top_k: int = 0,
    top_p: float = 1.0,
    keep: torch.Tensor | None = None,  # [...] token ids that stay in the kept set whatever the rule says
) -> torch.Tensor | None:
    """[..., V] bool: the tokens top-k then top-p remove (None when neither truncates).

    top-k removes every token below the k-th largest score (ties at the k-th are kept); top-p then sorts the
    survivors ascending and removes those whose cumulative probability is <= 1 - top_p, always keeping the most
    likely one: the rules of HF's TopK / TopP warpers and of vLLM's `apply_top_k_top_p`.

    >>> s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    >>> sampling_removed(s, top_k=2).tolist()
    [[False, False, True, True]]
    >>> sampling_removed(s, top_p=0.9).tolist()  # probs .64 .24 .09 .03: the top three carry >= 0.9
    [[False, False, False, True]]
    """
    if not (0 < top_k < scores.shape[-1]) and not top_p < 1.0:
        return None
    removed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [..., 1]
        removed = scores < kth
    if top_p < 1.0:
        masked = scores.masked_fill(removed, -float("inf"))
        srt, idx = torch.sort(masked, dim=-1, descending=False)  # [..., V]
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False  # at least one token
        removed = removed | drop.scatter(-1, idx, drop)
    if keep is not None:
        removed = removed.scatter(-1, keep.unsqueeze(-1), False)
    return removed


def _chunk_logprobs(
    head: torch.nn.Module,  # the LM head, called as a module so ZeRO-3 hooks gather its weight
    hidden: torch.Tensor,  # [B, c, H]
    targets: torch.Tensor,  # [B, c]
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()  # [B, c, V]
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    removed = sampling_removed(logits.detach(), top_k, top_p, keep=targets)  # [B, c, V] | None
    if removed is not None:
        logits = logits.masked_fill(removed, -float("inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, c]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [B, c]
    if with_entropy:
        # H = lse - sum_v p_v * logit_v (over the kept set: removed tokens have p = 0, and 0 * -inf must not be NaN)
        finite = logits if removed is None else logits.masked_fill(removed, 0.0)
        ent = lse - (torch.softmax(logits, dim=-1) * finite).sum(-1)  # [B, c]
    else:
        ent = torch.zeros_like(logp)
    return logp, ent


def _prompt_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive rows with the same prompt (a GRPO group): first row of each run [u] and run of each row [B]."""
    _, run, counts = torch.unique_consecutive(
        torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1), dim=0, return_inverse=True, return_counts=True
    )
    return counts.cumsum(0) - counts, run


def _completion_hidden(hf_model, decoder, input_ids, attention_mask, position_ids, P: int) -> torch.Tensor:
    """[B, T, H] last hidden states at columns P-1 .. P+T-2 (column P-1+t predicts completion token t).

    The last column predicts nothing we score, so the body only runs columns 0..P+T-2. Rows that repeat the
    row above's prompt (the G rollouts of a prompt) share its prompt: the prompt columns run once per run of
    equal prompts, their KV cache is indexed out to every row, and only the completion columns run per row.
    The same function of the same inputs as one forward over [B, P + T - 1] (attention sees the same keys and
    values), for (G-1)/G less prompt compute in forward and backward; gradients flow through the shared cache.
    Not used with gradient checkpointing (HF turns the cache off in train mode then) or for a lone row per prompt.
    """
    from transformers import DynamicCache

    L = input_ids.shape[1] - 1
    firsts, run = _prompt_runs(input_ids[:, :P], attention_mask[:, :P])
    checkpointing = getattr(hf_model, "is_gradient_checkpointing", False) and hf_model.training
    if P < 2 or len(firsts) == len(run) or checkpointing:
        out = decoder(input_ids=input_ids[:, :L], attention_mask=attention_mask[:, :L],
                      position_ids=position_ids[:, :L], use_cache=False)
        return out.last_hidden_state[:, P - 1 :]
    pre = decoder(  # the u distinct prompts [u, P]
        input_ids=input_ids[firsts, :P],
        attention_mask=attention_mask[firsts, :P],
        position_ids=position_ids[firsts, :P],
        past_key_values=DynamicCache(config=hf_model.config),
        use_cache=True,
    )
    first_hidden = pre.last_hidden_state[run, -1:]  # [B, 1, H]: column P-1 predicts completion token 0
    if L == P:
        return first_hidden
    cache = pre.past_key_values
    cache.batch_select_indices(run)  # [u, ...] -> [B, ...] (differentiable indexing)
    rest = decoder(
        input_ids=input_ids[:, P:L],
        attention_mask=attention_mask[:, :L],
        position_ids=position_ids[:, P:L],
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first_hidden, rest.last_hidden_state], dim=1)  # [B, T, H]


def _packed_completion_hidden(decoder, input_ids, attention_mask, P: int):
    """The rows without their padding, concatenated into one sequence [1, L] (L = the rows' real tokens), one
    forward; returns (hidden states predicting the C completion tokens [1, C, H], those tokens [1, C], where they
    go in [B, T] as a bool mask).

    Position ids restart at 0 in every row (the padded path's positions: they follow the attention mask) and the
    attention mask is None, so transformers reads the row boundaries off the position ids: flash-attention runs
    its variable-length kernel, sdpa / eager a dense block-diagonal [L, L] mask (exact, but no attention compute
    saved). `packing_problem` checks that the model's attention
    really keeps the rows apart. Row i's tokens are columns [P - prompt_i, P + completion_i): a left-padded prompt
    followed by a right-padded completion, contiguous; completion token t is predicted by the packed token
    before it, which is in the same row (every row has a prompt token).
    """
    keep = attention_mask.bool()  # [B, P + T]
    if not keep[:, :P].any(1).all():
        raise ValueError("packing needs at least one prompt token per row")
    ids = input_ids[keep].unsqueeze(0)  # [1, L] row after row
    pos = (attention_mask.long().cumsum(-1) - 1)[keep].unsqueeze(0)  # [1, L]
    flat = keep.flatten().long().cumsum(0).view_as(keep) - 1  # [B, P + T] index in the packed row (where kept)
    comp = keep[:, P:]  # [B, T]
    tgt = flat[:, P:][comp]  # [C]
    hidden = decoder(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state
    return hidden[:, tgt - 1], ids[:, tgt], comp  # [1, C, H], [1, C], [B, T]


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, P + T]
    attention_mask: torch.Tensor,  # [B, P + T]
    prompt_len: int,  # P
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    return_entropy: bool = False,
    top_p: float = 1.0,
    top_k: int = 0,
    packed: bool = False,
) -> TokenLogprobs:
    """Per-token log-probs [B, T] of the completion tokens (columns P..P+T-1), computed chunk-wise over T.

    `temperature` divides the logits, matching the distribution the rollout sampled from; `top_k` (0 = off) and
    `top_p` (1 = off) renormalise over the tokens the sampler kept (module docstring). With top-p each chunk also
    sorts its [B, chunk, V] logits: about 3x the logits block of extra memory, so lower `chunk_size` for it.
    The entropy is then that of the truncated distribution.
    Position ids follow the attention mask (left padding does not shift positions), as in `generate`.
    `packed`: the padding-free path (`_packed_completion_hidden`): no compute on padding, the same values; the
    LM head then runs on the C real completion tokens in chunks of `chunk_size`.
    Works under autograd (training) and under no_grad (old / reference log-probs).
    """
    hf_model, decoder, head = _decoder_and_head(model)
    softcap = getattr(hf_model.config, "final_logit_softcapping", None)
    P = prompt_len
    T = input_ids.shape[1] - P
    if T < 1:
        raise ValueError(f"no completion tokens: input width {input_ids.shape[1]} <= prompt_len {P}")
    if packed:
        hidden, targets, comp = _packed_completion_hidden(decoder, input_ids, attention_mask, P)  # [1, C, H]
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P + T]
        hidden = _completion_hidden(hf_model, decoder, input_ids, attention_mask, position_ids, P)  # [B, T, H]
        targets = input_ids[:, P:]  # [B, T]
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for s in range(0, hidden.shape[1], chunk_size):
        args = (head, hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size])
        if use_ckpt:
            lp, en = checkpoint(
                _chunk_logprobs, *args, temperature, softcap, return_entropy, top_k, top_p, use_reentrant=False
            )
        else:
            lp, en = _chunk_logprobs(*args, temperature, softcap, return_entropy, top_k, top_p)
        logps.append(lp)
        ents.append(en)
    if packed:  # [1, C] back to [B, T], zeros elsewhere
        def unpack(flat: torch.Tensor) -> torch.Tensor:
            return flat.new_zeros(comp.shape).masked_scatter(comp, flat)

        logp = unpack(torch.cat(logps, dim=1))
        ent = unpack(torch.cat(ents, dim=1)) if return_entropy else None
        return TokenLogprobs(logp, ent)
    mask = attention_mask[:, P:].bool()  # [B, T]
    logp = torch.cat(logps, dim=1).masked_fill(~mask, 0.0)  # [B, T]
    ent = torch.cat(ents, dim=1).masked_fill(~mask, 0.0) if return_entropy else None
    return TokenLogprobs(logp, ent)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # HF passes them packed rows as varlen cu_seqlens


@torch.no_grad()
def packing_problem(model: torch.nn.Module) -> str | None:
    """Why the padding-free packed path (`token_logprobs(packed=True)`) should not run on ``model``; None = it
    should. Two reasons: the attention implementation has no variable-length kernel (sdpa / eager attend over a
    dense [L, L] block-diagonal mask: exact, but more attention compute than padding saves; flex_attention would
    recompile for every packed length), or the probe fails:
    two short rows packed must give the second row the hidden states it has alone (a model whose attention
    ignores the packed position ids would let it attend to the first). The probe is the same on every rank (a
    ZeRO-3 forward gathers parameters collectively)."""
    hf_model = _decoder_and_head(model)[0]
    impl = getattr(hf_model.config, "_attn_implementation", None)
    if impl == "flex_attention":
        return ("flex_attention is compiled for one sequence length at a time (transformers compiles it with "
                "dynamic=False), so packed micro-batches of ragged lengths would recompile it every step; set "
                f"model.attn_implementation to one of {', '.join(VARLEN_ATTENTION)}")
    if impl not in VARLEN_ATTENTION:
        return (f"the {impl} attention has no variable-length kernel (a packed row would attend over a dense "
                f"block-diagonal mask: exact, but slower than padding); set model.attn_implementation to one of "
                f"{', '.join(VARLEN_ATTENTION)}")
    return packing_probe(model)


@torch.no_grad()
def packing_probe(model: torch.nn.Module) -> str | None:
    """None if two rows packed into one sequence keep apart (the second row's hidden states equal its own
    forward's), else what differed."""
    hf_model, decoder, _ = _decoder_and_head(model)
    device = next(hf_model.parameters()).device
    vocab = hf_model.config.vocab_size
    a = torch.arange(3, device=device).view(1, -1) % vocab + 1  # [1, 3]
    b = torch.arange(3, 8, device=device).view(1, -1) % vocab + 1  # [1, 5]
    was_training = hf_model.training
    hf_model.eval()
    try:
        alone = decoder(input_ids=b, use_cache=False).last_hidden_state.float()  # [1, 5, H]
        pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]], device=device)
        packed = decoder(input_ids=torch.cat([a, b], 1), position_ids=pos, attention_mask=None,
                         use_cache=False).last_hidden_state.float()[:, 3:]
    finally:
        hf_model.train(was_training)
    err = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    tol = 1e-4 if next(hf_model.parameters()).dtype == torch.float32 else 2e-2  # bf16 / fp16: rounding
    if not err <= tol:
        return (f"the packing probe failed: a packed row's hidden states differ from its own forward by {err:.2g} "
                f"(relative; tolerance {tol:g}), so this model's attention does not keep packed rows apart")
    return None


@torch.no_grad()
def token_logprobs_batched(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [N, P + T]
    attention_mask: torch.Tensor,  # [N, P + T]
    prompt_len: int,
    *,
    micro_batch_size: int = 0,
    micro_batches: list[torch.Tensor] | None = None,
    temperature: float = 1.0,
    chunk_size: int = 128,
    return_entropy: bool = False,
    top_p: float = 1.0,
    top_k: int = 0,
    packed: bool = False,
) -> TokenLogprobs:
    """`token_logprobs` without autograd, `micro_batch_size` rows at a time (old / reference log-probs), or over
    the given ``micro_batches`` (row indices each, e.g. token-budget ones).

    Each micro-batch is trimmed to its longest completion before the forward pass (short batches
    cost less); the result is padded back to [N, T] with zeros.
    """
    was_training = model.training
    model.eval()  # no dropout for old / ref log-probs
    try:
        N, L = input_ids.shape
        T = L - prompt_len
        logp = torch.zeros((N, T), dtype=torch.float32, device=input_ids.device)
        ent = torch.zeros_like(logp) if return_entropy else None
        comp_len = attention_mask[:, prompt_len:].sum(1)  # [N]
        if micro_batches is None:
            if micro_batch_size < 1:
                raise ValueError("give micro_batch_size >= 1 or micro_batches")
            micro_batches = [slice(s, min(s + micro_batch_size, N)) for s in range(0, N, micro_batch_size)]
        for rows in micro_batches:
            t = max(int(comp_len[rows].max()), 1)
            out = token_logprobs(
                model,
                input_ids[rows, : prompt_len + t],
                attention_mask[rows, : prompt_len + t],
                prompt_len,
                temperature=temperature,
                chunk_size=chunk_size,
                return_entropy=return_entropy,
                top_p=top_p,
                top_k=top_k,
                packed=packed,
            )
            logp[rows, :t] = out.logprobs
            if ent is not None:
                ent[rows, :t] = out.entropy
        return TokenLogprobs(logp, ent)
    finally:
        model.train(was_training)
