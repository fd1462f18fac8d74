"""Trainer log-probs under top-k / top-p truncation: the same kept set as the sampler, so that with identical
weights the importance ratio exp(trainer - sampling) is 1 (TRL issue #6789), where the full softmax gives the kept
mass S < 1 on every token."""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gdpo.policy.model import sampling_removed, token_logprobs, token_logprobs_batched
from gdpo.rollout import HFRolloutEngine, SamplingParams
from gdpo.testing import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
QUESTIONS = ["hi", "what is 2+2? answer briefly", "x y"]


def _prompts():
    return [
        TOK.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                return_dict=False)
        for q in QUESTIONS
    ]


def _hf_removed(scores, temperature, top_k, top_p):
    procs = LogitsProcessorList()
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p=top_p))
    return torch.isinf(procs(None, scores.clone()))


@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.9), (20, 0.9), (3, 0.5), (0, 0.3)])
def test_kept_set_equals_hf_warpers(top_k, top_p):
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    scores = torch.randn(64, 259, generator=g) * 3
    scores[0, :30] = 5.0  # ties at the k-th score: kept, as HF and vLLM keep them
    scores[1] = 0.0  # a flat row
    got = sampling_removed(scores / 0.7, top_k, top_p)
    want = _hf_removed(scores, 0.7, top_k, top_p)
    assert torch.equal(got, want)
    assert got.any() and not got.all(-1).any()  # something removed, never everything
    # 3-d input (the [B, c, V] chunks) gives the same rows
    assert torch.equal(sampling_removed((scores / 0.7).view(8, 8, 259), top_k, top_p).view(64, 259), got)


def test_no_truncation_is_none_and_keep_forces_the_token_in():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert sampling_removed(s) is None and sampling_removed(s, top_k=4) is None and sampling_removed(s, top_k=9) is None
    assert sampling_removed(s, top_k=1, keep=torch.tensor([3])).tolist() == [[False, True, True, False]]


def test_logprob_value_and_gradient_by_hand():
    """One position, logits (2, 1, 0, -1) at temperature 1, top-k 2: log p(token 1) = 1 - log(e^2 + e^1)."""
    model = tiny_model(tokenizer=TOK, seed=0)
    ids = torch.tensor([_prompts()[0] + [5, 7]])
    attn = torch.ones_like(ids)
    P = len(_prompts()[0])
    full = token_logprobs(model, ids, attn, P).logprobs
    k2 = token_logprobs(model, ids, attn, P, top_k=2).logprobs
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, P - 1 : P + 1].float()  # [2, V]
    for t, tok in enumerate([5, 7]):
        kept = logits[t].topk(2).values
        kept = torch.cat([kept, logits[t, tok : tok + 1]]) if logits[t, tok] < kept[-1] else kept
        want = logits[t, tok] - torch.logsumexp(kept, 0)  # the sampled token is always in the set
        assert k2[0, t].item() == pytest.approx(want.item(), abs=1e-5)
        assert k2[0, t] > full[0, t]  # renormalised over fewer tokens
    # gradient = that of the explicit masked log-softmax
    model.zero_grad()
    token_logprobs(model, ids, attn, P, top_k=20, top_p=0.9).logprobs.sum().backward()
    g1 = model.lm_head.weight.grad.clone()
    model.zero_grad()
    out = model(input_ids=ids).logits[0, P - 1 : P + 1].float()
    rem = sampling_removed(out.detach(), 20, 0.9, keep=torch.tensor([5, 7]))
    torch.log_softmax(out.masked_fill(rem, -float("inf")), -1).gather(-1, torch.tensor([[5], [7]])).sum().backward()
    torch.testing.assert_close(g1, model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0), (20, 0.9)])
@pytest.mark.parametrize("fast", [True, False])
def test_hf_rollout_importance_ratio_is_one(top_k, top_p, fast):
    model = tiny_model(tokenizer=TOK, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # peakier than random init, still broad enough for top-k 20 to cut
    temp = 0.8
    torch.manual_seed(0)
    eng = HFRolloutEngine(model, TOK, SamplingParams(max_new_tokens=12, temperature=temp, top_k=top_k, top_p=top_p,
                                                     return_logprobs=True), fast_decode=fast)
    b = eng.generate(_prompts(), n=4)
    mask = b.completion_mask.bool()
    args = (model, b.input_ids(), b.attention_mask(), b.prompt_len)
    trainer = token_logprobs(*args, temperature=temp, top_k=top_k, top_p=top_p).logprobs
    ratio = torch.exp(trainer - b.sampling_logprobs)[mask]
    print(f"top_k={top_k} top_p={top_p}: max |ratio - 1| = {(ratio - 1).abs().max():.2e}")
    assert (ratio - 1).abs().max() < 1e-5
    # batched (old / reference log-probs) is the same quantity
    batched = token_logprobs_batched(*args, micro_batch_size=5, temperature=temp, top_k=top_k, top_p=top_p).logprobs
    torch.testing.assert_close(batched, trainer.detach(), atol=1e-5, rtol=0)
    # over the full softmax the ratio is the kept mass S < 1: the bias this removes
    full = token_logprobs(*args, temperature=temp).logprobs
    biased = torch.exp(full - b.sampling_logprobs)[mask]
    print(f"full-softmax ratio: mean {biased.mean():.4f}")
    assert (biased <= 1 + 1e-5).all() and biased.mean() < 0.99  # 1000x the tolerance above


@pytest.mark.parametrize("objective,level", [("clip", "sequence"), ("cispo", "token"), ("sapo", "token")])
def test_each_objective_trains_through_truncated_logprobs(objective, level):
    """Rollout -> old log-probs -> two optimizer steps on the tiny model: finite losses, parameters move, and the
    second step sees a ratio != 1 (it is off-policy) while the first sees exactly 1."""
    from gdpo.policy.loss import policy_loss

    model = tiny_model(tokenizer=TOK, seed=5)
    torch.manual_seed(0)
    b = HFRolloutEngine(model, TOK, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9,
                                                   return_logprobs=True)).generate(_prompts(), n=2)
    args = (b.input_ids(), b.attention_mask(), b.prompt_len)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    old = token_logprobs_batched(model, *args, micro_batch_size=6, **kw).logprobs
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    mask = b.completion_mask.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.lm_head.weight.detach().clone()
    model.train()
    ratios = []
    for _ in range(2):
        lp = token_logprobs(model, *args, **kw).logprobs
        loss, st = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean",
                               importance_level=level, objective=objective,
                               truncated=torch.tensor([False, True, False, False, False, False]))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(st.ratio_mean.item())
    assert ratios[0] == pytest.approx(1.0, abs=1e-6) and abs(ratios[1] - 1.0) > 1e-4
    assert not torch.equal(before, model.lm_head.weight)
