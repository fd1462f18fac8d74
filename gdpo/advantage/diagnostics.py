"""Signal-collapse diagnostics: how many different advantage patterns each estimator can express, and per-step
metrics that show whether the rewards still carry signal.

``python -m gdpo.advantage.diagnostics`` prints the table of Figure 3 of the GDPO paper (distinct advantage
groups for binary rewards) for G = 2..12 rollouts and K = 2..6 rewards, and writes a PNG plot.

Counting is exact: a group's pattern is the sorted vector of its G advantages, computed in exact arithmetic
(integers for GRPO, sums of rational multiples of square roots for GDPO), with eps = 0 as in the paper's figure
(with eps > 0, (0,1) and (0,2) would differ in the 5th decimal and the count would measure eps, not the method).
Batch normalisation is left out: it is one affine map for the whole batch and does not change a group's count.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from fractions import Fraction
from functools import lru_cache
from typing import Sequence

import torch

from gdpo.advantage.core import PRESETS, check_baseline, check_inputs, group_zscore, resolve_spec

# Above this many row-multisets a cell is not enumerated exactly (the table shows a sampled lower bound).
DEFAULT_MAX_CONFIGS = 400_000


def _squarefree(n: int) -> tuple[int, int]:
    """n = s^2 * f with f squarefree; returns (s, f)."""
    s, f, p = 1, 1, 2
    while p * p <= n:
        while n % (p * p) == 0:
            n //= p * p
            s *= p
        if n % p == 0:
            n //= p
            f *= p
        p += 1
    return s, f * n


@lru_cache(maxsize=None)
def _binary_z(g: int, m: int) -> tuple[tuple, tuple]:
    """Exact z-scores (sample std, eps 0) of a binary column with m ones among g rollouts, up to the common factor
    sqrt((g-1)/g): returns (value of a one, value of a zero), each as ((radicand, Fraction),) or () for 0."""
    if m in (0, g):
        return (), ()
    s, f = _squarefree(m * (g - m))  # z(1) = sqrt(m(g-m))/m, z(0) = -sqrt(m(g-m))/(g-m)
    return ((f, Fraction(s, m)),), ((f, Fraction(-s, g - m)),)


def _add(a: dict, terms: tuple) -> None:
    for f, c in terms:
        a[f] = a.get(f, 0) + c


def _pattern_gdpo(rows: Sequence[int], g: int, k: int, use_std: bool) -> tuple:
    """Sorted exact advantages of one group; rows are bit masks of the K binary rewards."""
    ones = [sum((r >> j) & 1 for r in rows) for j in range(k)]
    vals = []
    for r in rows:
        acc: dict = {}
        for j in range(k):
            bit = (r >> j) & 1
            if use_std:
                _add(acc, _binary_z(g, ones[j])[0 if bit else 1])
            elif 0 < ones[j] < g:  # centred only: bit - m/g
                _add(acc, ((1, Fraction(bit) - Fraction(ones[j], g)),))
        vals.append(tuple(sorted((f, c) for f, c in acc.items() if c != 0)))
    return tuple(sorted(vals))


def _pattern_sum(totals: Sequence[int], use_std: bool) -> tuple:
    """Sorted GRPO advantages of a group with these reward totals, as an exact canonical form: centring removes
    the shift, and with std any positive scale too (divide by the gcd of the deviations)."""
    lo = min(totals)
    d = sorted(t - lo for t in totals)
    if d[-1] == 0:
        return ()
    if use_std:
        gcd = 0
        for x in d:
            gcd = math.gcd(gcd, x)
        d = [x // gcd for x in d]
    return tuple(d)


def _num_configs(g: int, k: int, estimator: str) -> int:
    agg = resolve_spec(estimator).aggregate
    types = k + 1 if agg == "sum_then_normalize" else 2**k
    return math.comb(types + g - 1, g)


def distinct_advantage_groups(
    group_size: int, num_rewards: int, estimator: str = "gdpo", *, max_configs: int = DEFAULT_MAX_CONFIGS
) -> int:
    """Number of distinct advantage patterns (sorted vectors) a group of ``group_size`` rollouts with
    ``num_rewards`` binary rewards can produce, counting every assignment; a zero-spread group counts as one
    pattern (all zeros). Exact; raises ValueError when the enumeration would exceed ``max_configs``.

    >>> [distinct_advantage_groups(2, 2, e) for e in ("grpo", "grpo_no_std", "gdpo")]
    [2, 3, 3]
    """
    if group_size < 2 or num_rewards < 1:
        raise ValueError(f"need group_size >= 2 and num_rewards >= 1, got {group_size}, {num_rewards}")
    agg, use_std, _ = resolve_spec(estimator)
    n = _num_configs(group_size, num_rewards, estimator)
    if n > max_configs:
        raise ValueError(
            f"G={group_size}, K={num_rewards}, {estimator}: {n} configurations exceed max_configs={max_configs}"
        )
    seen = set()
    if agg == "sum_then_normalize":
        for totals in itertools.combinations_with_replacement(range(num_rewards + 1), group_size):
            seen.add(_pattern_sum(totals, use_std))
    else:
        for rows in itertools.combinations_with_replacement(range(2**num_rewards), group_size):
            seen.add(_pattern_gdpo(rows, group_size, num_rewards, use_std))
    return len(seen)


def sampled_distinct_lower_bound(
    group_size: int, num_rewards: int, estimator: str = "gdpo", *, samples: int = 20_000, seed: int = 0
) -> int:
    """A lower bound on ``distinct_advantage_groups`` from random assignments (for cells too large to enumerate).
    Each column's success rate is drawn uniformly, so skewed and balanced columns both appear."""
    agg, use_std, _ = resolve_spec(estimator)
    rng = random.Random(seed)
    seen = set()
    for _ in range(samples):
        ps = [rng.random() for _ in range(num_rewards)]
        rows = [sum((rng.random() < ps[j]) << j for j in range(num_rewards)) for _ in range(group_size)]
        if agg == "sum_then_normalize":
            seen.add(_pattern_sum([bin(r).count("1") for r in rows], use_std))
        else:
            seen.add(_pattern_gdpo(rows, group_size, num_rewards, use_std))
    return len(seen)


