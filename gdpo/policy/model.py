"""Loading the policy / reference model and computing per-token log-probs of completions.

Sequence layout (the one `RolloutBatch.input_ids()` produces): every row is
`[left-padded prompt (P) | right-padded completion (T)]`, so completion token t of every row sits at
column P + t and is predicted by the hidden state at column P + t - 1.

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


def _chunk_logprobs(
    head: torch.nn.Module,  # the LM head, called as a module so ZeRO-3 hooks gather its weight
    hidden: torch.Tensor,  # [B, c, H]
    targets: torch.Tensor,  # [B, c]
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()  # [B, c, V]
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [B, c]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [B, c]
    if with_entropy:
        # H = lse - sum_v p_v * logit_v
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [B, c]
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


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, P + T]
    attention_mask: torch.Tensor,  # [B, P + T]
    prompt_len: int,  # P
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Per-token log-probs [B, T] of the completion tokens (columns P..P+T-1), computed chunk-wise over T.

    `temperature` divides the logits, matching the distribution the rollout sampled from.
    Position ids follow the attention mask (left padding does not shift positions), as in `generate`.
    Works under autograd (training) and under no_grad (old / reference log-probs).
    """
    hf_model, decoder, head = _decoder_and_head(model)
    softcap = getattr(hf_model.config, "final_logit_softcapping", None)
    P = prompt_len
    T = input_ids.shape[1] - P
    if T < 1:
        raise ValueError(f"no completion tokens: input width {input_ids.shape[1]} <= prompt_len {P}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P + T]
    hidden = _completion_hidden(hf_model, decoder, input_ids, attention_mask, position_ids, P)  # [B, T, H]
    targets = input_ids[:, P:]  # [B, T]
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for s in range(0, T, chunk_size):
        args = (head, hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size])
        if use_ckpt:
            lp, en = checkpoint(
                _chunk_logprobs, *args, temperature, softcap, return_entropy, use_reentrant=False
            )
        else:
            lp, en = _chunk_logprobs(*args, temperature, softcap, return_entropy)
        logps.append(lp)
        ents.append(en)
    mask = attention_mask[:, P:].bool()  # [B, T]
    logp = torch.cat(logps, dim=1).masked_fill(~mask, 0.0)  # [B, T]
    ent = torch.cat(ents, dim=1).masked_fill(~mask, 0.0) if return_entropy else None
    return TokenLogprobs(logp, ent)


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
            )
            logp[rows, :t] = out.logprobs
            if ent is not None:
                ent[rows, :t] = out.entropy
        return TokenLogprobs(logp, ent)
    finally:
        model.train(was_training)
