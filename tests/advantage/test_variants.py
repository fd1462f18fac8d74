"""Advantage variants: leave-one-out baseline (RLOO), the DLER preset, GFPO's selection, DLER's hard truncation.

Hand-computed cases, and an independent float64 loop reference (plain Python, one group and one reward at a
time) for every switch combination with the new baseline.
"""

import math

import pytest
import torch

from gdpo.advantage import compute_advantages, gfpo_select, reference_advantages, resolve_spec, triton_available
from gdpo.rewards import truncate_rewards

NAN = float("nan")


def _adv(r, g, estimator, **kw):
    return compute_advantages(torch.tensor(r), g, estimator, eps=0.0, backend="torch", **kw).tolist()


# ------------------------------------------------------------------------------------------- hand-checked cases


def test_leave_one_out_by_hand():
    # group [1, 0, 0, 0]: baselines are means of the other three: 0, 1/3, 1/3, 1/3
    got = _adv([[1.0], [0.0], [0.0], [0.0]], 4, "grpo_no_std", baseline="leave_one_out")
    assert got == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3], abs=1e-7)
    # the mean baseline for comparison: 0.75, -0.25 (LOO = G / (G - 1) times it)
    assert _adv([[1.0], [0.0], [0.0], [0.0]], 4, "grpo_no_std") == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # NaN is left out: group [2, NaN, 0, 1] has n = 3; baselines (0+1)/2, -, (2+1)/2, (2+0)/2
    got = _adv([[2.0], [NAN], [0.0], [1.0]], 4, "grpo_no_std", baseline="leave_one_out")
    assert got == pytest.approx([1.5, 0.0, -1.5, 0.0], abs=1e-7)
    # one valid entry: a constant group, 0 (no one to compare with); a constant group: exactly 0
    assert _adv([[NAN], [3.0], [5.0], [5.0]], 2, "grpo_no_std", baseline="leave_one_out") == [0.0, 0.0, 0.0, 0.0]
    # with the group std: deviation n / (n - 1) (x - mean) over the sample std; [1, 0]: (2 * 0.5) / 0.7071
    got = _adv([[1.0], [0.0]], 2, "grpo", baseline="leave_one_out")
    assert got == pytest.approx([math.sqrt(2), -math.sqrt(2)], abs=1e-6)


