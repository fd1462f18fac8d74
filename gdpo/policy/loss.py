"""GRPO/GDPO policy loss: PPO clipped surrogate (clip-higher) or CISPO / SAPO, token- or sequence-level importance
ratios (GSPO), optional k3 KL to a reference, 3 aggregations, optional masking of truncated rows (DAPO).

Importance ratio of token t of row i (m = completion mask, lp = log-prob under the current / old policy):

    importance_level="token"     r_it = exp(lp_it - old_it)
    importance_level="sequence"  r_it = s_i = exp(sum_t m_it (lp_it - old_it) / sum_t m_it)      (GSPO)

The sequence ratio is the geometric mean of the row's token ratios; it is differentiated as it stands, so every
token of the row receives gradient through s_i (d s_i / d lp_it = s_i / |y_i|).

Per token (A = the row's advantage):

    objective="clip"   pg_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)                  (PPO / GRPO / GSPO)
    objective="cispo"  pg_t = -sg(min(r, cispo_eps_max)) A lp_t                                  (CISPO, MiniMax-M1)
    objective="sapo"   pg_t = -f(r) A,  f(r) = sigmoid(tau (r - 1)) 4 / tau,                     (SAPO)
                       tau = sapo_tau_pos where A > 0, sapo_tau_neg elsewhere
    (each x is_weight_t if given: e.g. the truncated IS weight for the engine / trainer log-prob gap)

    kl_t = exp(ref - lp) - (ref - lp) - 1                                                       (k3: unbiased, >= 0)
    l_t  = pg_t + beta * kl_t

sg = stop-gradient: CISPO's gradient is -min(r, eps_max) A d lp, never zero, however far r moves. SAPO's gate
is a soft clip: d f / d r = 4 sigmoid'(tau (r - 1)) is 1 at r = 1 and decays smoothly on both sides. With
sequence-level ratios r_it = s_i in every formula (GSPO's per-row -min(s_i A_i, clip(s_i) A_i)).

Aggregation over the masked tokens of the batch (mask m, B rows):
    token_mean               sum_bt l m / sum_bt m           (DAPO: every token weighs the same)
    seq_mean_token_mean      mean_b [sum_t l m / sum_t m]    (GRPO paper, GSPO: every sequence weighs the same)
    seq_mean_token_sum_norm  sum_bt l m / (B * max_len)      (Dr. GRPO: constant denominator, no length bias)

truncated [B] bool (DAPO's overlong filtering): those rows' mask is set to 0, so they add nothing to the loss
(policy term and KL), to any token count, or to the stats; under seq_mean_token_mean they still count in B (as in
TRL's ``mask_truncated_completions``). A caller passing ``num_tokens`` counts only the kept rows' tokens.

A pure function: no communication, no config. Gradient accumulation across micro-batches / ranks
is the caller's business (`num_tokens` lets token_mean divide by the whole minibatch's token count).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")
OBJECTIVES = ("clip", "cispo", "sapo")


class LossStats(NamedTuple):
    """Detached 0-dim tensors (call .item() when logging; all_reduce-able as they are)."""

    loss: torch.Tensor  # the aggregated total loss
    policy_loss: torch.Tensor  # the aggregated policy-gradient part (pg_t above)
    kl: torch.Tensor  # the aggregated k3 KL to the reference (before beta); 0 without a reference
    approx_kl: torch.Tensor  # token mean of k3(old || current): how far the update has moved the policy
    clip_frac_low: (
        torch.Tensor
    )  # token fraction with A < 0 and r < 1 - eps_low (gradient cut by the low clip); 0 for cispo / sapo
    clip_frac_high: (
        torch.Tensor
    )  # clip: token fraction with A > 0 and r > 1 + eps_high; cispo: with r > cispo_eps_max (weight capped); sapo: 0
    ratio_mean: torch.Tensor  # token mean of r (the sequence ratio s_i on every token of row i when sequence-level)
    num_tokens: torch.Tensor  # masked tokens in this call (after dropping truncated rows)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def aggregate(
    values: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] float
    aggregation: str,
    *,
    max_len: int | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar with one of AGGREGATIONS (see the module docstring)."""
    masked = values * mask  # [B, T]
    if aggregation == "token_mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
        return masked.sum() / denom.clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.mean()
    if aggregation == "seq_mean_token_sum_norm":
        L = values.shape[1] if max_len is None else max_len
        return masked.sum() / (values.shape[0] * L)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def _check_options(aggregation: str, importance_level: str, objective: str, cispo_eps_max: float,
                   sapo_tau_pos: float, sapo_tau_neg: float, kl_without_ref: bool) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_level {importance_level!r}; expected one of {IMPORTANCE_LEVELS}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if objective == "cispo" and not cispo_eps_max > 0:
        raise ValueError(f"cispo_eps_max must be > 0, got {cispo_eps_max}")
    if objective == "sapo" and not (sapo_tau_pos > 0 and sapo_tau_neg > 0):
        raise ValueError(f"sapo taus must be > 0, got {sapo_tau_pos}, {sapo_tau_neg}")
    if kl_without_ref:
        raise ValueError("beta != 0 needs ref_logps")


