"""LoRA adapters (PEFT) on the policy: wrapping, the adapter-off reference, and merged weights for rollout engines.

- `apply_lora` wraps the HF model in a `peft.PeftModel`: every target linear layer becomes base layer + B @ A
  scaled by alpha / r; the base weights are frozen (requires_grad False), so `build_engine`, which hands the
  optimizer only parameters that require grad, trains the adapters alone at every ZeRO stage.
- The KL reference of a LoRA run is the same module with its adapters switched off (`AdapterOffReference`, PEFT's
  `disable_adapter()`): the base model is the initial policy, so no second copy of the weights is loaded.
- `merged_sync_weights` lists what a rollout engine that holds its own copy of the weights (vLLM) must receive:
  every base-model parameter under its base-model name, the adapted ones as W + scaling * B @ A.

Modules are replaced in place by PEFT, so `model.get_decoder()` etc. (forwarded by PeftModel) reach the adapted
layers: the trainer's `token_logprobs` needs nothing LoRA-specific.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

PEFT_PREFIX = "base_model.model."  # PeftModel parameter names = this + the base model's own names
ALL_LINEAR = "all-linear"


def is_peft_model(model) -> bool:
    """True for a `peft.PeftModel` (checked without importing peft)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a PeftModel (its layers hold the adapters); any other model unchanged."""
    return model.get_base_model() if is_peft_model(model) else model


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    bias: str = "none",
) -> torch.nn.Module:
    """`model` with LoRA adapters (a PeftModel); base weights frozen. B starts at zero (PEFT's default), so the
    wrapped model computes exactly what `model` did until the first update.

    Raises ValueError when a target module matches nothing in the model (PEFT's message, naming it)."""
    from peft import LoraConfig, get_peft_model

    targets = ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias=bias,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, adapter_dir: str, *, trainable: bool = False) -> torch.nn.Module:
    """A base model with the PEFT adapter saved in `adapter_dir` (a training checkpoint directory)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


class AdapterOffReference:
    """The KL reference as the policy with its adapters switched off: the base model, without a second copy.

    `with ref.model() as m:` yields the PeftModel with every adapter disabled for the block (no-grad forwards
    only: PEFT re-enables the adapters, and their requires_grad, on exit)."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    @contextlib.contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        with self.policy.disable_adapter():
            yield self.policy


@contextlib.contextmanager
def reference_model(ref) -> Iterator[torch.nn.Module]:
    """The module to run as the reference: a plain reference model as is, an `AdapterOffReference` with its
    adapters off for the block."""
    if isinstance(ref, AdapterOffReference):
        with ref.model() as m:
            yield m
    else:
        yield ref


def lora_parts(module: torch.nn.Module) -> list[tuple[torch.nn.Linear, torch.nn.Linear, float]] | None:
    """For a PEFT `lora.Linear`: its active adapters as (A, B, scaling), [] when they are disabled or already
    merged into the base weight; None for any other module."""
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
        return None
    if module.disable_adapters or module.merged:
        return []
    return [(module.lora_A[n], module.lora_B[n], module.scaling[n]) for n in module.active_adapters
            if n in module.lora_A]


def lora_linear(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """What a plain `nn.Linear` or a PEFT `lora.Linear` (vanilla LoRA, eval mode: no dropout) computes for x,
    as functional ops on its parameters (no module call): base GEMM + the low-rank update B(A(x)) * scaling,
    in the order and dtypes PEFT uses."""
    if type(module) is torch.nn.Linear:  # the common case first: no attribute probing per decode step
        return torch.nn.functional.linear(x, module.weight, module.bias)
    parts = lora_parts(module)
    if parts is None:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    base = module.base_layer
    y = torch.nn.functional.linear(x, base.weight, base.bias)
    out_dtype = y.dtype
    for A, B, scaling in parts:
        xa = x.to(A.weight.dtype)
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(xa, A.weight, A.bias), B.weight, B.bias) * scaling
    return y.to(out_dtype)


def unsupported_lora_reason(module: torch.nn.Module) -> str | None:
    """None when `lora_linear` computes what `module` does (plain Linear, or vanilla LoRA on a plain Linear)."""
    if type(module) is torch.nn.Linear:
        return None
    if lora_parts(module) is None:
        return f"{type(module).__name__} is neither nn.Linear nor a PEFT LoRA Linear"
    if type(module.base_layer) is not torch.nn.Linear:
        return f"LoRA on {type(module.base_layer).__name__} (only on nn.Linear)"
    if getattr(module, "lora_variant", None) and any(n in module.lora_variant for n in module.active_adapters):
        return "a LoRA variant (DoRA, ...) is active"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out LoRA"
    return None


class MergedLoraWeight:
    """A base weight W of a LoRA layer as the rollout engine must see it: W + scaling * B @ A (all active adapters).

    Quacks like a parameter for chunked syncs: `numel()` / `element_size()` / `ds_numel` give the full size,
    `params` lists what must be gathered (ZeRO-3) before `value()`."""

    def __init__(self, base: torch.nn.Parameter, parts: list[tuple[torch.nn.Linear, torch.nn.Linear, float]]):
        self.base, self.parts = base, parts
        self.params = [base] + [w for A, B, _ in parts for w in (A.weight, B.weight)]
        if hasattr(base, "ds_numel"):
            self.ds_numel = base.ds_numel

    def numel(self) -> int:
        return self.base.numel()

    def element_size(self) -> int:
        return self.base.element_size()

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        w = self.base.data.float()  # [out, in]; merged in float32, then cast to the weight's dtype
        for A, B, scaling in self.parts:
            w = w + (B.weight.data.float() @ A.weight.data.float()) * scaling  # [out, r] @ [r, in]
        return w.to(self.base.dtype)


def base_name(peft_name: str) -> str:
    """A PeftModel parameter name -> the base model's name for it (what a checkpoint of the base model uses).

    >>> base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    name = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return name.replace(".base_layer.", ".")


def merged_sync_weights(model: torch.nn.Module) -> list[tuple[str, object]]:
    """(base-model name, parameter or `MergedLoraWeight`) for every base-model parameter of a PeftModel, in model
    order; adapter parameters themselves are not listed (they are folded into their layer's weight)."""
    merged = {}
    for _, module in model.named_modules():
        parts = lora_parts(module)
        if parts:
            merged[id(module.base_layer.weight)] = MergedLoraWeight(module.base_layer.weight, parts)
    out = []
    for name, p in model.named_parameters():
        if ".lora_" in name:  # lora_A / lora_B / lora_embedding_*: folded in above
            continue
        out.append((base_name(name), merged.get(id(p), p)))
    return out
