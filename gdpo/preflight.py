"""Every check of a config that needs no model weights, in one place, run before anything heavy loads.

    preflight(cfg)            # raises ConfigError: one line naming the key and what is allowed

`python train.py --check` runs it, and training setup runs it first, so a missing file, an unknown reward,
a bad resume path or a host that cannot sandbox code rewards fails in a second, not after the model has
loaded (or at step 1). It reads files and may load the tokenizer (small), writes nothing but a probe file
that it removes at once, and moves nothing (the run directory is only inspected: `prepare_run_dir` claims
it later).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from gdpo.config import Config, ConfigError, to_dict

__all__ = ["preflight", "looks_like_hub_id"]

# org/name with the characters the hub allows; anything else (./x, /abs, a/b/c, x.jsonl) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".yaml", ".yml", ".gz")
_CODE_REWARDS = ("code_pass", "code_bug")


def looks_like_hub_id(ref: str) -> bool:
    """True for ``org/name`` (a hub repository id); False for anything that can only be a local path.

    >>> [looks_like_hub_id(x) for x in ("Qwen/Qwen2.5-0.5B", "./ckpt", "/data/x", "a/b/c", "data/x.jsonl")]
    [True, False, False, False, False]
    """
    return bool(_HUB_ID.match(ref)) and not ref.lower().endswith(_FILE_SUFFIXES)


def preflight(cfg: Config) -> None:
    """Raise ConfigError for the first problem found; return None when the config can start."""
    _check_rewards(cfg)
    _check_model(cfg)
    _check_data(cfg)
    _check_advantage(cfg)
    _check_run_dir(cfg)


# ----------------------------------------------------------------------------------------------------------


def _check_rewards(cfg: Config) -> None:
    from gdpo.rewards.bank import BUILTINS, check_reward_kwargs, resolve_reward_fn

    fns = cfg.rewards.functions
    if not fns:
        raise ConfigError("rewards.functions: no rewards configured; add at least one, e.g. "
                          "rewards.functions: [{name: correct, fn: math_correct}]")
    for i, r in enumerate(fns):
        try:
            fn = resolve_reward_fn(r.fn, r.name)
        except ValueError as e:
            raise ConfigError(f"rewards.functions.{i}.fn: {e}") from None
        try:
            check_reward_kwargs(fn, r.kwargs, r.name, builtin=r.fn.strip() in BUILTINS)
        except ValueError as e:
            raise ConfigError(f"rewards.functions.{i}.kwargs: {e}") from None
    code = [i for i, r in enumerate(fns) if r.fn.strip() in _CODE_REWARDS]
    if code and not cfg.rewards.allow_unsandboxed:
        from gdpo.rewards.sandbox import sandbox_refusal

        why = sandbox_refusal()
        if why:
            raise ConfigError(f"rewards.functions.{code[0]}.fn: {fns[code[0]].fn} runs generated code, but {why}")


def _check_local_or_hub(ref: str, key: str, what: str) -> Path | None:
    """The local path of `ref` when it is one; None for a hub id. ConfigError when it is neither."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(ref):
        return None
    raise ConfigError(f"{key}: {ref!r} does not exist (expected {what})")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    model_what = "a local model directory, a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or demo"
    model_dir = None
    if m.name_or_path != "demo":
        model_dir = _check_local_or_hub(m.name_or_path, "model.name_or_path", model_what)
        if model_dir is not None:
            _check_model_dir(model_dir, m.name_or_path, "model.name_or_path")
    if m.ref_name_or_path and cfg.loss.beta > 0:
        ref_dir = _check_local_or_hub(m.ref_name_or_path, "model.ref_name_or_path", model_what)
        if ref_dir is not None:
            _check_model_dir(ref_dir, m.ref_name_or_path, "model.ref_name_or_path")
    # The tokenizer: cheap to load, and a broken one ("Couldn't instantiate the backend tokenizer") is a
    # ValueError deep in transformers. Only local directories: a hub id may need the network.
    key, ref = ("model.tokenizer", m.tokenizer) if m.tokenizer else ("model.name_or_path", m.name_or_path)
    if ref == "demo":
        return
    tok_dir = model_dir if ref == m.name_or_path else _check_local_or_hub(ref, key, "a tokenizer directory or "
                                                                                   "hub id")
    if tok_dir is not None:
        check_tokenizer(str(tok_dir), key, trust_remote_code=m.trust_remote_code)


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pt", "*.pth", "*.gguf")


def _check_model_dir(path: Path, ref: str, key: str) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {ref!r} holds no model (no config.json); expected a directory written by "
                          "save_pretrained, a hub id, or demo")
    if not any(any(path.glob(g)) for g in _WEIGHTS):
        raise ConfigError(f"{key}: {ref!r} holds no weights (no *.safetensors or pytorch_model*.bin next to its "
                          "config.json)")


def check_tokenizer(ref: str, key: str, *, trust_remote_code: bool = False):
    """Load the tokenizer `ref` or raise ConfigError naming `key`; returns it (setup may reuse it)."""
    from gdpo.policy.model import load_tokenizer

    try:
        tok = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError (no backend tokenizer), KeyError...: one line
        text = str(e).strip().splitlines()
        first = (text[0] if text else type(e).__name__)[:200]
        raise ConfigError(f"{key}: cannot load a tokenizer from {ref!r} ({type(e).__name__}: {first})") from None
    # transformers builds an empty tokenizer (one special token) from a directory with no vocabulary files
    if len(tok) < 3:
        raise ConfigError(f"{key}: the tokenizer in {ref!r} has no vocabulary ({len(tok)} tokens); the directory "
                          "lacks tokenizer.json / vocab files")
    return tok


def _check_data(cfg: Config) -> None:
    if cfg.data.path == "demo":
        return
    _check_local_or_hub(cfg.data.path, "data.path",
                        "a .jsonl / .json / .parquet file or directory, a hub dataset id, or demo")


def _check_advantage(cfg: Config) -> None:
    if cfg.advantage.backend != "triton":
        return
    import torch

    from gdpo.advantage import triton_available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(device):
        raise ConfigError("advantage.backend: triton needs CUDA and the triton package (or TRITON_INTERPRET=1 "
                          "for CPU tests); this machine has " + ("no triton" if device == "cuda" else "no GPU")
                          + "; use auto or torch")


def _writable_dir(path: Path) -> str | None:
    """None when `path` (or, if it does not exist yet, its nearest existing ancestor) takes a new file; else why
    not. Tries a real file, so it holds for root and for read-only mounts as well as for permissions."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            return "no existing parent directory"
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is a file, not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".gdpo-write-probe-", dir=probe_dir)
    except OSError as e:
        return f"cannot create files in {probe_dir} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def _check_run_dir(cfg: Config) -> None:
    from gdpo.checkpoint import RunDirError, prepare_run_dir

    run_dir = Path(cfg.train.run_dir).expanduser()
    why = _writable_dir(run_dir)
    if why:
        raise ConfigError(f"train.run_dir: {str(run_dir)!r} is not writable: {why}")
    try:  # inspects only: the same verdict prepare_run_dir gives at start, without moving or writing anything
        prepare_run_dir(run_dir, config=to_dict(cfg), resume=cfg.checkpoint.resume, overwrite=cfg.train.overwrite,
                        dry_run=True)
    except RunDirError as e:
        raise ConfigError(str(e)) from None
