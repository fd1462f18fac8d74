"""The rollout batch, the sampling parameters and the backend protocol every rollout engine follows.

Shapes: N = num_prompts * G rows (each prompt's G samples contiguous: rows i*G .. (i+1)*G-1),
P = longest prompt (prompts LEFT-padded), T = longest completion (completions RIGHT-padded).
`cat([prompt_ids, completion_ids], 1)` is therefore one left/right padded sequence per row whose
prompt ends at column P-1 for every row, which is what the log-prob code relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence, runtime_checkable

import torch


def timing_stats(seconds: float, lengths: torch.Tensor) -> dict[str, float]:
    """The rollout stats every backend logs: wall time, completion tokens [N] summed, and tokens per second."""
    n_tokens = float(lengths.sum())
    return {
        "rollout/seconds": seconds,
        "rollout/tokens_per_second": n_tokens / max(seconds, 1e-9),
        "rollout/completion_tokens": n_tokens,
    }


def stop_token_ids(tokenizer, generation_config=None, extra: Sequence[int] = ()) -> list[int]:
    """The token ids that end a completion, the same set for every backend: the tokenizer's EOS, then the
    checkpoint's ``generation_config.eos_token_id`` (an int or a list: Qwen2.5-Instruct's lists 151645
    <|im_end|> and 151643 <|endoftext|>, and its tokenizer's EOS is only the first), then `extra` (the
    configured stop ids); duplicates dropped, order kept.

    >>> tok = type("Tok", (), {"eos_token_id": 151645})()
    >>> stop_token_ids(tok, type("Gen", (), {"eos_token_id": [151645, 151643]})(), extra=(7,))
    [151645, 151643, 7]
    """
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    gen = getattr(generation_config, "eos_token_id", None)
    if gen is not None:
        ids.extend(int(i) for i in ([gen] if isinstance(gen, int) else gen))
    ids.extend(int(i) for i in extra)
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn; the same fields map onto `generate` (hf) and vLLM's SamplingParams."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0  # EOS / stop ids are suppressed before this many tokens (benchmarks: fixed lengths)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    stop_strings: tuple[str, ...] = ()  # generation of a row ends once its text ends with one of these
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a completion, besides the EOS ids (see stop_token_ids)
    return_logprobs: bool = False  # keep the log-prob of each sampled token under the sampling distribution

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        # Accept lists from YAML; a tuple keeps the dataclass hashable.
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))


@dataclass
class RolloutBatch:
    """Prompts and their sampled completions, G per prompt, contiguous per prompt."""

    prompt_ids: torch.Tensor  # [N, P] long, left-padded with pad_id
    prompt_mask: torch.Tensor  # [N, P] long, 1 on prompt tokens
    completion_ids: torch.Tensor  # [N, T] long, right-padded with pad_id
    completion_mask: torch.Tensor  # [N, T] long, 1 up to and including the first EOS / stop token
    completion_lengths: torch.Tensor  # [N] long, = completion_mask.sum(1)
    truncated: torch.Tensor  # [N] bool, no EOS / stop within max_new_tokens
    completion_texts: list[str]  # N decoded completions (special tokens skipped, stop string kept)
    group_size: int  # G
    sampling_logprobs: torch.Tensor | None = None  # [N, T] float32, 0 where mask is 0; None if not kept
    stats: dict[str, float] = field(default_factory=dict)  # timings etc. for logging

    @property
    def num_rows(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return self.num_rows // self.group_size

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def input_ids(self) -> torch.Tensor:
        """[N, P + T] prompt then completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """[N, P + T]; completion padding (after EOS) is masked out."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def rows(self, idx: torch.Tensor | Sequence[int] | slice) -> "RolloutBatch":
        """A sub-batch of rows (for minibatches). group_size is kept: slice whole groups if that matters."""
        if isinstance(idx, slice):
            ids = list(range(self.num_rows))[idx]
        else:
            ids = [int(i) for i in idx]
        t = torch.tensor(ids, dtype=torch.long)
        return replace(
            self,
            prompt_ids=self.prompt_ids[t],
            prompt_mask=self.prompt_mask[t],
            completion_ids=self.completion_ids[t],
            completion_mask=self.completion_mask[t],
            completion_lengths=self.completion_lengths[t],
            truncated=self.truncated[t],
            completion_texts=[self.completion_texts[i] for i in ids],
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs[t],
            stats=dict(self.stats),
        )

    def select_groups(self, groups: torch.Tensor | Sequence[int]) -> "RolloutBatch":
        """The rows of the given groups (prompt indices [P']), in that order: [P' * G] rows."""
        g = torch.as_tensor(groups, dtype=torch.long).view(-1, 1)  # [P', 1]
        return self.rows((g * self.group_size + torch.arange(self.group_size)).flatten())  # [P' * G]

    @staticmethod
    def cat(parts: Sequence["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Concatenate batches of one group size whose prompt / completion widths differ: prompts are
        left-padded (with pad_id, mask 0) to the widest, completions right-padded. ``stats`` (per-call timings)
        are not merged: the caller that made the calls aggregates them."""
        if not parts:
            raise ValueError("RolloutBatch.cat needs at least one batch")
        if len({b.group_size for b in parts}) > 1:
            raise ValueError(f"cannot concatenate group sizes {sorted({b.group_size for b in parts})}")
        if len(parts) == 1:
            return parts[0]
        p_w = max(b.prompt_len for b in parts)
        t_w = max(b.completion_ids.shape[1] for b in parts)

        def left(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (p_w - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, t_w - x.shape[1]), value=value)

        logps = None
        if all(b.sampling_logprobs is not None for b in parts):
            logps = torch.cat([right(b.sampling_logprobs, 0.0) for b in parts])
        return RolloutBatch(
            prompt_ids=torch.cat([left(b.prompt_ids, pad_id) for b in parts]),
            prompt_mask=torch.cat([left(b.prompt_mask, 0) for b in parts]),
            completion_ids=torch.cat([right(b.completion_ids, pad_id) for b in parts]),
            completion_mask=torch.cat([right(b.completion_mask, 0) for b in parts]),
            completion_lengths=torch.cat([b.completion_lengths for b in parts]),
            truncated=torch.cat([b.truncated for b in parts]),
            completion_texts=[t for b in parts for t in b.completion_texts],
            group_size=parts[0].group_size,
            sampling_logprobs=logps,
        )

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(
            self,
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
            completion_lengths=self.completion_lengths.to(device),
            truncated=self.truncated.to(device),
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs.to(device),
        )


@runtime_checkable
class RolloutEngine(Protocol):
    """A rollout backend: hf (gdpo's own decode loop on the live policy) or vllm (a colocated engine)."""

    def generate(self, prompt_ids: list[list[int]], n: int) -> RolloutBatch:
        """Sample n completions for each prompt; rows i*n .. (i+1)*n-1 belong to prompt i."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (no-op if it uses the model itself)."""
        ...
