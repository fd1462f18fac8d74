"""FastDecoder: the same one-token step as the HF forward, per supported architecture, and the fallbacks."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from gdpo.rollout import HFRolloutEngine, SamplingParams
from gdpo.rollout.fast_decode import FastDecoder, unsupported_reason
from gdpo.testing import tiny_tokenizer

TOK = tiny_tokenizer()
SIZES = dict(vocab_size=len(TOK), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**SIZES),  # q/k/v biases, untied head
    "llama": lambda: LlamaConfig(**SIZES, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3": lambda: Qwen3Config(**SIZES, head_dim=32),  # q/k norms, head_dim * heads != hidden
    "mistral": lambda: MistralConfig(**SIZES, sliding_window=128),  # longer than any sequence here
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # left padding of 5 and 3 columns


def _model(arch: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="sdpa").to(dtype).eval()
    with torch.no_grad():  # peaked next-token distributions, so that sampling is not uniform noise
        model.lm_head.weight.mul_(4.0)
    return model


def _rollout(model, fast: bool, *, share: bool = True, temperature: float = 1.0, n: int = 3):
    sampling = SamplingParams(max_new_tokens=12, temperature=temperature, return_logprobs=True)
    engine = HFRolloutEngine(model, TOK, sampling, fast_decode=fast, share_prompt_prefill=share)
    torch.manual_seed(7)
    return engine.generate(PROMPTS, n=n)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_supported_architectures(arch):
    assert unsupported_reason(_model(arch), max_len=64) is None


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fast_rollout_equals_hf_forward_rollout(arch, share):
    # Same seed, same sampler: the same tokens are drawn from the same distributions (log-probs to rounding).
    model = _model(arch)
    hf, fast = _rollout(model, fast=False, share=share), _rollout(model, fast=True, share=share)
    assert torch.equal(hf.completion_ids, fast.completion_ids)
    assert torch.equal(hf.completion_mask, fast.completion_mask)
    torch.testing.assert_close(fast.sampling_logprobs, hf.sampling_logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in fast.completion_ids.tolist()}) > 3  # really sampled, not one repeated row


def _step_logits(model, fast: bool) -> torch.Tensor:
    """Logits for the column after each (left-padded) prompt: HF forward over the whole prompt, or the HF
    prefill of P-1 columns followed by one FastDecoder step."""
    from transformers import DynamicCache

    P = max(len(p) for p in PROMPTS)
    ids = torch.full((len(PROMPTS), P), TOK.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if not fast:
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                      past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
        dec = FastDecoder(model, pos, mask)
        dec.load_cache(cache, P - 1)
        return dec.step(ids[:, -1], P - 1).float()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_step_logits_fp32_and_bf16(arch):
    model = _model(arch)
    torch.testing.assert_close(_step_logits(model, True), _step_logits(model, False), atol=1e-5, rtol=1e-5)
    bf16 = _model(arch, dtype=torch.bfloat16)
    ref, got = _step_logits(bf16, False), _step_logits(bf16, True)
    # bf16 rounds at every op, in a different order than HF's kernels: close, and the same top tokens
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_unsupported_models_say_why_and_decode_with_the_hf_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(TOK), n_embd=64, n_layer=1, n_head=2))
    assert "model type 'gpt2'" in unsupported_reason(gpt2)
    window = Qwen2Config(**{**SIZES, "num_hidden_layers": 1}, use_sliding_window=True, sliding_window=8,
                         max_window_layers=0)
    slid = AutoModelForCausalLM.from_config(window, attn_implementation="sdpa").eval()
    assert "sliding-window" in unsupported_reason(slid, max_len=20)
    assert unsupported_reason(slid, max_len=8) is None  # the whole sequence fits in the window
    dyn = AutoModelForCausalLM.from_config(
        Qwen2Config(**SIZES, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert "rope type 'dynamic'" in unsupported_reason(dyn)
    # the sliding-window model is decoded by the HF forward (prompt + 12 tokens > 8): same result either way
    hf, auto = _rollout(slid, fast=False), _rollout(slid, fast=True)
    assert torch.equal(hf.completion_ids, auto.completion_ids)
    torch.testing.assert_close(auto.sampling_logprobs, hf.sampling_logprobs, atol=0, rtol=0)


def test_config_switch_reaches_the_engine():
    from gdpo.config import config_from_dict
    from gdpo.rollout.factory import make_rollout_engine

    assert config_from_dict({}).rollout.hf_fast_decode is True
    cfg = config_from_dict({"rollout": {"hf_fast_decode": False}})
    engine = make_rollout_engine("hf", _model("qwen2"), TOK, SamplingParams(max_new_tokens=4),
                                 fast_decode=cfg.rollout.hf_fast_decode)
    assert engine.fast_decode is False
    with pytest.raises(Exception, match="hf_fast_decode"):
        config_from_dict({"rollout": {"hf_fast_decode": "sometimes"}})


def test_wrapped_projection_falls_back_to_the_hf_forward():
    # An adapter-like subclass of nn.Linear computes more than x @ weight: the fast step must not be used.
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _model("qwen2")
    old = model.model.layers[0].mlp.up_proj
    new = Doubled(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    model.model.layers[0].mlp.up_proj = new
    assert "not plain Linear" in unsupported_reason(model)
    plain = _model("qwen2")
    hf, auto = _rollout(model, fast=False), _rollout(model, fast=True)
    assert torch.equal(hf.completion_ids, auto.completion_ids)  # both ran the HF forward, wrapper included
    assert not torch.equal(auto.completion_ids, _rollout(plain, fast=True).completion_ids)  # and it matters
