"""update_policy (epochs x minibatches x micro-batches through the DeepSpeed engine) against plain torch AdamW."""

import dataclasses

import pytest
import torch

from gdpo.distributed import build_engine
from gdpo.plan import plan_batches
from gdpo.policy.loss import policy_loss
from gdpo.policy.model import token_logprobs
from gdpo.testing import tiny_model, tiny_tokenizer
from gdpo.update import TrainTensors, frozen_logprobs, update_policy

N, P, T, LR, CLIP = 8, 4, 6, 1e-3, 1.0


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (N, P + T), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])
    cmask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    attn = torch.cat([torch.ones(N, P, dtype=torch.long), cmask.long()], 1)
    attn[[1, 4], 0] = 0  # left padding
    adv = torch.randn(N, generator=g)
    return TrainTensors(ids, attn, cmask, P, None), adv


@pytest.mark.parametrize("budget", [0, 18])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_update_policy_equals_plain_torch_adamw(aggregation, budget):
    """2 epochs x 2 minibatches of 4 rows in micro-batches of 2 (or token-budget micro-batches of at most 18
    tokens: 1-3 rows each, a varying number): 4 AdamW steps, each on the minibatch's summed gradient (token_mean
    over the minibatch's tokens), clipped; the same shuffled minibatches in both."""
    tok = tiny_tokenizer()
    x, adv = _batch()
    plan = plan_batches(prompts_per_step=4, group_size=2, world_size=1, minibatch_size=4,
                        micro_batch_size=0 if budget else 2, epochs=2, max_tokens_per_micro_batch=budget)
    assert plan.updates_per_step == 4
    engine = build_engine(tiny_model(tokenizer=tok, seed=0), lr=LR, total_steps=4, grad_clip=CLIP,
                          micro_batch_size=2, grad_accum_steps=2)
    kwargs = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, beta=0.0, max_len=T)
    frozen = frozen_logprobs(engine.module, None, x, need_old=True, plan=plan, temperature=1.0,
                             chunk_size=4)
    torch.manual_seed(123)
    stats = update_policy(engine, x, adv, frozen, plan, loss_kwargs=kwargs, temperature=1.0, chunk_size=4)

    ref = tiny_model(tokenizer=tok, seed=0).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    with torch.no_grad():
        old = token_logprobs(ref, x.input_ids, x.attention_mask, P).logprobs
    torch.testing.assert_close(old, frozen.old, atol=1e-6, rtol=0)
    torch.manual_seed(123)
    norms, ref_loss = [], 0.0
    for _ in range(2):
        order = torch.randperm(N)
        for s in (0, 4):
            mb = order[s : s + 4]
            lp = token_logprobs(ref, x.input_ids[mb], x.attention_mask[mb], P).logprobs
            loss, _ = policy_loss(lp, old[mb], adv[mb], x.completion_mask[mb], **kwargs)
            loss.backward()
            ref_loss += loss.item()
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
            opt.step()
            opt.zero_grad()
    assert len(stats.grad_norms) == 4
    assert stats.micro_batches == 8 if not budget else stats.micro_batches > 8  # 10 rows of 5..10 tokens
    assert stats.grad_norms == pytest.approx(norms, rel=1e-4)
    assert stats.means["loss"] == pytest.approx(ref_loss / 4, rel=1e-4)  # the minibatch losses, averaged
    assert stats.lr == pytest.approx(LR)
    init = dict(tiny_model(tokenizer=tok, seed=0).named_parameters())
    moved = 0.0
    for name, p in engine.module.named_parameters():
        q = dict(ref.named_parameters())[name]
        # k bias: softmax-invariant, its gradient is rounding noise that Adam scales to +-lr; with token-budget
        # micro-batches the summation order differs more, and Adam's 1/sqrt(v) scales near-zero gradients' noise
        # up (the gradients themselves agree to 1e-6: test_token_budget_gradients_equal_fixed_micro_batches)
        tol = 2 * 4 * LR if name.endswith("k_proj.bias") else (2e-5 if budget else 2e-6)
        assert (p.detach() - q.detach()).abs().max().item() < tol, name
        moved = max(moved, (p.detach() - init[name].detach()).abs().max().item())
    assert moved > 0.5 * LR  # the steps really moved the weights
    assert set(stats.means) >= {"loss", "policy_loss", "clip_frac_low", "clip_frac_high", "entropy"}
    assert "logprob_gap" not in stats.means  # no sampling log-probs: nothing to compare


