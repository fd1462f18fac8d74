"""Export a LoRA training checkpoint as a plain HF model (base + scaled B @ A folded into each weight).

    python -m gdpo.export --merge --adapter runs/math_gdpo_lora/checkpoints/step_00000500 --out merged/
    python -m gdpo.export --merge --adapter CKPT --model Qwen/Qwen2.5-Math-7B --out merged/ --dtype bfloat16

The output directory loads with `AutoModelForCausalLM.from_pretrained(out)` and `vllm.LLM(model=out)`; it holds
the tokenizer saved with the checkpoint. A full fine-tuning checkpoint needs no export: it is already an HF model
directory. Bad input (no adapter there, output directory not empty, ...) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """A user mistake: printed as one line, exit code 2."""


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path`` in its config)."""
    cfg = Path(adapter_dir) / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ExportError(f"--adapter: {adapter_dir} holds no {ADAPTER_CONFIG} (not a LoRA checkpoint; a full "
                          "fine-tuning checkpoint is already a model directory)")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"--adapter: {cfg} names no base model; pass --model")
    return base


def load_merged(adapter_dir: str | os.PathLike, *, model: str | None = None, dtype=None, device=None,
                trust_remote_code: bool = False):
    """The base model (``model`` or the adapter's recorded base) with the adapter merged in: a plain HF model."""
    import torch

    from gdpo.policy.lora import load_adapter
    from gdpo.policy.model import load_causal_lm

    base = model or adapter_base(adapter_dir)
    if dtype is None:  # the base checkpoint's own dtype (load_causal_lm would pick fp32 on CPU)
        from transformers import AutoConfig

        dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
    hf = load_causal_lm(base, dtype=dtype, device=device or "cpu", trust_remote_code=trust_remote_code)
    return load_adapter(hf, str(adapter_dir)).merge_and_unload().eval()


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
                  dtype=None, trust_remote_code: bool = False) -> Path:
    """Write the merged model (+ the checkpoint's tokenizer, else the base's) to ``out_dir``."""
    from gdpo.policy.model import load_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out: {out} exists and is not empty")
    merged = load_merged(adapter_dir, model=model, dtype=dtype, trust_remote_code=trust_remote_code)
    has_tok = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tok = load_tokenizer(str(adapter_dir) if has_tok else (model or adapter_base(adapter_dir)),
                         trust_remote_code=trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gdpo.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge", action="store_true", required=True,
                   help="fold the adapter into the base weights (the only export there is; required)")
    p.add_argument("--adapter", required=True, help="a LoRA training checkpoint directory (adapter_config.json)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter config)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the exported weights (default: the base checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from gdpo.policy.model import resolve_dtype

    try:
        if not Path(a.adapter).is_dir():
            raise ExportError(f"--adapter: {a.adapter} is not a directory")
        out = export_merged(a.adapter, a.out, model=a.model, dtype=resolve_dtype(a.dtype),
                            trust_remote_code=a.trust_remote_code)
    except (ExportError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
