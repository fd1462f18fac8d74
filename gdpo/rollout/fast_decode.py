"""One-token decode steps of Llama-family models as plain tensor code on the model's own parameters.

Why: on a small model the HF module forward costs about as much as the matmuls in it (module calls, mask
construction, cache bookkeeping, RoPE recomputed per layer). `FastDecoder.step` runs the same maths with
nothing else: measured on the vs_trl.py model (4.1M-parameter Qwen2, 32 rows x 64 tokens, CPU, one thread)
0.84 s -> 0.68 s for a whole rollout (benchmarks/step_floor.py, benchmarks/RESULTS.md).

Same function as the HF forward, to float rounding (tests/rollout/test_fast_decode.py compares logits and
sampled rollouts): RMSNorm computed in float32 and cast back before the weight (as HF does), RoPE from
the model's own rotary module (so its scaling variant applies), attention over the cached keys with the
padding mask, softmax in float32, GQA without copying the cache (the query heads of a KV head are stacked,
head h reads KV head h // rep as in `repeat_kv`).

Supported (`unsupported_reason(model)` is None): model types llama, qwen2, qwen3, mistral; SiLU MLP;
optional q/k/v/o and MLP biases; Qwen3's per-head q/k norms; RoPE types whose frequencies do not depend on the
sequence length (default, linear, llama3, yarn); no logit soft-capping; a sliding window only where the
sequences fit in it. Anything else decodes with the HF forward. Only one-token steps: the prompt is prefilled
by the HF forward and its cache copied in.
Modules must be the plain ones (nn.Linear projections, RMSNorms), or PEFT LoRA layers on them (a PeftModel):
those run as the base GEMM plus the low-rank update B(A(x)) * scaling (`gdpo.policy.lora.lora_linear`, PEFT's
order and dtypes, no dropout: rollouts run in eval mode), so a LoRA run keeps the fast path without a merged copy
of the weights. DoRA and other variants, and quantized layers, fall back. The parameters are read directly, so
forward hooks registered on the modules do not run during these steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdpo.policy.lora import lora_linear as _linear
from gdpo.policy.lora import unsupported_lora_reason, unwrap_peft

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model: torch.nn.Module, max_len: int | None = None) -> str | None:
    """None when `FastDecoder` computes what `model`'s forward computes for sequences of up to `max_len`
    columns (None: any length); otherwise why not."""
    model = unwrap_peft(model)  # a PeftModel: the HF model, whose layers hold the adapters
    cfg = getattr(model, "config", None)
    body = getattr(model, "model", None)
    if cfg is None or body is None or getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} (fast decode: {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
        return "logit soft-capping"
    rope = getattr(getattr(body, "rotary_emb", None), "rope_type", None)
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} (fast decode: {', '.join(ROPE_TYPES)})"
    if type(getattr(model, "lm_head", None)) is not torch.nn.Linear or type(
        getattr(body, "embed_tokens", None)
    ) is not torch.nn.Embedding:
        return "lm_head / embed_tokens are not plain Linear / Embedding modules"
    for ly in getattr(body, "layers", None) or []:
        a, mlp = getattr(ly, "self_attn", None), getattr(ly, "mlp", None)
        window = getattr(a, "sliding_window", None)
        if window is not None and (max_len is None or max_len > window):  # shorter: nothing slides out
            return f"sliding-window attention (window {window}, sequences up to {max_len})"
        # exactly nn.Linear or vanilla LoRA on one: a quantized wrapper would compute something else than .weight
        linears = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        why = "no attention scaling" if not hasattr(a, "scaling") else next(
            filter(None, (unsupported_lora_reason(lin) for lin in linears)), None)
        if why:
            names = f"{type(a).__name__}, {type(mlp).__name__}"
            return f"layer modules ({names}) are not plain Linear projections: {why}"
        norms = [getattr(ly, "input_layernorm", None), getattr(ly, "post_attention_layernorm", None)]
        if any(not hasattr(n, "variance_epsilon") for n in norms):
            return "layer norms are not RMSNorm"
    if not getattr(body, "layers", None) or not hasattr(getattr(body, "norm", None), "variance_epsilon"):
        return "no decoder layers / final RMSNorm"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama/Qwen RMSNorm: normalise in float32, cast back, then scale."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF applies it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class FastDecoder:
    """KV cache [rows, Hkv, capacity, D] per layer plus the per-row RoPE tables and key padding bias.

    positions: [rows, capacity] position ids; key_mask: [rows, capacity] 1 where a column is a real token.
    """

    def __init__(self, model: torch.nn.Module, positions: torch.Tensor, key_mask: torch.Tensor):
        model = unwrap_peft(model)
        cfg = model.config
        self.model, self.body = model, model.model
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        rows, cap = positions.shape
        w = self.body.embed_tokens.weight
        self.dtype = w.dtype
        cos, sin = self.body.rotary_emb(w[:1], positions)  # [rows, cap, D] each, in the model dtype
        self.cos, self.sin = cos[:, None], sin[:, None]  # [rows, 1, cap, D]
        self.bias = torch.zeros((rows, 1, 1, cap), dtype=self.dtype, device=w.device).masked_fill(
            key_mask[:, None, None, :] == 0, float("-inf")
        )  # [rows, 1, 1, cap]
        self.k = [w.new_zeros((rows, self.hkv, cap, self.d)) for _ in self.body.layers]
        self.v = [w.new_zeros((rows, self.hkv, cap, self.d)) for _ in self.body.layers]

    def load_cache(self, cache, n: int) -> None:
        """Copy the first n columns of an HF cache (e.g. the shared prompt prefill) into the buffers."""
        for i, layer in enumerate(cache.layers):
            self.k[i][:, :, :n] = layer.keys[:, :, :n]
            self.v[i][:, :, :n] = layer.values[:, :, :n]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the given rows [a] of the batch (finished rows leave the decode batch)."""
        self.cos, self.sin, self.bias = self.cos[rows], self.sin[rows], self.bias[rows]
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]

    def step(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """ids [rows] are the tokens at column n; returns the logits [rows, V] for column n + 1."""
        rows, D, hq, hkv = ids.shape[0], self.d, self.hq, self.hkv
        cos, sin = self.cos[:, :, n : n + 1], self.sin[:, :, n : n + 1]  # [rows, 1, 1, D]
        bias = self.bias[..., : n + 1]  # [rows, 1, 1, n + 1]
        h = F.embedding(ids[:, None], self.body.embed_tokens.weight)  # [rows, 1, H]
        for i, ly in enumerate(self.body.layers):
            a, mlp = ly.self_attn, ly.mlp
            x = _rms_norm(h, ly.input_layernorm.weight, ly.input_layernorm.variance_epsilon)
            q = _linear(x, a.q_proj).view(rows, 1, hq, D)
            k = _linear(x, a.k_proj).view(rows, 1, hkv, D)
            v = _linear(x, a.v_proj).view(rows, hkv, 1, D)
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                q = _rms_norm(q, a.q_norm.weight, a.q_norm.variance_epsilon)
                k = _rms_norm(k, a.k_norm.weight, a.k_norm.variance_epsilon)
            q = _rotate(q.view(rows, hq, 1, D), cos, sin)  # [rows, Hq, 1, D] (one position: views)
            k = _rotate(k.view(rows, hkv, 1, D), cos, sin)  # [rows, Hkv, 1, D]
            self.k[i][:, :, n : n + 1] = k
            self.v[i][:, :, n : n + 1] = v
            keys, values = self.k[i][:, :, : n + 1], self.v[i][:, :, : n + 1]  # [rows, Hkv, n + 1, D]
            qg = q.reshape(rows, hkv, hq // hkv, D)  # query heads stacked per KV head
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * a.scaling + bias  # [rows, Hkv, rep, n + 1]
            probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
            o = torch.matmul(probs, values).reshape(rows, 1, hq * D)  # [rows, 1, Hq * D]
            h = h + _linear(o, a.o_proj)
            x = _rms_norm(h, ly.post_attention_layernorm.weight, ly.post_attention_layernorm.variance_epsilon)
            gate = _linear(x, mlp.gate_proj)
            up = _linear(x, mlp.up_proj)
            h = h + _linear(F.silu(gate) * up, mlp.down_proj)
        h = _rms_norm(h, self.body.norm.weight, self.body.norm.variance_epsilon)
        head = self.model.lm_head
        return F.linear(h[:, 0], head.weight, head.bias)  # [rows, V]