def test_leave_one_out_is_per_reward_under_gdpo():
    # two rewards, G = 3; reward 0 [1, 0, 0] -> LOO [1, -.5, -.5]; reward 1 [0, 0, 3] -> [-1.5, -1.5, 3]
    r = [[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]
    got = _adv(r, 3, "gdpo", baseline="leave_one_out", group_std=False, batch_norm=False, weights=[1.0, 2.0])
    assert got == pytest.approx([1 - 3.0, -0.5 - 3.0, -0.5 + 6.0], abs=1e-6)
    # summing first (GRPO) is a different quantity: totals [1, 0, 6] -> LOO [1 - 3, 0 - 3.5, 6 - .5]
    got = _adv(r, 3, "grpo_no_std", baseline="leave_one_out", weights=[1.0, 2.0])
    assert got == pytest.approx([-2.0, -3.5, 5.5], abs=1e-6)


def test_dler_preset_by_hand():
    assert resolve_spec("dler") == ("sum_then_normalize", False, True)
    # groups [1, 0] and [1, 1]: centred [.5, -.5, 0, 0]; batch mean 0, sample std sqrt(0.5 / 3)
    got = _adv([[1.0], [0.0], [1.0], [1.0]], 2, "dler")
    s = math.sqrt(0.5 / 3)
    assert got == pytest.approx([0.5 / s, -0.5 / s, 0.0, 0.0], abs=1e-6)
    # no group std: a group with a larger spread keeps its larger advantages (grpo would equalise them)
    got = _adv([[1.0], [0.0], [4.0], [0.0]], 2, "dler")
    assert abs(got[2]) == pytest.approx(4 * abs(got[0]), rel=1e-6)
    # GDPO-style per-reward centring composes: aggregate override
    got = _adv([[1.0, 0.0], [0.0, 2.0]], 2, "dler", aggregate="normalize_then_sum", batch_norm=False)
    assert got == pytest.approx([0.5 - 1.0, -0.5 + 1.0])


def test_baseline_backend_rules():
    r = torch.rand(16, 2)
    with pytest.raises(ValueError, match="baseline"):
        compute_advantages(r, 4, "gdpo", baseline="median")
    with pytest.raises(ValueError, match="mean baseline only"):
        compute_advantages(r, 4, "gdpo", baseline="leave_one_out", backend="triton")
    # auto never sends leave_one_out to the kernel: same values as the torch path, whatever the device
    a = compute_advantages(r, 4, "gdpo", baseline="leave_one_out", backend="auto")
    b = compute_advantages(r, 4, "gdpo", baseline="leave_one_out", backend="torch")
    torch.testing.assert_close(a, b)


@pytest.mark.skipif(not triton_available("cpu"), reason="needs TRITON_INTERPRET=1 (set in conftest)")
def test_dler_through_the_triton_kernel():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(40, 3, generator=g)
    r[torch.rand(40, 3, generator=g) < 0.2] = NAN
    got = compute_advantages(r, 5, "dler", backend="triton")
    ref = reference_advantages(r, 5, "dler")
    assert (got.double() - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- float64 loop reference


def loop_advantages(rewards, g, *, aggregate, group_std, batch_norm, baseline, weights, eps):
    """Python floats, one group and one reward at a time."""
    n, k = len(rewards), len(rewards[0])

    def centre(vals):  # vals: list of float | None (None = does not apply)
        idx = [i for i, v in enumerate(vals) if v is not None]
        out = [0.0] * len(vals)
        if not idx or len({vals[i] for i in idx}) == 1:
            return out
        m = len(idx)
        mean = sum(vals[i] for i in idx) / m
        sd = math.sqrt(sum((vals[i] - mean) ** 2 for i in idx) / (m - 1))
        for i in idx:
            if baseline == "leave_one_out":
                d = vals[i] - (sum(vals[j] for j in idx if j != i) / (m - 1))
            else:
                d = vals[i] - mean
            out[i] = d / (sd + eps) if group_std else d
        return out

    x, valid = [0.0] * n, [False] * n
    for p in range(n // g):
        rows = range(p * g, (p + 1) * g)
        cells = [[None if math.isnan(rewards[i][c]) else rewards[i][c] for c in range(k)] for i in rows]
        ok = [any(v is not None for v in c) for c in cells]
        if aggregate == "sum_then_normalize":
            tot = [sum(weights[c] * (v or 0.0) for c, v in enumerate(cell)) if o else None
                   for cell, o in zip(cells, ok)]
            z = centre(tot)
        else:
            cols = [centre([cell[c] for cell in cells]) for c in range(k)]
            z = [sum(weights[c] * cols[c][j] for c in range(k)) for j in range(g)]
        for j, i in enumerate(rows):
            x[i], valid[i] = (z[j] if ok[j] else 0.0), ok[j]
    if batch_norm:
        v = [x[i] for i in range(n) if valid[i]]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))
        x = [(x[i] - mean) / (sd + eps) if valid[i] else 0.0 for i in range(n)]
    return x


def _rewards(seed, n=48, k=3):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n, k), generator=gen).double() * torch.rand(n, k, generator=gen, dtype=torch.float64)
    r[torch.rand(n, k, generator=gen) < 0.15] = NAN
    r[:6] = 0.5  # a constant group
    r[7] = NAN  # a rollout no reward applies to
    return r


