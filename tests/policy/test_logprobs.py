"""Chunked per-token log-probs against the naive full log-softmax, plus model loading from local files."""

import pytest
import torch

from gdpo.policy.model import (
    load_causal_lm,
    load_reference_model,
    load_tokenizer,
    token_logprobs,
    token_logprobs_batched,
)
from gdpo.testing import tiny_model, tiny_tokenizer


def _batch(vocab=259, seed=0):
    """Left-padded prompts (P=6) + right-padded completions (T=9), as a RolloutBatch lays them out."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, comp_lens = [6, 2, 4], [9, 3, 1]
    P, T = 6, 9
    ids = torch.randint(0, vocab, (3, P + T), generator=g)
    mask = torch.zeros((3, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens)):
        mask[i, P - p : P + c] = 1
    ids = ids.masked_fill(mask == 0, 256)  # pad id
    return ids, mask, P


def _naive(model, ids, mask, P, temperature=1.0):
    """Full [B, L, V] logits, float64 log-softmax, then the completion columns."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double() / temperature
    logp_all = torch.log_softmax(logits[:, P - 1 : -1], dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = mask[:, P:].bool()
    return logp.masked_fill(~m, 0), ent.masked_fill(~m, 0)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_equals_naive(chunk_size):
    model = tiny_model()
    ids, mask, P = _batch()
    with torch.no_grad():
        out = token_logprobs(model, ids, mask, P, chunk_size=chunk_size, return_entropy=True)
        ref_lp, ref_ent = _naive(model, ids, mask, P)
    assert out.logprobs.shape == (3, 9) and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ref_ent, atol=2e-5, rtol=0)
    assert (out.logprobs[mask[:, P:] == 0] == 0).all()
    assert out.logprobs[mask[:, P:] == 1].lt(0).all()


def test_temperature_scales_logits():
    model = tiny_model()
    ids, mask, P = _batch(seed=1)
    with torch.no_grad():
        lp = token_logprobs(model, ids, mask, P, temperature=0.7, chunk_size=3).logprobs
        ref, _ = _naive(model, ids, mask, P, temperature=0.7)
    torch.testing.assert_close(lp.double(), ref, atol=2e-5, rtol=0)


def test_gradients_equal_naive_and_head_sees_only_chunks():
    ids, mask, P = _batch(seed=2)
    w = torch.randn(3, 9, generator=torch.Generator().manual_seed(3))

    naive_model = tiny_model()
    lp_ref, _ = _naive(naive_model, ids, mask, P)
    (lp_ref.float() * w).sum().backward()

    model = tiny_model()
    seen = []  # [B, c, H] inputs of every LM-head call, forward and checkpoint recomputation
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    lp = token_logprobs(model, ids, mask, P, chunk_size=4).logprobs
    (lp * w).sum().backward()

    for (name, p), p_ref in zip(model.named_parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)
    # Only completion positions, at most 4 at a time: never a [B, P+T, V] logits tensor.
    assert all(s[1] <= 4 for s in seen)
    assert sum(s[1] for s in seen[:3]) == 9  # forward: chunks 4 + 4 + 1 cover T = 9
    assert len(seen) == 6  # each chunk recomputed once in backward (checkpointed head)


def test_batched_no_grad_matches_and_restores_mode():
    model = tiny_model().train()
    ids, mask, P = _batch(seed=4)
    out = token_logprobs_batched(model, ids, mask, P, micro_batch_size=2, return_entropy=True)
    assert model.training
    assert not out.logprobs.requires_grad
    with torch.no_grad():
        ref_lp, ref_ent = _naive(model.eval(), ids, mask, P)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ref_ent, atol=2e-5, rtol=0)


def test_load_from_local_dir(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tokenizer=tok, seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded = load_causal_lm(tmp_path, gradient_checkpointing=True)
    assert loaded.dtype == torch.float32  # CPU default
    assert loaded.is_gradient_checkpointing
    for a, b in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Gradient checkpointing in train mode still gives the same log-probs and gradients.
    ids, mask, P = _batch(seed=6)
    loaded.train()
    lp = token_logprobs(loaded, ids, mask, P).logprobs
    lp.sum().backward()
    assert loaded.model.layers[0].mlp.up_proj.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(
            lp.detach(), token_logprobs(model, ids, mask, P).logprobs, atol=1e-5, rtol=0
        )

    assert load_reference_model(tmp_path, beta=0.0) is None
    ref = load_reference_model(tmp_path, beta=0.04, gradient_checkpointing=True)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())

    tok2 = load_tokenizer(tmp_path)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_logprobs_and_backward_through_deepspeed_engine(zero_stage):
    from gdpo.distributed import build_engine, optimizer_step

    ids, mask, P = _batch(seed=7)
    plain = tiny_model(seed=8)
    engine = build_engine(tiny_model(seed=8), lr=1e-2, total_steps=1, zero_stage=zero_stage, grad_clip=0.0)
    lp = token_logprobs(engine, ids, mask, P, chunk_size=4).logprobs
    with torch.no_grad():
        torch.testing.assert_close(
            lp.detach(), token_logprobs(plain, ids, mask, P).logprobs, atol=1e-5, rtol=0
        )
    engine.backward(-(lp * mask[:, P:]).sum())
    stats = optimizer_step(engine)
    assert stats.grad_norm > 0
    with torch.no_grad():
        after = token_logprobs_batched(engine, ids, mask, P, micro_batch_size=2).logprobs
    # One step of gradient ascent on the completions' log-likelihood makes them more likely.
    assert (after * mask[:, P:]).sum() > (lp.detach() * mask[:, P:]).sum()


def test_groups_sharing_a_prompt_equal_naive_forward_and_gradients():
    """Rows that repeat a prompt (a GRPO group) run the prompt once and share its cache: same log-probs, entropy
    and parameter gradients as the naive full forward of every row."""
    ids3, mask3, P = _batch(seed=4)
    order = [0, 0, 0, 1, 1, 2]  # groups of 3, 2 and 1 rows; then give the copies their own completions
    ids, mask = ids3[order].clone(), mask3[order].clone()
    g = torch.Generator().manual_seed(5)
    for r in (1, 2, 4):
        n = int(mask[r, P:].sum())
        ids[r, P : P + n] = torch.randint(0, 256, (n,), generator=g)
    w = torch.randn(len(order), 9, generator=torch.Generator().manual_seed(6))

    naive_model = tiny_model()
    lp_ref, ent_ref = _naive(naive_model, ids, mask, P)
    (lp_ref.float() * w).sum().backward()

    model = tiny_model()
    calls = []  # the decoder's input widths: the shared path runs [3 prompts, P] then [6 rows, T - 1]
    model.model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                      with_kwargs=True)
    out = token_logprobs(model, ids, mask, P, chunk_size=4, return_entropy=True)
    assert calls == [(3, P), (6, 8)]
    torch.testing.assert_close(out.logprobs.double(), lp_ref.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(out.entropy.detach().double(), ent_ref.detach(), atol=2e-5, rtol=0)
    (out.logprobs * w).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)
