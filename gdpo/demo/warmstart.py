"""Supervised warm start of the tiny demo model on the shipped SFT mix, cached on disk.

RL from a random init would never see a reward, so the demo first fits the model to
``sft.jsonl`` (mostly correct, formatted completions, with deliberate flaws mixed in) for a few
hundred steps. The result is saved with ``save_pretrained`` (model + tokenizer) so the trainer,
and later a vLLM server, load it like any Hugging Face checkpoint.

Caching: the output directory is written under a temporary name and renamed into place only once
complete, with a marker file recording the settings. A directory with a matching marker is reused;
a stale one (different settings) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from gdpo.demo.model import build_model
from gdpo.demo.task import SFT_FILE, chat_messages, read_jsonl
from gdpo.demo.tokenizer import build_tokenizer

MARKER = "warmstart_complete.json"
# Part of the cache key: bump when the tokenizer, the model shape or the training recipe changes.
RECIPE_VERSION = 1


def encode_example(
    tokenizer: PreTrainedTokenizerBase, problem: str, completion: str
) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt and of the completion (which ends with the EOS token)."""
    prompt = tokenizer.apply_chat_template(chat_messages(problem), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def _batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, attention mask and labels (-100 on prompt and padding: the loss is on the
    completion only)."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(p + c)
        labels[row, len(p) : n] = torch.tensor(c)
        mask[row, :n] = 1
    return ids, mask, labels


def _length_bucketed_batches(
    data: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """One epoch of index batches, each drawn from examples of similar length.

    Padded and unpadded completions differ ~3x in length; batching them together wastes about a
    third of the compute on padding. Sorting within shuffled windows of 16 batches keeps batches
    random while making them nearly pad-free.
    """
    order = rng.sample(range(len(data)), len(data))
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(data[i][0]) + len(data[i][1]))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _settings_match(out: Path, settings: dict[str, object]) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("settings") == settings


def warm_start(
    run_dir: str | Path,
    *,
    steps: int = 800,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup_steps: int = 30,
    sft_file: str | Path = SFT_FILE,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train (or reuse) the warm-started model; return the directory holding model + tokenizer.

    The directory is ``cache_dir`` if given, else ``<run_dir>/sft``. AdamW with linear warmup and
    cosine decay to 10 % of ``lr``; loss is the mean cross-entropy over completion tokens.
    """
    out = Path(cache_dir) if cache_dir is not None else Path(run_dir) / "sft"
    settings = {"recipe": RECIPE_VERSION, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                "warmup_steps": warmup_steps, "sft_sha256": _sha256(sft_file)}
    say = log or (lambda _msg: None)
    if _settings_match(out, settings):
        say(f"warm start: reusing {out}")
        return out

    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.train()
    rows = read_jsonl(sft_file)
    data = [encode_example(tokenizer, str(r["problem"]), str(r["completion"])) for r in rows]
    rng = random.Random(seed)  # batch order; independent of torch's global RNG
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    batches: list[list[int]] = []
    loss_ema = first_loss = last_loss = float("nan")
    for step in range(steps):
        if not batches:
            batches = _length_bucketed_batches(data, batch_size, rng)
        ids, mask, labels = _batch([data[i] for i in batches.pop()], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last_loss = loss.item()
        if step == 0:
            first_loss = loss_ema = last_loss
        loss_ema = 0.95 * loss_ema + 0.05 * last_loss
        if (step + 1) % 100 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            say(f"warm start: step {step + 1}/{steps} loss {loss_ema:.3f} ({elapsed:.0f}s)")

    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write everything under a temporary sibling, marker last, then swap it in with one rename, so
    # an interrupted run never leaves a directory that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {"settings": settings, "first_loss": first_loss, "last_loss": last_loss,
                   "smoothed_loss": loss_ema, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(summary, indent=1))
        if out.exists():
            shutil.rmtree(out)  # stale: other settings, or an incomplete leftover
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"warm start: saved {out} in {time.perf_counter() - start:.0f}s")
    return out
