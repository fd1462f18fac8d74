"""A tiny Qwen2 model for the demo: real architecture, random init, CPU-fast.

Head dim is 32 (vLLM's CPU attention backends need head sizes of 32 or more), and the embeddings are
tied, as in small Qwen2 checkpoints, so the saved model loads anywhere a Qwen2 does.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Qwen2Config:
    """A Qwen2 config of ~0.56M parameters; head_dim = hidden_size / num_attention_heads (>= 32)."""
    head_dim = hidden_size // num_attention_heads
    if head_dim < 32 or hidden_size % num_attention_heads:
        raise ValueError(f"head_dim must be a whole number >= 32, got {hidden_size}/{num_attention_heads}")
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
    )


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int, **config_overrides: int) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 whose vocabulary and special ids match ``tokenizer``."""
    config = tiny_qwen2_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    # Seed only the init, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