def test_one_update_reuses_the_current_forward_and_reports_the_sampling_gap():
    tok = tiny_tokenizer()
    x, adv = _batch()
    x.sampling_logprobs = torch.full((N, T), -3.0) * x.completion_mask
    plan = plan_batches(prompts_per_step=4, group_size=2, world_size=1)
    assert plan.reuse_current_logprobs
    engine = build_engine(tiny_model(tokenizer=tok, seed=0), lr=LR, total_steps=1, grad_clip=CLIP,
                          micro_batch_size=N, grad_accum_steps=1)
    frozen = frozen_logprobs(engine.module, None, x, need_old=False, plan=plan, temperature=1.0,
                             chunk_size=4)
    assert frozen.old is None and frozen.ref is None
    with torch.no_grad():
        cur = token_logprobs(engine.module.eval(), x.input_ids, x.attention_mask, P).logprobs
    gap = ((cur + 3.0).abs() * x.completion_mask).sum() / x.completion_mask.sum()
    kwargs = dict(eps_low=0.2, eps_high=0.2, aggregation="token_mean", beta=0.0, max_len=T)
    stats = update_policy(engine, x, adv, frozen, plan, loss_kwargs=kwargs, temperature=1.0, chunk_size=4)
    assert stats.means["ratio_mean"] == pytest.approx(1.0)  # old == current, detached
    assert stats.means["logprob_gap"] == pytest.approx(gap.item(), rel=1e-5)
    assert len(stats.grad_norms) == 1 and stats.grad_norms[0] > 0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_token_budget_gradients_equal_fixed_micro_batches(aggregation):
    """The gradient each optimizer step receives: token-budget micro-batches (sorted, trimmed, varying in number)
    == fixed micro-batches of 2 == one micro-batch per minibatch, to 1e-6 (fp32, no clipping); and the same with
    padding-free (packed) micro-batches, fixed or token-budget ones."""
    tok = tiny_tokenizer()
    x, adv = _batch()
    grads = {}
    micros = {}
    # packed_*: padding-free micro-batches (loss.packing; sdpa's block-diagonal mask on CPU), fixed or 18 real tokens
    for name, micro, budget, packed in (("whole", 0, 0, False), ("fixed", 2, 0, False), ("budget", 0, 18, False),
                                        ("packed_fixed", 2, 0, True), ("packed_budget", 0, 18, True)):
        plan = plan_batches(prompts_per_step=4, group_size=2, world_size=1, minibatch_size=4, micro_batch_size=micro,
                            epochs=1, max_tokens_per_micro_batch=budget)
        plan = dataclasses.replace(plan, packed=packed)
        engine = build_engine(tiny_model(tokenizer=tok, seed=0), lr=LR, total_steps=2, grad_clip=0.0,
                              micro_batch_size=plan.micro_batch_rows, grad_accum_steps=plan.grad_accum)
        seen = []
        step = engine.optimizer.step

        def capture(*a, _step=step, _seen=seen, _engine=engine, **k):
            _seen.append([p.grad.detach().clone() for p in _engine.module.parameters()])
            return _step(*a, **k)

        engine.optimizer.step = capture
        frozen = frozen_logprobs(engine.module, None, x, need_old=True, plan=plan, temperature=1.0, chunk_size=4)
        kwargs = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, beta=0.0, max_len=T)
        torch.manual_seed(0)
        st = update_policy(engine, x, adv, frozen, plan, loss_kwargs=kwargs, temperature=1.0, chunk_size=4)
        assert len(seen) == 2
        grads[name], micros[name] = seen, st.micro_batches
    for other in ("fixed", "budget", "packed_fixed", "packed_budget"):
        for a, b in zip(grads["whole"], grads[other]):
            for ga, gb in zip(a, b):
                torch.testing.assert_close(gb, ga, atol=1e-6, rtol=1e-5)
    # 18 real tokens hold more rows than 18 padded ones: fewer micro-batches (rows of 5..10 tokens)
    assert micros["packed_budget"] < micros["budget"] and micros["packed_fixed"] == micros["fixed"] == 4
    assert max(g.abs().max().item() for g in grads["whole"][0]) > 1e-3  # there is a gradient to compare