def distinct_table(
    gs: Sequence[int], ks: Sequence[int], estimators: Sequence[str], *, max_configs: int = DEFAULT_MAX_CONFIGS
) -> dict[tuple[str, int, int], tuple[int, bool]]:
    """{(estimator, K, G): (count, exact)}; cells beyond ``max_configs`` hold a sampled lower bound."""
    out = {}
    for est in estimators:
        for k in ks:
            for g in gs:
                if _num_configs(g, k, est) <= max_configs:
                    out[(est, k, g)] = (distinct_advantage_groups(g, k, est, max_configs=max_configs), True)
                else:
                    out[(est, k, g)] = (sampled_distinct_lower_bound(g, k, est), False)
    return out


def format_table(table: dict, gs: Sequence[int], ks: Sequence[int], estimators: Sequence[str]) -> str:
    lines = []
    head = f"{'estimator':<12}{'K':>3} " + "".join(f"{'G=' + str(g):>10}" for g in gs)
    for est in estimators:
        lines.append(head)
        for k in ks:
            cells = []
            for g in gs:
                c, exact = table[(est, k, g)]
                cells.append(f"{c:>10}" if exact else f"{'>=' + str(c):>10}")
            lines.append(f"{est:<12}{k:>3} " + "".join(cells))
        lines.append("")
    lines.append("exact counts; '>=' marks a lower bound from 20,000 random assignments (cell too large to enumerate)")
    return "\n".join(lines)


