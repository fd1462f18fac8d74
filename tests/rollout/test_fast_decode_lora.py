"""FastDecoder on a LoRA (PEFT) policy: base GEMM + low-rank update, the same rollouts as the HF forward."""

import pytest
import torch

from gdpo.policy.lora import apply_lora
from gdpo.rollout.fast_decode import unsupported_reason

from test_fast_decode import CONFIGS, TOK, _model, _rollout, _step_logits

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(arch: str, *, seed: int = 1, dtype=torch.float32, **kwargs):
    """A LoRA policy whose adapters are non-zero (B starts at 0 in PEFT: the update would change nothing)."""
    model = apply_lora(_model(arch, dtype=dtype), r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_lora_model_is_supported_and_rollout_equals_hf_forward(arch):
    model = _lora(arch)
    assert unsupported_reason(model, max_len=64) is None
    hf, fast = _rollout(model, fast=False), _rollout(model, fast=True)
    assert torch.equal(hf.completion_ids, fast.completion_ids)
    assert torch.equal(hf.completion_mask, fast.completion_mask)
    torch.testing.assert_close(fast.sampling_logprobs, hf.sampling_logprobs, atol=1e-5, rtol=0)
    # the adapters matter: the base model (adapters off) samples something else from the same seed
    with model.disable_adapter():
        base = _rollout(model, fast=True)
        assert not torch.equal(base.completion_ids, fast.completion_ids)
        assert torch.equal(base.completion_ids, _rollout(model, fast=False).completion_ids)  # off in both paths


def test_lora_step_logits_and_trainer_logprobs():
    from gdpo.policy.model import token_logprobs

    model = _lora("qwen2")
    torch.testing.assert_close(_step_logits(model, True), _step_logits(model, False), atol=1e-5, rtol=1e-5)
    # the sampling log-probs of the fast rollout are the trainer's log-probs of those tokens (temperature 1)
    fast = _rollout(model, fast=True)
    with torch.no_grad():
        lp = token_logprobs(model, fast.input_ids(), fast.attention_mask(), fast.prompt_len).logprobs
    mask = fast.completion_mask.bool()
    torch.testing.assert_close(lp[mask], fast.sampling_logprobs[mask], atol=1e-4, rtol=0)


def test_bf16_lora_close_to_hf_forward():
    model = _lora("llama", dtype=torch.bfloat16)
    ref, got = _step_logits(model, False), _step_logits(model, True)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_dora_falls_back_to_the_hf_forward():
    model = _lora("qwen2")
    assert unsupported_reason(model) is None
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=["up_proj"], use_dora=True)).eval()
    assert "variant" in unsupported_reason(dora)
    hf, auto = _rollout(dora, fast=False), _rollout(dora, fast=True)
    assert torch.equal(hf.completion_ids, auto.completion_ids)
    assert TOK.eos_token_id is not None
