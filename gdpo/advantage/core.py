"""Advantage estimators for several rewards: pure functions of tensors.

Notation: N rollouts = P prompts x G rollouts per prompt (each prompt's rollouts contiguous), K rewards.

Four presets sit on three orthogonal switches:

    preset        aggregate            group_std  batch_norm
    grpo          sum_then_normalize   True       False
    grpo_no_std   sum_then_normalize   False      False
    gdpo          normalize_then_sum   True       True
    dler          sum_then_normalize   False      True     (DLER, arXiv 2510.15110: REINFORCE++'s baseline)

- ``sum_then_normalize`` (GRPO): s = sum_k w_k r_k, then centre (and with ``group_std`` scale) s within its group.
- ``normalize_then_sum`` (GDPO): centre (and scale) each reward within its group, then x = sum_k w_k z_k.
- ``batch_norm``: one more z-score of x over all valid rows of the batch: (x - mean) / (std + eps).

A fourth switch, independent of the preset: the group baseline (``baseline``).
- ``mean``: x_i - mean of the group (every valid rollout, i included).
- ``leave_one_out`` (RLOO): x_i - mean of the *other* n - 1 valid rollouts of the group
  = n / (n - 1) (x_i - mean), n = the group's valid count for that reward (per reward under GDPO). With
  ``group_std`` that deviation is divided by the group's sample std + eps, as with ``mean``. The NaN and
  constant-group rules are unchanged (a group with one valid entry is constant: 0).
  Where every group has the same valid count n this is the mean baseline times n / (n - 1): a constant factor
  (an effective learning-rate change) that a batch normalisation removes entirely. It differs in kind only where
  "does not apply" (NaN) leaves groups with different counts.

GFPO (arXiv 2508.09726) filters before all this: ``gfpo_select`` keeps ``keep`` of each group's rollouts, and the
estimator then runs on the retained rows with ``group_size = keep``.

Conventions, deliberate and tested:
- std is the sample (unbiased, n - 1) std, as in the GDPO paper (and TRL's ``nanstd``).
- A group in which a reward is constant gives exactly 0 for that reward (not the rounding noise of x - mean(x)).
- NaN means "this reward does not apply to this rollout": excluded from that group's statistics, contributes 0.
  A rollout for which *every* reward is NaN carries no signal: advantage 0, and it is left out of the batch
  statistics (TRL does the same).
- eps is added to the std (not inside the sqrt). Default 1e-4 as in TRL and the GDPO reference code.

The batch normalisation is split into ``batch_moments`` and ``batch_normalize`` so that a distributed caller can
all-reduce the moments between the two; nothing here communicates.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

ESTIMATORS = ("grpo", "grpo_no_std", "gdpo", "dler")
BASELINES = ("mean", "leave_one_out")
GFPO_METRICS = ("length", "efficiency")
AGGREGATES = ("sum_then_normalize", "normalize_then_sum")
BACKENDS = ("auto", "torch", "triton")

# preset -> (aggregate, group_std, batch_norm)
PRESETS: dict[str, tuple[str, bool, bool]] = {
    "grpo": ("sum_then_normalize", True, False),
    "grpo_no_std": ("sum_then_normalize", False, False),
    "gdpo": ("normalize_then_sum", True, True),
    "dler": ("sum_then_normalize", False, True),
}


class AdvantageSpec(NamedTuple):
    """The three switches after a preset and explicit overrides are merged."""

    aggregate: str
    group_std: bool
    batch_norm: bool


def resolve_spec(
    estimator: str = "gdpo",
    *,
    aggregate: str | None = None,
    group_std: bool | None = None,
    batch_norm: bool | None = None,
) -> AdvantageSpec:
    """Start from the preset, then apply every switch that is not None.

    >>> resolve_spec("gdpo", group_std=False)
    AdvantageSpec(aggregate='normalize_then_sum', group_std=False, batch_norm=True)
    """
    if estimator not in PRESETS:
        raise ValueError(f"estimator={estimator!r} is not one of {list(ESTIMATORS)}")
    agg, std, bn = PRESETS[estimator]
    if aggregate is not None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={aggregate!r} is not one of {list(AGGREGATES)}")
        agg = aggregate
    return AdvantageSpec(
        agg, std if group_std is None else bool(group_std), bn if batch_norm is None else bool(batch_norm)
    )


def check_inputs(
    rewards: torch.Tensor, group_size: int, weights: Sequence[float] | torch.Tensor | None, *, check_inf: bool = True
) -> torch.Tensor:
    """Validate shapes and values; return the weights as a float32 tensor [K] on the rewards' device."""
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [N, K], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [N, K], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got dtype {rewards.dtype}")
    n, k = rewards.shape
    if k == 0:
        raise ValueError("rewards has K = 0 columns: at least one reward is needed")
    if n == 0:
        raise ValueError("rewards has N = 0 rows")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group of one has no baseline), got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(f"N = {n} rows is not divisible by group_size = {group_size}")
    if weights is None:
        w = torch.ones(k, dtype=torch.float32, device=rewards.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32, device=rewards.device).flatten()
        if w.numel() != k:
            raise ValueError(f"len(weights) = {w.numel()} but rewards has K = {k} columns")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights must be finite, got {w.tolist()}")
    if check_inf and torch.isinf(rewards).any():
        col = torch.isinf(rewards).any(0).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain +-inf (columns {col}); use NaN for 'does not apply'")
    return w