def plot_table(table: dict, gs, ks, estimators, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 3.2), sharey=True)
    for ax, k in zip(axes, ks):
        for est, style in zip(estimators, ("o-", "s--", "^-")):
            ys = [table[(est, k, g)][0] for g in gs]
            ax.plot(gs, ys, style, label=est, markersize=4)
        ax.set_yscale("log")
        ax.set_title(f"K = {k} binary rewards")
        ax.set_xlabel("rollouts per group G")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("distinct advantage groups")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Per-step metrics


def _distinct_per_group(a: torch.Tensor, group_size: int, rtol: float = 1e-5) -> torch.Tensor:
    """Mean number of distinct values per group. a: [N]. Values closer than rtol * (max |a| + 1) are one."""
    v = a.double().view(-1, group_size).sort(dim=1).values  # [P, G]
    tol = rtol * (a.abs().max().double() + 1.0)
    return (1 + (v.diff(dim=1) > tol).sum(1)).double().mean()


@torch.no_grad()
def advantage_stats(
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    names: Sequence[str],
    *,
    estimator: str = "gdpo",
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-4,
    aggregate: str | None = None,
    group_std: bool | None = None,
    baseline: str = "mean",
) -> dict[str, float]:
    """Per-step diagnostics of one batch, as a flat dict (see `record_advantage_stats` for the keys)."""
    from gdpo.metrics import Metrics

    m = Metrics()
    record_advantage_stats(m, rewards, advantages, group_size, names, estimator=estimator, weights=weights,
                           eps=eps, aggregate=aggregate, group_std=group_std, baseline=baseline)
    return m.reduce()


def _contributions(r: torch.Tensor, valid: torch.Tensor, w: torch.Tensor, spec, eps: float,
                   loo: bool) -> torch.Tensor:
    """[P, G, K] each reward's part of the advantage before batch normalisation (r, valid [P, G, K])."""
    if spec.aggregate == "normalize_then_sum":
        contrib = group_zscore(r, valid, use_std=spec.group_std, eps=eps, leave_one_out=loo) * w  # [P, G, K]
    else:
        rv = torch.where(valid, r, torch.zeros_like(r))
        row_ok = valid.any(-1, keepdim=True)  # [P, G, 1]
        s = (rv * w).sum(-1, keepdim=True)  # [P, G, 1]
        cnt = row_ok.sum(1, keepdim=True).clamp(min=1)
        mean_k = (rv * w * row_ok).sum(1, keepdim=True) / cnt  # [P, 1, K]: the mean of s splits over rewards
        contrib = torch.where(row_ok, rv * w - mean_k, torch.zeros_like(rv))  # [P, G, K]
        if loo:  # the leave-one-out deviation is n / (n - 1) times the mean-centred one
            contrib = contrib * cnt / (cnt - 1).clamp(min=1)
        if spec.group_std:
            d = torch.where(row_ok, s - s.sum(1, keepdim=True) / cnt, torch.zeros_like(s))
            std = ((d * d).sum(1, keepdim=True) / (cnt - 1).clamp(min=1)).sqrt()
            contrib = contrib / (std + eps)
    return contrib


