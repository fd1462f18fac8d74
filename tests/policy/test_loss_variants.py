"""policy_loss variants: GSPO (sequence-level ratios), CISPO, SAPO, DAPO's truncated-row masking.

Three kinds of checks: small cases worked out by hand, a float64 loop reference of every formula (loss value and
analytic gradient, written independently of the vectorised code), and parity with TRL 1.16's own
``GRPOTrainer._compute_loss`` run on a stub trainer that feeds it our tensors (loss value and gradient).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gdpo.policy.loss import policy_loss


def _leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _one_row(objective, importance_level, logps, old, adv, aggregation="seq_mean_token_mean", **kw):
    lp = _leaf([logps])
    mask = torch.ones_like(lp)
    loss, st = policy_loss(
        lp, torch.tensor([old], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64), mask,
        eps_low=0.2, eps_high=0.2, aggregation=aggregation, importance_level=importance_level,
        objective=objective, **kw,
    )
    loss.backward()
    return loss.item(), lp.grad[0].tolist(), st


# ------------------------------------------------------------------------------------------- hand-checked cases


def test_gspo_by_hand_clipped_and_unclipped():
    # log ratios 0.1 and 0.3: s = exp(0.2) = 1.221403; clip at 1.2
    lp, old = [-1.0, -2.0], [-1.1, -2.3]
    s = math.exp(0.2)
    # A = +1: min(s, 1.2) = 1.2 is the clipped branch: loss -1.2, no gradient
    loss, grad, st = _one_row("clip", "sequence", lp, old, 1.0)
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert grad == pytest.approx([0.0, 0.0], abs=1e-12)
    assert st.clip_frac_high.item() == 1.0 and st.ratio_mean.item() == pytest.approx(s)
    # A = -1: -min(-s, -1.2) = s; d s / d lp_t = s / 2 on both tokens of the row
    loss, grad, st = _one_row("clip", "sequence", lp, old, -1.0)
    assert loss == pytest.approx(s, abs=1e-12)
    assert grad == pytest.approx([s / 2, s / 2], abs=1e-12)
    assert st.clip_frac_high.item() == 0.0 and st.clip_frac_low.item() == 0.0
    # token level differs: token ratios exp(0.1) = 1.105 (inside) and exp(0.3) = 1.35 (clipped for A > 0)
    loss, grad, _ = _one_row("clip", "token", lp, old, 1.0)
    assert loss == pytest.approx(-(math.exp(0.1) + 1.2) / 2, abs=1e-12)
    assert grad == pytest.approx([-math.exp(0.1) / 2, 0.0], abs=1e-12)


def test_cispo_by_hand_cap_keeps_the_gradient():
    # token 0: r = e^2 = 7.39 capped at 5; token 1: r = 1. A = 1, logps -1 and -3, token_mean over 2 tokens
    loss, grad, st = _one_row("cispo", "token", [-1.0, -3.0], [-3.0, -3.0], 1.0, aggregation="token_mean")
    assert loss == pytest.approx((-5 * 1 * -1.0 + -1 * 1 * -3.0) / 2, abs=1e-12)  # (5 + 3) / 2 = 4
    assert grad == pytest.approx([-5 / 2, -1 / 2], abs=1e-12)  # -sg(min(r, 5)) A: never zero, unlike the clip
    assert st.clip_frac_high.item() == 0.5 and st.clip_frac_low.item() == 0.0
    # a custom cap
    _, grad, _ = _one_row("cispo", "token", [-1.0, -3.0], [-3.0, -3.0], 1.0, aggregation="token_mean",
                          cispo_eps_max=2.0)
    assert grad == pytest.approx([-1.0, -0.5], abs=1e-12)


def test_sapo_by_hand_gate_and_asymmetric_temperatures():
    # r = 1: f = sigmoid(0) 4 / tau = 2 / tau; d f / d lp = 4 sigmoid'(0) r = 1, the same gradient as PPO at r = 1
    loss, grad, st = _one_row("sapo", "token", [-1.0], [-1.0], 1.0)
    assert loss == pytest.approx(-2.0, abs=1e-12) and grad == pytest.approx([-1.0], abs=1e-12)
    assert st.clip_frac_high.item() == 0.0
    loss, grad, _ = _one_row("sapo", "token", [-1.0], [-1.0], -1.0)  # A < 0: tau_neg = 1.05
    assert loss == pytest.approx(2 / 1.05, abs=1e-12) and grad == pytest.approx([1.0], abs=1e-12)
    # r = e^1, A = 1, tau = 1: loss -4 sigmoid(e - 1); gradient -4 sigma (1 - sigma) r
    sig = 1 / (1 + math.exp(-(math.e - 1)))
    loss, grad, _ = _one_row("sapo", "token", [0.0], [-1.0], 1.0)
    assert loss == pytest.approx(-4 * sig, abs=1e-12)
    assert grad == pytest.approx([-4 * sig * (1 - sig) * math.e], abs=1e-12)
    # custom tau_pos = 2: f(1) = 2 / 2 = 1
    loss, _, _ = _one_row("sapo", "token", [-1.0], [-1.0], 1.0, sapo_tau_pos=2.0)
    assert loss == pytest.approx(-1.0, abs=1e-12)


def test_mask_truncated_drops_the_row_entirely():
    lp = _leaf([[-1.0, -2.0], [-0.5, -0.7], [-3.0, -1.0]])
    old = lp.detach() - 0.05
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref = lp.detach() + 0.3
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    trunc = torch.tensor([False, True, False])
    kw = dict(eps_low=0.2, eps_high=0.28, aggregation="token_mean", ref_logps=ref, beta=0.1)
    loss, st = policy_loss(lp, old, adv, mask, truncated=trunc, **kw)
    loss.backward()
    keep = [0, 2]
    lp2 = _leaf(lp.detach()[keep].tolist())
    loss2, st2 = policy_loss(lp2, old[keep], adv[keep], mask[keep], ref_logps=ref[keep], **{
        k: v for k, v in kw.items() if k != "ref_logps"})
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-12)
    assert lp.grad[1].abs().max().item() == 0.0  # policy gradient and KL gradient both gone
    torch.testing.assert_close(lp.grad[keep], lp2.grad)
    assert st.num_tokens.item() == 4 and st.kl.item() == pytest.approx(st2.kl.item())
    # under seq_mean_token_mean the dropped row still counts in B (TRL's mask_truncated_completions does the same)
    lp3 = lp.detach().clone().requires_grad_(True)
    l3, _ = policy_loss(lp3, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="seq_mean_token_mean",
                        truncated=trunc)
    l4, _ = policy_loss(lp3.detach()[keep], old[keep], adv[keep], mask[keep], eps_low=0.2, eps_high=0.28,
                        aggregation="seq_mean_token_mean")
    assert l3.item() == pytest.approx(l4.item() * 2 / 3, abs=1e-12)
    # without truncated nothing is dropped
    l5, st5 = policy_loss(lp.detach(), old, adv, mask, **kw)
    assert st5.num_tokens.item() == 5 and l5.item() != pytest.approx(loss.item())


def test_defaults_are_the_token_clip_objective():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    old = lp + 0.2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    a, sa = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="token_mean")
    b, sb = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="token_mean",
                        importance_level="token", objective="clip", truncated=torch.zeros(3, dtype=torch.bool))
    assert a.item() == b.item() and sa == sb


def test_bad_variant_arguments():
    lp = torch.zeros(2, 3)
    base = dict(eps_low=0.2, eps_high=0.2, aggregation="token_mean")
    args = (lp, lp, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="importance_level"):
        policy_loss(*args, importance_level="seq", **base)
    with pytest.raises(ValueError, match="objective"):
        policy_loss(*args, objective="ppo", **base)
    with pytest.raises(ValueError, match="cispo_eps_max"):
        policy_loss(*args, objective="cispo", cispo_eps_max=0.0, **base)
    with pytest.raises(ValueError, match="tau"):
        policy_loss(*args, objective="sapo", sapo_tau_neg=-1.0, **base)
    with pytest.raises(ValueError, match="truncated"):
        policy_loss(*args, truncated=torch.zeros(3, dtype=torch.bool), **base)


# ------------------------------------------------------------------------------------------- float64 loop reference


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_loss(lp, old, adv, mask, *, objective, level, aggregation, eps_low, eps_high, cap, tau_pos, tau_neg,
                   max_len, truncated):
    """Python floats, row by row: (loss, d loss / d lp) with the gradient derived by hand for each formula."""
    B, T = len(lp), len(lp[0])
    m = [[0.0 if truncated[i] else mask[i][t] for t in range(T)] for i in range(B)]
    n_row = [sum(m[i]) for i in range(B)]
    n_all = sum(n_row)
    terms = [[0.0] * T for _ in range(B)]  # per-token loss
    dterm = [[0.0] * T for _ in range(B)]  # d per-token loss / d lp of the same token (token level)
    dseq = [0.0] * B  # d (any token's loss) / d s_i (sequence level)
    ratio = [[0.0] * T for _ in range(B)]
    for i in range(B):
        A = adv[i]
        s = math.exp(sum(m[i][t] * (lp[i][t] - old[i][t]) for t in range(T)) / max(n_row[i], 1.0))
        for t in range(T):
            r = s if level == "sequence" else math.exp(lp[i][t] - old[i][t])
            ratio[i][t] = r
            if objective == "clip":
                rc = min(max(r, 1 - eps_low), 1 + eps_high)
                unclipped = r * A <= rc * A
                terms[i][t] = -min(r * A, rc * A)
                d_dr = -A if unclipped else 0.0
            elif objective == "cispo":
                terms[i][t] = -min(r, cap) * A * lp[i][t]
                d_dr = 0.0
                dterm[i][t] = -min(r, cap) * A  # the stop-gradient weight times d lp / d lp
            else:
                tau = tau_pos if A > 0 else tau_neg
                sg = _sigmoid(tau * (r - 1))
                terms[i][t] = -sg * 4 / tau * A
                d_dr = -4 * sg * (1 - sg) * A
            if objective != "cispo":
                if level == "token":
                    dterm[i][t] = d_dr * r  # d r / d lp = r
                else:
                    dseq[i] = d_dr  # the same for every token of the row
    # aggregation weight of each token's loss
    if aggregation == "token_mean":
        wt = [[m[i][t] / max(n_all, 1.0) for t in range(T)] for i in range(B)]
    elif aggregation == "seq_mean_token_mean":
        wt = [[m[i][t] / max(n_row[i], 1.0) / B for t in range(T)] for i in range(B)]
    else:
        wt = [[m[i][t] / (B * max_len) for t in range(T)] for i in range(B)]
    loss = sum(wt[i][t] * terms[i][t] for i in range(B) for t in range(T))
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            grad[i][t] += wt[i][t] * dterm[i][t]
            if level == "sequence" and objective != "cispo":
                # every token's loss depends on s_i; d s_i / d lp_u = s_i m_u / n_i
                w_row = sum(wt[i])
                grad[i][t] += w_row * dseq[i] * ratio[i][t] * m[i][t] / max(n_row[i], 1.0)
    return loss, grad


def _batch(seed, B=6, T=7, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(torch.float64)
    trunc = torch.rand(B, generator=g) < 0.3
    return lp, old, adv, mask, trunc


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_loop(objective, level, aggregation, seed):
    lp, old, adv, mask, trunc = _batch(seed, scale=0.3 if level == "token" else 1.0)
    kw = dict(eps_low=0.2, eps_high=0.28, cap=1.5, tau_pos=1.0, tau_neg=1.05, max_len=9)
    for use_trunc in (False, True):
        t = trunc if use_trunc else torch.zeros_like(trunc)
        want, want_grad = reference_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                         objective=objective, level=level, aggregation=aggregation,
                                         truncated=t.tolist(), **kw)
        x = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, adv, mask, eps_low=kw["eps_low"], eps_high=kw["eps_high"],
                              aggregation=aggregation, importance_level=level, objective=objective,
                              cispo_eps_max=kw["cap"], sapo_tau_pos=kw["tau_pos"], sapo_tau_neg=kw["tau_neg"],
                              max_len=kw["max_len"], truncated=t if use_trunc else None)
        loss.backward()
        assert loss.item() == pytest.approx(want, abs=1e-12)
        torch.testing.assert_close(x.grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-12, rtol=0)


def test_reference_exercises_both_clip_branches():
    """The random batches above really contain clipped and unclipped tokens / sequences (else they prove little)."""
    lp, old, adv, mask, _ = _batch(0, scale=0.3)
    _, st = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token_mean")
    assert 0 < st.clip_frac_low.item() + st.clip_frac_high.item() < 0.8
    lp, old, adv, mask, _ = _batch(0, scale=1.0)
    _, st = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token_mean",
                        importance_level="sequence")
    assert 0 < st.clip_frac_low.item() + st.clip_frac_high.item() < 0.9
    _, st = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token_mean",
                        objective="cispo", cispo_eps_max=1.5)
    assert 0 < st.clip_frac_high.item() < 0.5


# ------------------------------------------------------------------------------------------- TRL 1.16 parity

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


def trl_loss(loss_type, level, logps, old, adv, mask, *, eps_low, eps_high, beta=0.0, ref=None,
             max_completion_length=None, tau_pos=1.0, tau_neg=1.05):
    """TRL's own GRPOTrainer._compute_loss on a stub trainer whose log-prob forward returns `logps`."""
    B, T = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, loss_type=loss_type, beta=beta,
        epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
                             use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                    sync_gradients=True),
        max_completion_length=max_completion_length or T, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)


