"""HF rollout backend: layout, grouping, padding, EOS / stop handling, sampling log-probs."""

import pytest
import torch

from gdpo.policy.model import token_logprobs
from gdpo.rollout import HFRolloutEngine, RolloutBatch, RolloutEngine, SamplingParams
from gdpo.testing import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
QUESTIONS = ["hi", "what is 2+2? answer briefly", "x y"]


def _prompts():
    return [
        TOK(
            TOK.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in QUESTIONS
    ]


def _engine(model, **kw):
    chunk = kw.pop("generation_batch_size", None)
    share = kw.pop("share_prompt_prefill", True)
    fast = kw.pop("fast_decode", True)
    return HFRolloutEngine(
        model, TOK, SamplingParams(**kw), generation_batch_size=chunk, share_prompt_prefill=share,
        fast_decode=fast,
    )


def _greedy_row(model, prompt, max_new_tokens):
    """Reference: one unpadded prompt, greedy, plain argmax loop without a cache."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == TOK.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_layout_grouping_and_masks():
    model = tiny_model(tokenizer=TOK, seed=0)
    prompts = _prompts()
    torch.manual_seed(0)
    batch = _engine(model, max_new_tokens=12, temperature=1.0).generate(prompts, n=4)
    assert isinstance(batch, RolloutBatch)
    assert batch.group_size == 4 and batch.num_prompts == 3 and batch.num_rows == 12
    P = max(len(p) for p in prompts)
    assert batch.prompt_ids.shape == (12, P)
    for i, p in enumerate(prompts):
        for r in range(i * 4, (i + 1) * 4):  # G rows of prompt i are contiguous, prompt left-padded
            assert batch.prompt_ids[r, P - len(p) :].tolist() == p
            assert batch.prompt_mask[r].tolist() == [0] * (P - len(p)) + [1] * len(p)
            assert (batch.prompt_ids[r, : P - len(p)] == TOK.pad_token_id).all()
    T = batch.completion_ids.shape[1]
    assert T <= 12
    lengths = batch.completion_lengths
    assert batch.completion_mask.tolist() == [[1] * L + [0] * (T - L) for L in lengths.tolist()]
    for r in range(12):
        L = int(lengths[r])
        comp = batch.completion_ids[r].tolist()
        has_eos = TOK.eos_token_id in comp[:L]
        # EOS, if any, is the last masked token; truncated == no EOS within max_new_tokens
        assert batch.truncated[r].item() == (not has_eos)
        if has_eos:
            assert comp.index(TOK.eos_token_id) == L - 1
        else:
            assert L == 12
        assert all(t == TOK.pad_token_id for t in comp[L:])
        assert batch.completion_texts[r] == TOK.decode(comp[:L], skip_special_tokens=True)
    assert isinstance(_engine(model), RolloutEngine)


@pytest.mark.parametrize("share", [True, False])
def test_greedy_batched_equals_unbatched_reference(share):
    # Left padding + position ids (+ the shared prefill cache) done right: every batched row equals
    # its prompt generated alone.
    model = tiny_model(tokenizer=TOK, seed=1)
    prompts = _prompts()
    batch = _engine(model, max_new_tokens=10, temperature=0.0, share_prompt_prefill=share).generate(
        prompts, n=2
    )
    for i, p in enumerate(prompts):
        expected = _greedy_row(model, p, 10)
        for r in (2 * i, 2 * i + 1):
            L = int(batch.completion_lengths[r])
            assert batch.completion_ids[r, :L].tolist() == expected


@pytest.mark.parametrize("variant", [{"generation_batch_size": 4}, {"share_prompt_prefill": False}])
def test_chunked_or_unshared_generation_equals_one_batch(variant):
    model = tiny_model(tokenizer=TOK, seed=2)
    one = _engine(model, max_new_tokens=8, temperature=0.0, return_logprobs=True).generate(_prompts(), n=3)
    other = _engine(model, max_new_tokens=8, temperature=0.0, return_logprobs=True, **variant).generate(
        _prompts(), n=3
    )
    T = one.completion_ids.shape[1]
    assert other.completion_ids.shape[1] == T
    assert torch.equal(one.completion_ids, other.completion_ids)
    assert torch.equal(one.completion_mask, other.completion_mask)
    assert torch.equal(one.prompt_ids, other.prompt_ids)
    torch.testing.assert_close(one.sampling_logprobs, other.sampling_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("share", [True, False])
def test_sampling_logprobs_equal_policy_logprobs(temperature, share):
    model = tiny_model(tokenizer=TOK, seed=3)
    # The checkpoint's sampling defaults must NOT leak into rollouts (RL samples from the policy itself).
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 1
    torch.manual_seed(1)
    batch = _engine(
        model, max_new_tokens=10, temperature=temperature, return_logprobs=True, share_prompt_prefill=share
    ).generate(_prompts(), n=2)
    assert model.generation_config.top_k == 1  # restored
    lp = token_logprobs(
        model, batch.input_ids(), batch.attention_mask(), batch.prompt_len, temperature=temperature
    ).logprobs
    assert batch.sampling_logprobs.shape == lp.shape
    torch.testing.assert_close(batch.sampling_logprobs, lp.detach(), atol=1e-5, rtol=0)
    # Sampling really happened: the 2 samples of some prompt differ.
    assert any(
        not torch.equal(batch.completion_ids[2 * i], batch.completion_ids[2 * i + 1]) for i in range(3)
    )


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model(tokenizer=TOK, seed=4)
    greedy = _engine(model, max_new_tokens=8, temperature=0.0).generate(_prompts(), n=2)
    torch.manual_seed(2)
    k1 = _engine(model, max_new_tokens=8, temperature=1.3, top_k=1, return_logprobs=True).generate(
        _prompts(), n=2
    )
    p0 = _engine(model, max_new_tokens=8, temperature=1.3, top_p=1e-6).generate(_prompts(), n=2)
    assert torch.equal(greedy.completion_ids, k1.completion_ids)
    assert torch.equal(greedy.completion_ids, p0.completion_ids)
    # Under top-k 1 the sampling distribution is a point mass: log-prob 0 on every real token.
    assert k1.sampling_logprobs.abs().max().item() == 0.0


def test_stop_token_ids_end_completions():
    model = tiny_model(tokenizer=TOK, seed=5)
    prompts = _prompts()[:1]
    free = _engine(model, max_new_tokens=16, temperature=0.0).generate(prompts, n=1)
    comp = free.completion_ids[0, : int(free.completion_lengths[0])].tolist()
    stop_id = comp[3]
    k = comp.index(stop_id)  # first occurrence (<= 3)
    stopped = _engine(model, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop_id]).generate(
        prompts, n=2
    )
    for r in range(2):
        assert stopped.completion_lengths[r].item() == k + 1  # mask includes the stop token
        assert stopped.completion_ids[r, : k + 1].tolist() == comp[: k + 1]
        assert not stopped.truncated[r]


def test_stop_strings_end_completions_but_not_on_prompt_text():
    model = tiny_model(tokenizer=TOK, seed=6)
    prompts = _prompts()[:1]
    free = _engine(model, max_new_tokens=24, temperature=0.0).generate(prompts, n=1)
    comp = free.completion_ids[0, : int(free.completion_lengths[0])].tolist()
    # A printable ASCII byte: with this byte-level tokenizer, only its own token can produce it.
    k, ch = next(
        (i, TOK.decode([t]))
        for i, t in enumerate(comp)
        if i >= 2 and TOK.decode([t]).isalnum() and TOK.decode([t]).isascii()
    )
    k = next(i for i, t in enumerate(comp) if TOK.decode([t]) == ch)
    stopped = _engine(model, max_new_tokens=24, temperature=0.0, stop_strings=[ch]).generate(prompts, n=1)
    assert stopped.completion_lengths[0].item() == k + 1
    assert stopped.completion_texts[0].endswith(ch) and not stopped.truncated[0]

    # "assistant" is in every prompt (the generation header) but must only match completion text.
    in_prompt = _engine(model, max_new_tokens=24, temperature=0.0, stop_strings=["assistant"]).generate(
        prompts, n=1
    )
    assert "assistant" not in free.completion_texts[0]
    assert torch.equal(in_prompt.completion_ids, free.completion_ids)


def test_train_mode_restored_and_errors():
    model = tiny_model(tokenizer=TOK).train()
    engine = _engine(model, max_new_tokens=3)
    engine.generate(_prompts(), n=1)
    assert model.training
    engine.sync_weights(model)  # no-op for hf
    with pytest.raises(ValueError):
        engine.generate([[]], n=1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_rows_subset():
    model = tiny_model(tokenizer=TOK, seed=7)
    batch = _engine(model, max_new_tokens=5, temperature=0.0, return_logprobs=True).generate(_prompts(), n=2)
    sub = batch.rows([4, 5])
    assert torch.equal(sub.completion_ids, batch.completion_ids[4:6])
    assert sub.completion_texts == batch.completion_texts[4:6]
    assert sub.sampling_logprobs.shape == (2, batch.completion_ids.shape[1])


@pytest.mark.parametrize("fast", [False, True])
def test_shared_prefill_runs_each_prompt_once(fast):
    model = tiny_model(tokenizer=TOK, seed=8)
    widths = []  # (rows, columns) of every forward through the HF transformer body
    model.model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    prompts = _prompts()
    P = max(len(p) for p in prompts)
    _engine(model, max_new_tokens=4, temperature=1.0, fast_decode=fast).generate(prompts, n=5)
    assert widths[0] == (3, P - 1)  # 3 unique prompts, all but the last prompt token
    # then one new column per step for 15 rows (the fast decoder's steps do not call the HF body)
    assert widths[1:] == ([] if fast else [(15, 1)] * 4)
    widths.clear()
    _engine(model, max_new_tokens=4, temperature=1.0, share_prompt_prefill=False, fast_decode=fast).generate(
        prompts, n=5
    )
    # unshared: every row's whole prompt (HF forward), or its prefill before the fast decoder's steps
    assert widths == ([(15, P - 1)] if fast else [(15, P)] + [(15, 1)] * 3)


def test_generation_under_zero3_gathers_weights():
    from gdpo.distributed import build_engine

    plain = tiny_model(tokenizer=TOK, seed=9)
    engine = build_engine(tiny_model(tokenizer=TOK, seed=9), lr=1e-3, total_steps=1, zero_stage=3)
    assert hasattr(next(engine.module.parameters()), "ds_id")  # partitioned parameters
    expected = _engine(plain, max_new_tokens=6, temperature=0.0).generate(_prompts(), n=2)
    got = _engine(engine.module, max_new_tokens=6, temperature=0.0).generate(_prompts(), n=2)
    assert torch.equal(expected.completion_ids, got.completion_ids)  # HF forward, weights fetched by the hooks
    # with the engine (as the trainer passes it): gathered once, hooks off, the fast decoder reads the weights
    via_engine = _engine(engine, max_new_tokens=6, temperature=0.0)
    assert via_engine._use_fast_decode(32)
    got = via_engine.generate(_prompts(), n=2)
    assert torch.equal(expected.completion_ids, got.completion_ids)
    assert next(engine.module.parameters()).numel() == 0  # partitioned again afterwards


def test_stops_on_generation_config_eos_the_tokenizer_lacks(tmp_path):
    """The stop set is types.stop_token_ids (shared with the vLLM backend): tokenizer EOS + generation config."""
    from gdpo.policy.model import load_causal_lm
    from gdpo.rollout.types import stop_token_ids
    from gdpo.testing import save_model_with_extra_eos

    prompt = _prompts()[1]
    extra = save_model_with_extra_eos(tmp_path, prompt)
    model = load_causal_lm(str(tmp_path))
    assert stop_token_ids(TOK, model.generation_config) == [TOK.eos_token_id, extra]
    for fast in (True, False):
        engine = _engine(model, max_new_tokens=8, temperature=0.0, fast_decode=fast)
        assert engine.eos_ids == (TOK.eos_token_id, extra)
        batch = engine.generate([prompt], n=2)
        assert batch.completion_ids[:, 0].tolist() == [extra, extra]
        assert batch.completion_lengths.tolist() == [1, 1] and batch.truncated.tolist() == [False, False]


@pytest.mark.parametrize("fast", [True, False])
def test_a_flex_attention_policy_generates_with_sdpa_math(monkeypatch, fast):
    """model.attn_implementation: flex_attention (for the packed update) must not run flex in rollouts: it would
    compile a kernel per cache length (minutes on CPU). The rollout uses sdpa's attention, the same tokens."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    prompts = _prompts()
    runs = {}
    for impl in ("sdpa", "flex_attention"):
        model = tiny_model(tokenizer=TOK, seed=0)
        model.config._attn_implementation = impl
        calls = []
        real = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention",
                            lambda *a, _real=real, _calls=calls, **k: (_calls.append(1), _real(*a, **k))[1])
        torch.manual_seed(0)
        runs[impl] = _engine(model, max_new_tokens=8, temperature=1.0, fast_decode=fast).generate(prompts, n=2)
        assert calls == [] and model.config._attn_implementation == impl  # restored after the rollout
    assert runs["flex_attention"].completion_ids.equal(runs["sdpa"].completion_ids)
