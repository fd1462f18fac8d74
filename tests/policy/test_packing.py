"""The padding-free packed path of `token_logprobs` (loss.packing) against the padded one, and the start's check
of whether a model's attention keeps packed rows apart."""

import pytest
import torch

from gdpo.policy import model as pm
from gdpo.policy.model import packing_probe, packing_problem, token_logprobs, token_logprobs_batched
from gdpo.testing import tiny_model


def _batch(seed=0, vocab=259):
    """Left-padded prompts (P=6) of 6, 2, 4, 1 tokens + right-padded completions (T=9) of 9, 3, 1, 5."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, comp_lens = [6, 2, 4, 1], [9, 3, 1, 5]
    P, T = 6, 9
    ids = torch.randint(0, vocab, (4, P + T), generator=g)
    mask = torch.zeros((4, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens)):
        mask[i, P - p : P + c] = 1
    return ids.masked_fill(mask == 0, 256), mask, P


@pytest.mark.parametrize("kw", [dict(chunk_size=4), dict(chunk_size=100, temperature=0.7),
                                dict(chunk_size=3, top_k=20, top_p=0.9)])
def test_packed_equals_padded(kw):
    model = tiny_model()
    ids, mask, P = _batch()
    with torch.no_grad():
        pad = token_logprobs(model, ids, mask, P, return_entropy=True, **kw)
        pk = token_logprobs(model, ids, mask, P, return_entropy=True, packed=True, **kw)
    torch.testing.assert_close(pk.logprobs, pad.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pk.entropy, pad.entropy, atol=1e-5, rtol=0)
    assert (pk.logprobs[mask[:, P:] == 0] == 0).all() and pk.logprobs[mask[:, P:] == 1].lt(0).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_padded_and_no_compute_on_padding(checkpointing):
    ids, mask, P = _batch(seed=1)
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    grads = {}
    for packed in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        body, head = [], []
        model.model.embed_tokens.register_forward_hook(lambda m, i, o, s=body: s.append(tuple(o.shape[:2])))
        model.lm_head.register_forward_hook(lambda m, i, o, s=head: s.append(tuple(o.shape[:2])))
        lp = token_logprobs(model, ids, mask, P, chunk_size=8, packed=packed).logprobs
        (lp * w).sum().backward()
        grads[packed] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if packed:  # one sequence of the 32 real tokens; the head sees the 18 completion tokens, 8 at a time
            assert body == [(1, int(mask.sum()))]
            assert head[:3] == [(1, 8), (1, 8), (1, 2)] and sum(c for _, c in head[:3]) == int(mask[:, P:].sum())
        else:
            assert body[0][0] == 4  # padded: 4 rows of the padded width
    for name, g in grads[False].items():
        # measured: at most 1e-5 apart (the embeddings, |grad| up to 32): rounding of the two attention masks
        torch.testing.assert_close(grads[True][name], g, atol=3e-5, rtol=1e-4, msg=name)
    assert max(g.abs().max().item() for g in grads[False].values()) > 1e-3


def test_batched_packed_equals_padded_over_micro_batches():
    model = tiny_model()
    ids, mask, P = _batch(seed=3)
    micros = [torch.tensor([0, 3]), torch.tensor([2, 1])]
    a = token_logprobs_batched(model, ids, mask, P, micro_batches=micros, return_entropy=True)
    b = token_logprobs_batched(model, ids, mask, P, micro_batches=micros, return_entropy=True, packed=True)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.entropy, a.entropy, atol=1e-5, rtol=0)


def test_a_row_without_a_prompt_token_is_refused():
    model = tiny_model()
    ids, mask, P = _batch()
    mask[1, :P] = 0
    with pytest.raises(ValueError, match="at least one prompt token"):
        token_logprobs(model, ids, mask, P, packed=True)


def test_probe_passes_where_rows_stay_apart_and_fails_where_they_mix(monkeypatch):
    import transformers.masking_utils as mu

    model = tiny_model()
    assert packing_probe(model) is None  # sdpa reads the row boundaries off the position ids
    # an attention that ignores packed position ids: the second row attends to the first
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    msg = packing_probe(model)
    assert msg is not None and "packing probe failed" in msg and "do" in msg


def test_packing_needs_a_variable_length_attention(monkeypatch):
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    msg = packing_problem(model)
    assert "sdpa attention has no variable-length kernel" in msg and "flash_attention_2" in msg
    model.config._attn_implementation = "eager"
    assert "eager attention" in packing_problem(model)
    model.config._attn_implementation = "flex_attention"
    assert "recompile it every step" in packing_problem(model)
    model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(pm, "VARLEN_ATTENTION", ("sdpa",))  # were sdpa a varlen kernel: the probe decides
    assert packing_problem(model) is None


def test_packed_equals_padded_through_lora_adapters():
    from gdpo.policy.lora import apply_lora

    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    for n, p in model.named_parameters():
        if "lora_B" in n:  # PEFT starts B at 0: make the adapters change the outputs
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(5))
    ids, mask, P = _batch(seed=4)
    with torch.no_grad():
        pad = token_logprobs(model, ids, mask, P).logprobs
        pk = token_logprobs(model, ids, mask, P, packed=True).logprobs
        base = token_logprobs(tiny_model(), ids, mask, P).logprobs
    torch.testing.assert_close(pk, pad, atol=1e-5, rtol=0)
    assert (pad - base).abs().max() > 1e-3  # the adapters are on
    assert packing_probe(model) is None
