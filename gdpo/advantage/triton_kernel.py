"""Fused Triton kernels for the advantage estimators: at most two launches.

Launch 1 (``_group_kernel``): each program loads a tile of BLOCK_P groups x G rollouts x K rewards once, computes
per-group per-reward count / mean / sample std (NaN-aware, constant groups -> 0), the z-scores, the weighted sum
(or the weighted sum first, then its group z-score, for GRPO), writes x [N], and writes its partial batch moments
(valid rows, sum x, sum x^2) and a count of +-inf inputs into one row of ``partials`` [num_programs, 4].

Launch 2 (``_batchnorm_kernel``, only with batch normalisation): each program reduces the partials (a few KB, read
from L2) in a fixed order, so the result is deterministic, then normalises its chunk of x in place. Launch 1 marks
rows whose rewards are all NaN with a NaN in x, so launch 2 reads only x, never the rewards again. A distributed
caller sums the partials itself, all-reduces them, and passes the global moments instead (``moments=``).

Numerics: loads are upcast to float32, statistics in float32 within a group (two passes over registers: mean, then
squared deviations), batch moments accumulated in float64 across programs. x is group-centred, so its batch mean
is ~0 and sum / sum-of-squares loses nothing.

Set TRITON_INTERPRET=1 before this module is imported to run the kernels on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdpo.advantage.core import AdvantageSpec, Moments

# elements of the [BLOCK_P, G_PAD, K_PAD] tile a program holds in registers
_TILE_ELEMS = 2048
_BN_BLOCK = 4096  # x elements normalised per program in launch 2
_PARTIAL_BLOCK = 1024  # partial rows reduced per iteration in launch 2


@triton.jit
def _group_kernel(
    r_ptr,  # [N, K] rewards, row-major, any float dtype
    w_ptr,  # [K] float32 weights
    x_ptr,  # [N] float32 out: advantage before batch norm
    part_ptr,  # [num_programs, 4] float64 out: (valid rows, sum x, sum x^2, inf count)
    num_groups,
    G: tl.constexpr,
    K: tl.constexpr,
    G_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SUM_FIRST: tl.constexpr,  # True: GRPO (sum then normalise); False: GDPO (normalise then sum)
    USE_STD: tl.constexpr,
    MARK_INVALID: tl.constexpr,  # write NaN on all-NaN rows so launch 2 can zero them without re-reading rewards
    eps,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    g = tl.arange(0, G_PAD)  # [GP]
    k = tl.arange(0, K_PAD)  # [KP]
    row = p[:, None] * G + g[None, :]  # [BP, GP]
    row_in = (p[:, None] < num_groups) & (g[None, :] < G)  # [BP, GP]
    inb = row_in[:, :, None] & (k[None, None, :] < K)  # [BP, GP, KP]
    r = tl.load(r_ptr + row[:, :, None] * K + k[None, None, :], mask=inb, other=float("nan")).to(tl.float32)
    valid = r == r  # NaN != NaN; padding was loaded as NaN
    n_inf = tl.sum(tl.sum(tl.sum(((r == float("inf")) | (r == float("-inf"))).to(tl.float32), 2), 1), 0)
    w = tl.load(w_ptr + k, mask=k < K, other=0.0)  # [KP]
    row_valid = tl.max(valid.to(tl.int32), 2) > 0  # [BP, GP]

    if SUM_FIRST:
        # s = sum_k w_k r_k over applicable rewards, then centre/scale s within each group
        s = tl.sum(tl.where(valid, r, 0.0) * w[None, None, :], 2)  # [BP, GP]
        cnt = tl.sum(row_valid.to(tl.float32), 1)  # [BP]
        mean = tl.sum(tl.where(row_valid, s, 0.0), 1) / tl.maximum(cnt, 1.0)  # [BP]
        d = tl.where(row_valid, s - mean[:, None], 0.0)  # [BP, GP]
        vmax = tl.max(tl.where(row_valid, s, -float("inf")), 1)
        vmin = tl.min(tl.where(row_valid, s, float("inf")), 1)
        d = tl.where((vmax == vmin)[:, None], 0.0, d)
        if USE_STD:
            var = tl.sum(d * d, 1) / tl.maximum(cnt - 1.0, 1.0)  # [BP]
            d = tl.where(d == 0.0, 0.0, d / (tl.sqrt(var) + eps)[:, None])  # 0/0 with eps = 0 stays 0
        x = d
    else:
        # z-score every reward within its group, then the weighted sum over rewards
        cnt = tl.sum(valid.to(tl.float32), 1)  # [BP, KP]
        mean = tl.sum(tl.where(valid, r, 0.0), 1) / tl.maximum(cnt, 1.0)  # [BP, KP]
        d = tl.where(valid, r - mean[:, None, :], 0.0)  # [BP, GP, KP]
        vmax = tl.max(tl.where(valid, r, -float("inf")), 1)  # [BP, KP]
        vmin = tl.min(tl.where(valid, r, float("inf")), 1)
        d = tl.where((vmax == vmin)[:, None, :], 0.0, d)
        if USE_STD:
            var = tl.sum(d * d, 1) / tl.maximum(cnt - 1.0, 1.0)  # [BP, KP]
            d = tl.where(d == 0.0, 0.0, d / (tl.sqrt(var) + eps)[:, None, :])
        x = tl.sum(d * w[None, None, :], 2)  # [BP, GP]

    x = tl.where(row_valid, x, 0.0)
    if MARK_INVALID:
        tl.store(x_ptr + row, tl.where(row_valid, x, float("nan")), mask=row_in)
    else:
        tl.store(x_ptr + row, x, mask=row_in)
    xs = x.to(tl.float64)
    n_ok = tl.sum(tl.sum(row_valid.to(tl.float64), 1), 0)
    s1 = tl.sum(tl.sum(xs, 1), 0)
    s2 = tl.sum(tl.sum(xs * xs, 1), 0)
    tl.store(part_ptr + pid * 4 + 0, n_ok)
    tl.store(part_ptr + pid * 4 + 1, s1)
    tl.store(part_ptr + pid * 4 + 2, s2)
    tl.store(part_ptr + pid * 4 + 3, n_inf.to(tl.float64))


@triton.jit
def _batchnorm_kernel(
    x_ptr,  # [N] float32, normalised in place; NaN marks rows whose rewards were all NaN
    part_ptr,  # [num_partials, 4] float64 (or [1, 4] global moments)
    num_partials,
    N,
    BLOCK: tl.constexpr,
    PBLOCK: tl.constexpr,
    eps,
):
    # 1) global moments: every program reduces the same partials in the same order (deterministic)
    acc_n = tl.zeros([PBLOCK], dtype=tl.float64)
    acc_s = tl.zeros([PBLOCK], dtype=tl.float64)
    acc_q = tl.zeros([PBLOCK], dtype=tl.float64)
    for start in range(0, num_partials, PBLOCK):
        i = start + tl.arange(0, PBLOCK)
        m = i < num_partials
        acc_n += tl.load(part_ptr + i * 4 + 0, mask=m, other=0.0)
        acc_s += tl.load(part_ptr + i * 4 + 1, mask=m, other=0.0)
        acc_q += tl.load(part_ptr + i * 4 + 2, mask=m, other=0.0)
    cnt = tl.sum(acc_n, 0)
    tot = tl.sum(acc_s, 0)
    tsq = tl.sum(acc_q, 0)
    mean = tot / tl.maximum(cnt, 1.0)
    var = (tsq - tot * mean) / tl.maximum(cnt - 1.0, 1.0)
    std = tl.sqrt(tl.maximum(var, 0.0))
    inv = 1.0 / tl.maximum(std + eps, 1e-300)  # eps = 0 and a constant batch: x - mean = 0, stays 0
    # 2) normalise this program's chunk; rows with every reward NaN stay 0
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [B]
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    y = ((x.to(tl.float64) - mean) * inv).to(tl.float32)
    tl.store(x_ptr + offs, tl.where(x == x, y, 0.0), mask=m)


def triton_group_stage(
    rewards: torch.Tensor, group_size: int, weights: torch.Tensor, spec: AdvantageSpec, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1. rewards [N, K] -> (x [N] float32, partials [num_programs, 4] float64).

    With ``spec.batch_norm`` x holds NaN on all-NaN rows, for launch 2 to zero; otherwise 0 there.
    """
    r = rewards.contiguous()
    n, k = r.shape
    num_groups = n // group_size
    g_pad, k_pad = triton.next_power_of_2(group_size), triton.next_power_of_2(k)
    block_p = max(1, min(triton.next_power_of_2(num_groups), _TILE_ELEMS // (g_pad * k_pad)))
    grid = triton.cdiv(num_groups, block_p)
    x = torch.empty(n, dtype=torch.float32, device=r.device)
    partials = torch.empty(grid, 4, dtype=torch.float64, device=r.device)
    _group_kernel[(grid,)](
        r, weights.to(device=r.device, dtype=torch.float32).contiguous(), x, partials, num_groups,
        G=group_size, K=k, G_PAD=g_pad, K_PAD=k_pad, BLOCK_P=block_p,
        SUM_FIRST=spec.aggregate == "sum_then_normalize", USE_STD=spec.group_std,
        MARK_INVALID=spec.batch_norm, eps=float(eps),
    )  # fmt: skip
    return x, partials


def triton_batch_norm(x: torch.Tensor, partials_or_moments: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch 2: normalise x in place with the moments in ``partials_or_moments`` [M, 4] (summed over M rows)."""
    n = x.numel()
    p = partials_or_moments.contiguous()
    _batchnorm_kernel[(triton.cdiv(n, _BN_BLOCK),)](
        x, p, p.shape[0], n, BLOCK=_BN_BLOCK, PBLOCK=min(_PARTIAL_BLOCK, triton.next_power_of_2(p.shape[0])),
        eps=float(eps),
    )  # fmt: skip
    return x


def partials_to_moments(partials: torch.Tensor) -> Moments:
    """Sum the per-program partials: the local moments a distributed caller all-reduces."""
    s = partials.sum(0)
    return Moments(s[0], s[1], s[2])