@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "gdpo", "dler"])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("group_std", [None, True, False])
def test_matches_float64_loop(estimator, baseline, group_std):
    r, g, w, eps = _rewards(1), 6, [1.0, 0.5, 2.0], 1e-4
    spec = resolve_spec(estimator, group_std=group_std)
    want = loop_advantages(r.tolist(), g, aggregate=spec.aggregate, group_std=spec.group_std,
                           batch_norm=spec.batch_norm, baseline=baseline, weights=w, eps=eps)
    ref = reference_advantages(r, g, estimator, weights=w, eps=eps, group_std=group_std, baseline=baseline)
    torch.testing.assert_close(ref, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)
    got = compute_advantages(r.float(), g, estimator, weights=w, eps=eps, group_std=group_std, baseline=baseline,
                             backend="torch")
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- GFPO


def test_gfpo_select_by_hand():
    # two prompts, G' = 4, keep 2
    r = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    lens = torch.tensor([5, 3, 3, 9, 2, 8, 4, 4])
    # shortest: group 0 lengths 5 3 3 9 -> rows 1, 2; group 1 lengths 2 8 4 4 -> row 4, then the tie 6 / 7 -> 6
    assert gfpo_select(r, lens, 4, 2, "length").tolist() == [1, 2, 4, 6]
    # efficiency = reward / length: group 0 [.2, 0, .333, .111] -> rows 2, 0; group 1 [0, .125, .25, 0] -> 6, 5
    assert gfpo_select(r, lens, 4, 2, "efficiency").tolist() == [0, 2, 5, 6]
    # keep 3 of 4
    assert gfpo_select(r, lens, 4, 3, "length").tolist() == [0, 1, 2, 4, 6, 7]
    # keep == group size keeps everything
    assert gfpo_select(r, lens, 4, 4).tolist() == list(range(8))


def test_gfpo_efficiency_weights_nan_and_ties():
    # K = 2, weights (1, 3): totals [1 + 0, 0 + 3, nan->0 + 1 * 3, 1] / lengths [1, 2, 3, 1] = [1, 1.5, 1, 1]
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, 1.0], [1.0, 0.0]])
    lens = torch.tensor([1, 2, 3, 1])
    assert gfpo_select(r, lens, 4, 2, "efficiency", weights=[1.0, 3.0]).tolist() == [0, 1]  # 1.5, then the lowest tie
    assert gfpo_select(r, lens, 4, 3, "efficiency", weights=[1.0, 3.0]).tolist() == [0, 1, 2]
    # equal weights: totals [1, 1, 1, 1] / lengths -> rows 0 and 3 (efficiency 1), 1 (0.5)
    assert gfpo_select(r, lens, 4, 3, "efficiency").tolist() == [0, 1, 3]
    # length 0 counts as 1 (no division by zero); all-equal lengths keep the first rows
    assert gfpo_select(r, torch.zeros(4), 4, 2, "length").tolist() == [0, 1]
    assert gfpo_select(r, torch.tensor([0, 5, 5, 5]), 4, 2, "efficiency").tolist() == [0, 1]


def test_gfpo_select_then_advantages_use_the_retained_rows_only():
    g = torch.Generator().manual_seed(2)
    r = torch.rand(24, 2, generator=g)
    lens = torch.randint(1, 50, (24,), generator=g)
    idx = gfpo_select(r, lens, 8, 3, "length")
    assert idx.shape == (9,) and idx.dtype == torch.int64
    for p in range(3):  # each prompt's kept rows are its 3 shortest, and stay in that prompt's block
        block = idx[p * 3 : (p + 1) * 3]
        assert ((block >= p * 8) & (block < (p + 1) * 8)).all()
        assert sorted(lens[block].tolist()) == sorted(lens[p * 8 : (p + 1) * 8].tolist())[:3]
    adv = compute_advantages(r[idx], 3, "gdpo")  # group statistics over the 3 retained rollouts
    torch.testing.assert_close(adv.double(), reference_advantages(r[idx].double(), 3, "gdpo"), atol=1e-5, rtol=0)


