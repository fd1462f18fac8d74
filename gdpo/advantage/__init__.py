"""Advantages for several rewards: GRPO, GRPO without std, GDPO, DLER and every combination of their switches.

    from gdpo.advantage import compute_advantages
    adv = compute_advantages(rewards, group_size, estimator="gdpo")  # rewards [N, K] -> adv [N] float32

See ``gdpo/advantage/core.py`` for the maths and its conventions.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from gdpo.advantage.core import (
    AGGREGATES,
    BACKENDS,
    BASELINES,
    ESTIMATORS,
    GFPO_METRICS,
    PRESETS,
    AdvantageSpec,
    Moments,
    batch_moments,
    batch_normalize,
    check_baseline,
    check_inputs,
    gfpo_select,
    reference_advantages,
    resolve_spec,
    torch_advantages,
)

__all__ = [
    "AGGREGATES",
    "BACKENDS",
    "BASELINES",
    "ESTIMATORS",
    "GFPO_METRICS",
    "PRESETS",
    "AdvantageSpec",
    "Moments",
    "compute_advantages",
    "gfpo_select",
    "reference_advantages",
    "resolve_spec",
    "triton_available",
]


def triton_available(device: torch.device | str) -> bool:
    """The Triton backend runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "gdpo",
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-4,
    batch_norm: bool | None = None,
    backend: str = "auto",
    *,
    aggregate: str | None = None,
    group_std: bool | None = None,
    reduce_moments: Callable[[torch.Tensor], torch.Tensor] | None = None,
    baseline: str = "mean",
) -> torch.Tensor:
    """Advantages [N] float32 from rewards [N, K] (N = prompts x group_size, each prompt's rollouts contiguous).

    estimator: preset ``grpo`` | ``grpo_no_std`` | ``gdpo`` | ``dler``; ``aggregate``, ``group_std`` and
    ``batch_norm`` override one switch each (None keeps the preset's). weights: [K], default all 1. NaN in rewards
    = "does not apply". backend: ``torch`` | ``triton`` | ``auto`` (triton on CUDA tensors, torch otherwise).
    baseline: ``mean`` | ``leave_one_out`` (RLOO, see core.py). The Triton kernel computes the ``mean`` baseline
    only: ``auto`` then takes the torch path, and an explicit ``backend="triton"`` is refused.

    reduce_moments: for data parallelism, a function that sums a float64 tensor [3] (count, sum x, sum x^2)
    across ranks (e.g. an all-reduce). Only the batch normalisation needs it; the group stage is rank-local
    because every group lives on one rank. None = this process holds the whole batch.

    Paper's worked example (two binary rewards, two rollouts): GRPO gives both groups the same advantages,
    GDPO (before batch normalisation) tells them apart.

    >>> r = torch.tensor([[0., 0.], [0., 1.], [0., 0.], [1., 1.]])
    >>> [round(a, 4) for a in compute_advantages(r, 2, "grpo", eps=0.0).tolist()]  # totals (0,1) and (0,2)
    [-0.7071, 0.7071, -0.7071, 0.7071]
    >>> [round(a, 4) for a in compute_advantages(r, 2, "gdpo", eps=0.0, batch_norm=False).tolist()]
    [-0.7071, 0.7071, -1.4142, 1.4142]
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    spec = resolve_spec(estimator, aggregate=aggregate, group_std=group_std, batch_norm=batch_norm)
    check_baseline(baseline)
    if backend == "triton" and baseline != "mean":
        raise ValueError(f"backend='triton' computes the mean baseline only, not baseline={baseline!r}; "
                         "use backend='torch' or 'auto'")
    use_triton = backend == "triton" or (
        backend == "auto" and baseline == "mean" and rewards.is_cuda and triton_available("cuda")
    )
    if use_triton:
        if not triton_available(rewards.device):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors"
            )
        return _triton(rewards, group_size, weights, spec, eps, reduce_moments)
    w = check_inputs(rewards, group_size, weights)
    x, ok = torch_advantages(rewards, group_size, w, spec, eps, baseline)
    if spec.batch_norm:
        m = batch_moments(x, ok)
        if reduce_moments is not None:
            m = Moments.from_tensor(reduce_moments(m.as_tensor()))
        x = batch_normalize(x, ok, m, eps=eps)
    return x


def _triton(rewards, group_size, weights, spec, eps, reduce_moments) -> torch.Tensor:
    from gdpo.advantage import triton_kernel as tk  # imported late: TRITON_INTERPRET is read at import

    w = check_inputs(rewards, group_size, weights, check_inf=False)  # inf is counted inside the kernel
    x, partials = tk.triton_group_stage(rewards, group_size, w, spec, eps)
    if spec.batch_norm:
        if reduce_moments is None:
            tk.triton_batch_norm(x, partials, eps)
        else:
            local = partials.sum(0)  # [4]
            glob = reduce_moments(local[:3].contiguous())  # [3]
            tk.triton_batch_norm(x, torch.cat([glob, local[3:]]).view(1, 4), eps)
    if partials[:, 3].sum().item() > 0:  # one scalar sync: the +-inf check costs no extra pass over rewards
        col = torch.isinf(rewards).any(0).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain +-inf (columns {col}); use NaN for 'does not apply'")
    return x
