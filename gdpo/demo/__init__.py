"""The embedded default task behind ``make demo``: arithmetic word problems, a tokenizer and a tiny
Qwen2 model built in code, and a cached supervised warm start. Nothing is downloaded.

A second task, ``gdpo.demo.independent`` (an easy and a hard question per prompt, three independent rewards),
backs ``benchmarks/reproduce.py --task independent``; it shares this package's tokenizer, model and warm start.

Exports are resolved lazily (PEP 562) so that ``python -m gdpo.demo.task --write`` does not import
``gdpo.demo.task`` twice, and so that importing the package does not pull in torch/transformers
until a model or tokenizer is actually asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DATA_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DemoTask:
    """What a demo run needs to know about the task; the trainer config refers to these."""

    train_file: Path = _DATA_DIR / "train.jsonl"  # easy: every reward rises within a minute of RL
    train_hard_file: Path = _DATA_DIR / "train_hard.jsonl"  # two-step: correctness is the hard reward
    sft_file: Path = _DATA_DIR / "sft.jsonl"  # flawed-on-purpose completions for the warm start
    length_limit: int = 36  # completion tokens the length reward allows (= task.LENGTH_LIMIT)
    system_prompt: str | None = None  # the SFT phase teaches the format; no system turn
    prompt_field: str = "problem"
    answer_field: str = "answer"


DEMO = DemoTask()

_EXPORTS = {
    "build_model": "gdpo.demo.model",
    "tiny_qwen2_config": "gdpo.demo.model",
    "build_tokenizer": "gdpo.demo.tokenizer",
    "warm_start": "gdpo.demo.warmstart",
    "LENGTH_LIMIT": "gdpo.demo.task",
    "SFT_FILE": "gdpo.demo.task",
    "SYSTEM_PROMPT": "gdpo.demo.task",
    "TRAIN_FILE": "gdpo.demo.task",
    "TRAIN_HARD_FILE": "gdpo.demo.task",
    "chat_messages": "gdpo.demo.task",
    "format_completion": "gdpo.demo.task",
    "make_problems": "gdpo.demo.task",
    "make_sft_examples": "gdpo.demo.task",
    "read_jsonl": "gdpo.demo.task",
    "write_jsonl": "gdpo.demo.task",
}

__all__ = ["DEMO", "DemoTask", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