def check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is not one of {list(BASELINES)}")


def group_zscore(
    values: torch.Tensor, valid: torch.Tensor, *, use_std: bool, eps: float, leave_one_out: bool = False
) -> torch.Tensor:
    """Centre (and scale) values within each group over the valid entries.

    values: [P, G, K]; valid: [P, G, K] bool. Returns [P, G, K], 0 where invalid or the group is constant.
    leave_one_out: centre on the mean of the other valid entries instead (x - mean scaled by n / (n - 1)).
    """
    if bool(valid.all()):  # the common case, no NaN: plain reductions, no masking
        d = values - values.mean(1, keepdim=True)  # [P, G, K]
        vmin, vmax = torch.aminmax(values, dim=1, keepdim=True)  # [P, 1, K]
        cnt = values.shape[1]
        var = (d * d).sum(1, keepdim=True) / (cnt - 1) if use_std else None  # [P, 1, K]
    else:
        vz = torch.where(valid, values, torch.zeros_like(values))  # [P, G, K]
        cnt = valid.sum(1, keepdim=True).to(values.dtype)  # [P, 1, K]
        mean = vz.sum(1, keepdim=True) / cnt.clamp(min=1)  # [P, 1, K]
        d = torch.where(valid, values - mean, torch.zeros_like(values))  # [P, G, K]
        big = torch.finfo(values.dtype).max
        vmax = torch.where(valid, values, torch.full_like(values, -big)).amax(1, keepdim=True)  # [P, 1, K]
        vmin = torch.where(valid, values, torch.full_like(values, big)).amin(1, keepdim=True)  # [P, 1, K]
        var = (d * d).sum(1, keepdim=True) / (cnt - 1).clamp(min=1) if use_std else None  # sample variance
    if leave_one_out:  # x_i - (sum - x_i) / (n - 1) = n / (n - 1) (x_i - mean); n = 1 is a constant group below
        d = d * (cnt / (cnt - 1).clamp(min=1) if isinstance(cnt, torch.Tensor) else cnt / (cnt - 1))
    # exact zero for constant groups: x - mean(x) would otherwise leave rounding noise that eps amplifies
    d = d.masked_fill(vmax == vmin, 0.0)
    if not use_std:
        return d
    return torch.where(d == 0, d, d / (var.sqrt() + eps))  # 0/0 with eps = 0 stays 0


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    weights: torch.Tensor,
    *,
    aggregate: str,
    group_std: bool,
    eps: float,
    dtype: torch.dtype = torch.float32,
    baseline: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group stage of every estimator (torch, vectorised over groups).

    rewards: [N, K] (NaN = does not apply); weights: [K]. Returns (x [N] in ``dtype``, row_valid [N] bool):
    x is the advantage before any batch normalisation, 0 on rows where every reward is NaN.
    """
    check_baseline(baseline)
    loo = baseline == "leave_one_out"
    n, k = rewards.shape
    r = rewards.to(dtype).view(n // group_size, group_size, k)  # [P, G, K]
    w = weights.to(dtype)  # [K]
    valid = ~torch.isnan(r)  # [P, G, K]
    row_valid = valid.any(-1)  # [P, G]
    if aggregate == "sum_then_normalize":
        s = (torch.where(valid, r, torch.zeros_like(r)) * w).sum(-1, keepdim=True)  # [P, G, 1]
        x = group_zscore(s, row_valid.unsqueeze(-1), use_std=group_std, eps=eps, leave_one_out=loo).squeeze(-1)
    elif aggregate == "normalize_then_sum":
        z = group_zscore(r, valid, use_std=group_std, eps=eps, leave_one_out=loo)  # [P, G, K]
        x = (z * w).sum(-1)  # [P, G]
    else:
        raise ValueError(f"aggregate={aggregate!r} is not one of {list(AGGREGATES)}")
    x = torch.where(row_valid, x, torch.zeros_like(x))
    return x.reshape(n), row_valid.reshape(n)


class Moments(NamedTuple):
    """Sufficient statistics of x over valid rows, in float64; sum them across ranks to get global moments."""

    count: torch.Tensor  # [] float64
    total: torch.Tensor  # [] float64
    total_sq: torch.Tensor  # [] float64

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.count, self.total, self.total_sq])  # [3]

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Moments":
        return cls(t[0], t[1], t[2])


def batch_moments(x: torch.Tensor, row_valid: torch.Tensor) -> Moments:
    """x: [N]; row_valid: [N] bool. Sums in float64 (x is group-centred, so sum/sum-of-squares is stable)."""
    xv = torch.where(row_valid, x, torch.zeros_like(x)).double()  # [N]
    return Moments(row_valid.sum().double(), xv.sum(), (xv * xv).sum())


def moments_mean_std(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample std from moments; std is 0 with fewer than two rows."""
    cnt = m.count.clamp(min=1)
    mean = m.total / cnt
    var = (m.total_sq - m.total * mean) / (m.count - 1).clamp(min=1)
    return mean, var.clamp(min=0).sqrt()