CASES = {
    # name: (TRL loss_type, TRL level, our kwargs)
    "gspo": ("grpo", "sequence", dict(importance_level="sequence", aggregation="seq_mean_token_mean",
                                      eps_low=3e-4, eps_high=4e-4)),
    "cispo": ("cispo", "token", dict(objective="cispo", aggregation="token_mean", cispo_eps_max=5.0)),
    "sapo": ("sapo", "token", dict(objective="sapo", aggregation="seq_mean_token_mean")),
    "sapo_seq": ("sapo", "sequence", dict(objective="sapo", importance_level="sequence",
                                          aggregation="seq_mean_token_mean")),
    "dapo": ("dapo", "token", dict(aggregation="token_mean", eps_low=0.2, eps_high=0.28)),
    "dr_grpo": ("dr_grpo", "token", dict(aggregation="seq_mean_token_sum_norm", eps_low=0.2, eps_high=0.2)),
    "grpo": ("grpo", "token", dict(aggregation="seq_mean_token_mean", eps_low=0.2, eps_high=0.2)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_equals_trl_compute_loss(name, beta, mask_truncated):
    loss_type, level, ours = CASES[name]
    eps_low, eps_high = ours.get("eps_low", 0.2), ours.get("eps_high", 0.2)
    g = torch.Generator().manual_seed(7)
    B, T, max_len = 8, 6, 10
    lp = -torch.rand(B, T, generator=g) * 2
    spread = 1.5e-3 if name == "gspo" else 0.4  # GSPO's eps are ~1e-4: ratios near 1 hit both sides of the clip
    if name == "cispo":
        spread = 2.0  # ratios above the cap of 5
    old = lp + spread * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).float()
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    trunc = torch.tensor([False, True, False, False, True, False, False, False])

    x_trl = lp.clone().requires_grad_(True)
    # TRL masks truncated completions where it builds the batch (completion_mask * ~is_truncated)
    trl_mask = mask * (~trunc).float().unsqueeze(1) if mask_truncated else mask
    theirs = trl_loss(loss_type, level, x_trl, old, adv, trl_mask, eps_low=eps_low,
                      eps_high=ours.get("cispo_eps_max", eps_high), beta=beta, ref=ref if beta else None,
                      max_completion_length=max_len)
    theirs.backward()

    x = lp.clone().requires_grad_(True)
    kw = {k: v for k, v in ours.items() if k not in ("eps_low", "eps_high")}
    loss, st = policy_loss(x, old, adv, mask, eps_low=eps_low, eps_high=eps_high, beta=beta,
                           ref_logps=ref if beta else None, max_len=max_len,
                           truncated=trunc if mask_truncated else None, **kw)
    loss.backward()
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_trl.grad, rtol=1e-5, atol=1e-7)
    assert x.grad.abs().sum() > 0
    if name == "gspo":  # the case is only a test of GSPO's clip if both sides occur
        assert 0 < st.clip_frac_high.item() + st.clip_frac_low.item() < 1