def test_gfpo_select_errors():
    r = torch.rand(8, 1)
    with pytest.raises(ValueError, match="keep"):
        gfpo_select(r, torch.ones(8), 4, 1)
    with pytest.raises(ValueError, match="keep"):
        gfpo_select(r, torch.ones(8), 4, 5)
    with pytest.raises(ValueError, match="metric"):
        gfpo_select(r, torch.ones(8), 4, 2, "reward")
    with pytest.raises(ValueError, match="lengths"):
        gfpo_select(r, torch.ones(7), 4, 2)
    with pytest.raises(ValueError, match="divisible"):
        gfpo_select(torch.rand(7, 1), torch.ones(7), 4, 2)


# ------------------------------------------------------------------------------------------- DLER hard truncation


def test_truncate_rewards_then_dler():
    r = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    trunc = torch.tensor([False, True, False, False])
    t = truncate_rewards(r, trunc)
    assert t.tolist() == [[1.0], [0.0], [0.0], [1.0]] and r[1, 0] == 1.0  # a new tensor; input untouched
    # the truncated correct answer now gets a negative advantage instead of 0
    assert _adv(r.tolist(), 2, "dler")[1] == 0.0
    assert _adv(t.tolist(), 2, "dler")[1] < 0
    assert truncate_rewards(r, trunc, value=-1.0)[1, 0] == -1.0
    with pytest.raises(ValueError, match="truncated"):
        truncate_rewards(r, torch.zeros(3, dtype=torch.bool))


def test_advantage_stats_takes_the_baseline():
    """The loop passes the same keyword arguments to compute_advantages and advantage_stats; the reward shares
    follow the leave-one-out deviations (n / (n - 1) per group: with NaN the group sizes differ)."""
    from gdpo.advantage.diagnostics import advantage_stats

    # group 0: reward a [1, 0, 0] (n = 3), b [NaN, 1, 0] (n = 2); group 1 all valid
    r = torch.tensor([[1.0, NAN], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    kw = dict(estimator="gdpo", group_std=False)
    mean_s = advantage_stats(r, compute_advantages(r, 3, **kw), 3, ["a", "b"], **kw)
    loo_s = advantage_stats(r, compute_advantages(r, 3, baseline="leave_one_out", **kw), 3, ["a", "b"],
                            baseline="leave_one_out", **kw)
    # |contrib| sums: mean baseline a: 4/3 + 4/3 = 8/3, b: 1 + 4/3 = 7/3; LOO scales a by 3/2, b by 2 then 3/2
    assert mean_s["adv/a/share"] == pytest.approx((8 / 3) / 5, abs=1e-9)
    assert loo_s["adv/a/share"] == pytest.approx(4 / (4 + 2 + 2), abs=1e-9)


def test_leave_one_out_is_a_rescale_when_group_counts_are_equal():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(32, 2, generator=g, dtype=torch.float64)
    for est in ("grpo_no_std", "grpo"):  # a constant factor G / (G - 1) = 4 / 3
        a = compute_advantages(r, 4, est, eps=0.0, backend="torch", baseline="leave_one_out")
        torch.testing.assert_close(a, compute_advantages(r, 4, est, eps=0.0, backend="torch") * 4 / 3)
    # a batch normalisation removes the factor ...
    torch.testing.assert_close(compute_advantages(r, 4, "gdpo", eps=0.0, backend="torch", baseline="leave_one_out"),
                               compute_advantages(r, 4, "gdpo", eps=0.0, backend="torch"))
    # ... unless NaN leaves groups with different counts (here 3 and 4 valid entries of reward 0)
    r[0, 0] = NAN
    a = compute_advantages(r, 4, "gdpo", eps=0.0, backend="torch", baseline="leave_one_out")
    b = compute_advantages(r, 4, "gdpo", eps=0.0, backend="torch")
    assert (a - b).abs().max() > 1e-3