def batch_normalize(x: torch.Tensor, row_valid: torch.Tensor, moments: Moments, *, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) with the given (possibly all-reduced) moments; 0 on invalid rows. [N] -> [N]."""
    mean, std = (float(v) for v in moments_mean_std(moments))  # scalars: x keeps its dtype, no float64 copy
    d = x - mean
    a = d / (std + eps) if std + eps > 0 else torch.zeros_like(d)  # eps = 0 and a constant batch: all 0
    return a.masked_fill(~row_valid, 0.0)


def reference_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "gdpo",
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-4,
    batch_norm: bool | None = None,
    *,
    aggregate: str | None = None,
    group_std: bool | None = None,
    baseline: str = "mean",
) -> torch.Tensor:
    """The same maths in float64, written for clarity: the yardstick every fast path is tested against."""
    spec = resolve_spec(estimator, aggregate=aggregate, group_std=group_std, batch_norm=batch_norm)
    w = check_inputs(rewards, group_size, weights).double()
    x, ok = group_advantages(
        rewards, group_size, w, aggregate=spec.aggregate, group_std=spec.group_std, eps=eps, dtype=torch.float64,
        baseline=baseline,
    )
    if spec.batch_norm:
        x = batch_normalize(x, ok, batch_moments(x, ok), eps=eps)
    return x


def torch_advantages(
    rewards: torch.Tensor,
    group_size: int,
    weights: torch.Tensor,
    spec: AdvantageSpec,
    eps: float,
    baseline: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 torch path: (x [N], row_valid [N]) after the group stage, before batch normalisation."""
    return group_advantages(
        rewards, group_size, weights, aggregate=spec.aggregate, group_std=spec.group_std, eps=eps, baseline=baseline
    )


def gfpo_select(
    rewards: torch.Tensor,  # [N, K], NaN = does not apply
    lengths: torch.Tensor,  # [N] completion lengths in tokens
    group_size: int,  # G' (rollouts sampled per prompt)
    keep: int,  # k (rollouts kept per prompt)
    metric: str = "length",
    weights: Sequence[float] | torch.Tensor | None = None,  # [K], default all 1
) -> torch.Tensor:
    """GFPO's filter: the rows [P * keep] (int64, ascending within each group, groups in order) to train on.

    metric ``length``: the ``keep`` shortest completions of each group. metric ``efficiency``: the ``keep``
    highest reward / length, where reward = sum_k w_k r_k (the same weighted sum as GRPO's; NaN counts 0) and
    length is clamped to >= 1 (the paper's ratio as it stands: with negative rewards a longer completion scores
    higher). Ties go to the lower row index (a stable sort), so the result is deterministic.
    The caller then indexes rewards / rollouts with the result and computes advantages with
    ``group_size = keep``: the group statistics use the retained rows only.

    >>> r = torch.tensor([[1.], [0.], [1.], [1.], [0.], [1.], [1.], [0.]])
    >>> gfpo_select(r, torch.tensor([5, 3, 3, 9, 2, 8, 4, 4]), 4, 2).tolist()  # shortest two; tie 3 = 3 -> 1, 2
    [1, 2, 4, 6]
    >>> gfpo_select(r, torch.tensor([5, 3, 3, 9, 2, 8, 4, 4]), 4, 2, "efficiency").tolist()  # 1/3 > 1/5 > 0
    [0, 2, 5, 6]
    """
    w = check_inputs(rewards, group_size, weights)
    if metric not in GFPO_METRICS:
        raise ValueError(f"metric={metric!r} is not one of {list(GFPO_METRICS)}")
    if not isinstance(keep, int) or isinstance(keep, bool) or not 2 <= keep <= group_size:
        raise ValueError(f"keep must be an int in [2, group_size = {group_size}], got {keep!r}")
    n = rewards.shape[0]
    lengths = torch.as_tensor(lengths, device=rewards.device).flatten()
    if lengths.numel() != n:
        raise ValueError(f"{lengths.numel()} lengths for {n} rewards rows")
    p = n // group_size
    lens = lengths.to(torch.float64).view(p, group_size)  # [P, G]
    if metric == "length":
        key = lens  # ascending: shortest first
    else:
        r = rewards.to(torch.float64)
        total = (torch.where(torch.isnan(r), torch.zeros_like(r), r) * w.double()).sum(-1)  # [N]
        key = -(total.view(p, group_size) / lens.clamp(min=1.0))  # ascending on -efficiency: most efficient first
    order = torch.sort(key, dim=1, stable=True).indices[:, :keep]  # [P, keep]
    order = torch.sort(order, dim=1).values  # keep each group's rollouts in their original order
    offsets = torch.arange(p, device=rewards.device).unsqueeze(1) * group_size  # [P, 1]
    return (order + offsets).reshape(-1)