def _surrogate(ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor, objective: str, *, eps_low: float,
               eps_high: float, cispo_eps_max: float, sapo_tau_pos: float, sapo_tau_neg: float) -> torch.Tensor:
    """The per-token (or per-row) policy-gradient term: ratio [B, T] or [B, 1], adv [B, 1], logps [B, T]."""
    if objective == "clip":
        surr = ratio * adv
        surr_clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
        return -torch.minimum(surr, surr_clipped)  # [B, T] or [B, 1]
    if objective == "cispo":
        return -torch.clamp(ratio, max=cispo_eps_max).detach() * adv * logps  # [B, T]
    tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos), torch.full_like(adv, sapo_tau_neg))  # [B, 1]
    return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv  # sapo: [B, T] or [B, 1]


@torch.no_grad()
def _loss_stats(loss, pg, kl, ratio, logps, old_logps, adv, mask, aggregation: str, objective: str, *,
                eps_low: float, eps_high: float, cispo_eps_max: float, max_len, num_tokens) -> LossStats:
    """The detached statistics of one policy_loss call (shapes as there)."""
    n = mask.sum().clamp(min=1.0)
    tok_mean = lambda x: (x * mask).sum() / n  # noqa: E731
    r = ratio.detach().expand_as(logps)  # [B, T]
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if objective == "clip":
        clip_low = tok_mean(((r < 1.0 - eps_low) & (adv < 0)).to(mask.dtype))
        clip_high = tok_mean(((r > 1.0 + eps_high) & (adv > 0)).to(mask.dtype))
    elif objective == "cispo":
        clip_low, clip_high = zero, tok_mean((r > cispo_eps_max).to(mask.dtype))
    else:
        clip_low, clip_high = zero, zero
    return LossStats(
        loss=loss.detach(),
        policy_loss=aggregate(pg, mask, aggregation, max_len=max_len, num_tokens=num_tokens).detach(),
        kl=(
            zero
            if kl is None
            else aggregate(kl, mask, aggregation, max_len=max_len, num_tokens=num_tokens).detach()
        ),
        approx_kl=tok_mean(k3_kl(old_logps.detach(), logps.detach())),
        clip_frac_low=clip_low,
        clip_frac_high=clip_high,
        ratio_mean=tok_mean(r),
        num_tokens=mask.sum().detach(),
    )


def policy_loss(
    logps: torch.Tensor,  # [B, T] current policy, with grad
    old_logps: torch.Tensor,  # [B, T] policy that sampled (before this update)
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] 1 on completion tokens
    *,
    eps_low: float,
    eps_high: float,
    aggregation: str,
    ref_logps: torch.Tensor | None = None,  # [B, T]
    beta: float = 0.0,
    max_len: int | None = None,
    is_weights: torch.Tensor | None = None,  # [B, T] importance weights (e.g. truncated IS for vLLM sampling)
    num_tokens: float | None = None,
    importance_level: str = "token",
    objective: str = "clip",
    cispo_eps_max: float = 5.0,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    truncated: torch.Tensor | None = None,  # [B] bool: rows that hit the length limit without EOS
) -> tuple[torch.Tensor, LossStats]:
    """Policy-gradient loss (see the module docstring) with an optional k3 KL penalty; returns (loss, LossStats).

    max_len: the Dr. GRPO denominator (the configured max completion length); default T.
    num_tokens: token_mean denominator override (tokens in the whole minibatch when it is split into
    micro-batches); default mask.sum().
    importance_level: ``token`` | ``sequence`` (GSPO). objective: ``clip`` | ``cispo`` | ``sapo``; eps_low /
    eps_high apply to ``clip`` only, cispo_eps_max to ``cispo``, the taus to ``sapo`` (CISPO's cap 5.0 and SAPO's
    taus 1.0 / 1.05 are TRL's defaults). truncated: rows to drop from the loss (DAPO); None = keep every row.
    The defaults are the token-level clipped surrogate on every row.
    """
    _check_options(aggregation, importance_level, objective, cispo_eps_max, sapo_tau_pos, sapo_tau_neg,
                   beta != 0.0 and ref_logps is None)
    mask = mask.to(logps.dtype)  # [B, T]
    if truncated is not None:
        if truncated.shape != (logps.shape[0],):
            raise ValueError(f"truncated must have shape [B] = [{logps.shape[0]}], got {tuple(truncated.shape)}")
        mask = mask * (~truncated.bool()).to(mask.dtype).unsqueeze(1)  # [B, T]: truncated rows all 0
    adv = advantages.to(logps.dtype).unsqueeze(1)  # [B, 1]
    log_ratio = logps - old_logps.detach()  # [B, T]
    if importance_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
    ratio = torch.exp(log_ratio)  # [B, T] token-level, [B, 1] sequence-level
    pg = _surrogate(ratio, adv, logps, objective, eps_low=eps_low, eps_high=eps_high, cispo_eps_max=cispo_eps_max,
                    sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg).expand_as(logps)  # [B, T]
    if is_weights is not None:
        pg = pg * is_weights.detach()
    per_token = pg
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps.detach())  # [B, T]
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len=max_len, num_tokens=num_tokens)

    stats = _loss_stats(loss, pg, kl, ratio, logps, old_logps, adv, mask, aggregation, objective, eps_low=eps_low,
                        eps_high=eps_high, cispo_eps_max=cispo_eps_max, max_len=max_len, num_tokens=num_tokens)
    return loss, stats