@torch.no_grad()
def record_advantage_stats(
    m,  # gdpo.metrics.Metrics: reduced over ranks by the caller
    rewards: torch.Tensor,  # [N, K], NaN = does not apply
    advantages: torch.Tensor,  # [N] under the configured estimator
    group_size: int,
    names: Sequence[str],
    *,
    estimator: str = "gdpo",
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-4,
    aggregate: str | None = None,
    group_std: bool | None = None,
    baseline: str = "mean",
) -> None:
    """Record the advantage diagnostics of this rank's groups into ``m``; keys prefixed ``adv/``:

    - ``<name>/mean``, ``<name>/std``: the reward over applicable rollouts;
    - ``<name>/zero_spread_frac``: share of groups where the reward is constant (it carries no signal there);
    - ``<name>/share``: share of the total |advantage| contributed by the reward (per-reward decomposition of the
      configured aggregation; batch normalisation rescales all rewards alike and is left out);
    - ``corr/<a>__<b>``: Pearson correlation of two rewards over rollouts where both apply;
    - ``distinct_per_group``, ``distinct_per_group_grpo``: mean number of distinct advantage values per group,
      and ``collapse_ratio`` = GRPO's / the configured one's (< 1: summing first merges what this keeps apart);
    - ``mean``, ``std``, ``abs_mean``, ``zero_frac`` of the advantages.

    Means, stds and correlations are recorded as moments, so over several ranks they are those of the whole batch.
    """
    n, k = rewards.shape
    if len(names) != k:
        raise ValueError(f"len(names) = {len(names)} but rewards has K = {k} columns")
    spec = resolve_spec(estimator, aggregate=aggregate, group_std=group_std)
    check_baseline(baseline)
    loo = baseline == "leave_one_out"
    w = check_inputs(rewards, group_size, weights).double()
    r = rewards.double().view(n // group_size, group_size, k)  # [P, G, K]
    valid = ~torch.isnan(r)
    for j, name in enumerate(names):
        m.mean_of(f"adv/{name}/mean", r[..., j])
        m.std(f"adv/{name}/std", r[..., j])
    # zero spread: a group where the reward takes one value (or applies to fewer than two rollouts)
    big = torch.finfo(torch.float64).max
    vmax = torch.where(valid, r, -big).amax(1)  # [P, K]
    vmin = torch.where(valid, r, big).amin(1)  # [P, K]
    zero = (vmax <= vmin) | (valid.sum(1) < 2)  # [P, K]
    for j, name in enumerate(names):
        m.mean_of(f"adv/{name}/zero_spread_frac", zero[:, j])
    tot = _contributions(r, valid, w, spec, eps, loo).abs().sum((0, 1))  # [K]
    for j, name in enumerate(names):
        m.ratio(f"adv/{name}/share", tot[j].item(), tot.sum().item(), empty=0.0)
    # pairwise correlations over rollouts where both rewards apply
    flat = r.view(n, k)
    for a, b in itertools.combinations(range(k), 2):
        m.corr(f"adv/corr/{names[a]}__{names[b]}", flat[:, a], flat[:, b])
    # collapse: distinct advantage values per group, configured vs GRPO on the same rewards
    from gdpo.advantage import compute_advantages

    grpo = compute_advantages(rewards, group_size, "grpo", weights=w.float(), eps=eps, backend="torch")
    groups = n // group_size
    d_cfg = _distinct_per_group(advantages, group_size).item() * groups
    d_grpo = _distinct_per_group(grpo, group_size).item() * groups
    m.mean("adv/distinct_per_group", d_cfg, groups)
    m.mean("adv/distinct_per_group_grpo", d_grpo, groups)
    m.ratio("adv/collapse_ratio", d_grpo, d_cfg)
    a = advantages.double()
    m.mean_of("adv/mean", a)
    m.std("adv/std", a)
    m.mean_of("adv/abs_mean", a.abs())
    m.mean_of("adv/zero_frac", (a == 0).double())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Distinct advantage groups per estimator (GDPO paper, Figure 3)")
    p.add_argument("--g", type=int, nargs=2, default=(2, 12), metavar=("MIN", "MAX"), help="rollouts per group")
    p.add_argument("--k", type=int, nargs=2, default=(2, 6), metavar=("MIN", "MAX"), help="number of rewards")
    p.add_argument("--max-configs", type=int, default=DEFAULT_MAX_CONFIGS, help="exact enumeration budget per cell")
    p.add_argument("--plot", default="distinct_advantage_groups.png", help="PNG path ('' to skip)")
    args = p.parse_args(argv)
    gs, ks, ests = range(args.g[0], args.g[1] + 1), range(args.k[0], args.k[1] + 1), tuple(PRESETS)
    table = distinct_table(gs, ks, ests, max_configs=args.max_configs)
    print(format_table(table, gs, ks, ests))
    if args.plot:
        plot_table(table, list(gs), list(ks), ests, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
