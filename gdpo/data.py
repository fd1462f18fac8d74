"""Prompt datasets: load rows, map fields, render + tokenize every prompt up front, iterate in seeded order.

Everything that can be wrong with a row (missing field, wrong type, empty prompt, prompt over the
token limit or the model's context, a .jsonl line that is not UTF-8 or not JSON) is found when the dataset
is built, before training starts: the row is skipped and counted per reason (`on_error="skip"`), or the
build fails listing the first bad rows (`on_error="error"`). The training loop only ever sees valid,
tokenized prompts, never a truncated one.

Fields are dotted paths into a row (`reward_model.ground_truth`; a digit indexes a list). The prompt
field is either a string or already a list of chat messages `[{"role", "content"}, ...]` (used as is; the
system prompt is only added if the list has none). A string prompt is rendered by `render_prompt`, the
one renderer training and `gdpo.eval` share: the template is filled first (`{name}` placeholders name any
field of the row, `{prompt}` the prompt field; `{{` / `}}` are literal braces), then the chat template is
applied (with the system prompt, itself a template, as a system turn), independently of each other.

Order: epoch e visits every example once in `randperm(seed + e)` order (or in file order without
shuffling); the iterator state is just (epoch, position), so a checkpoint stores two ints.
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

ON_ERROR = ("skip", "error")  # the words of data.on_bad_row
_MISSING = object()


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _BadLine:
    """A .jsonl line that did not parse (kept as a row so it is counted, not raised, at build time)."""

    lineno: int
    reason: str  # bad_json | not_utf8
    error: str


def read_rows(source: str | os.PathLike, *, split: str = "train", subset: str | None = None) -> list[Any]:
    """Raw rows from a local .jsonl / .json / .parquet file, or a `datasets` hub id (or local dataset dir).

    A .jsonl line that is not UTF-8 or not valid JSON becomes a `_BadLine` row, counted as a bad row later (with
    its line number); a UTF-8 byte-order mark at the start of a .jsonl / .json file is accepted.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".ndjson"):
        rows: list[Any] = []
        with open(path, "rb") as f:  # decoded line by line: one bad byte costs one row, not the file
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append(_BadLine(lineno, "not_utf8", f"byte {raw[e.start]:#04x} at column {e.start + 1} "
                                                             "is not UTF-8"))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_BadLine(lineno, "bad_json", str(e)))
        return rows
    if path.is_file() and suffix == ".json":
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is accepted
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the split, else the only list
            lists = {k: v for k, v in data.items() if isinstance(v, list)}
            data = (
                lists.get(split)
                if split in lists
                else (next(iter(lists.values())) if len(lists) == 1 else None)
            )
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        return data
    if path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    import datasets

    try:
        if path.is_dir() and (path / "dataset_info.json").exists():  # a `save_to_disk` directory
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(source), subset, split=split)
    except Exception as e:  # offline, unknown id, ...: fail at start with the cause
        raise ValueError(f"could not load dataset {str(source)!r} (split={split!r}): {e}") from e
    return ds.to_list()


def select_rows(rows: Sequence[Any], where: Mapping[str, Any] | None) -> list[Any]:
    """The rows whose fields equal `where`'s values (`data.where`); unreadable lines and non-dict rows are kept,
    so that they are still counted as bad rows.

    >>> select_rows([{"split": "train", "x": 1}, {"split": "test"}, {"x": 2}], {"split": "train"})
    [{'split': 'train', 'x': 1}]
    """
    if not where:
        return list(rows)
    return [r for r in rows if not isinstance(r, dict) or all(get_field(r, k) == v for k, v in where.items())]


def get_field(row: Any, path: str, default: Any = _MISSING) -> Any:
    """row["a"]["b"] for path "a.b"; a digit part indexes a list. `default` (or _MISSING) when absent."""
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return cur


# --------------------------------------------------------------------------------------------- render
#
# The one prompt renderer, shared by training (build_prompt_dataset) and evaluation (gdpo.eval):
#   1. the template is filled: `str.format`-style placeholders, `{name}` = the row's field `name`
#      (a dotted path, `{reward_model.ground_truth}`; `{prompt}` = the configured prompt field), `{{` and
#      `}}` are literal braces (so YAML `\\boxed{{}}` reaches the model as `\boxed{}`), `{name:spec}` /
#      `{name!r}` format as in Python. The system prompt is a template too.
#   2. the chat template wraps the result as one user turn (system turn first when a system prompt is set);
#      without the chat template the text is the system prompt, a blank line, then the filled template.
# The result is exactly the text the model is given (tokenized without extra special tokens when the chat
# template was applied: the template writes any BOS itself).


def template_fields(template: str, what: str = "data.prompt_template") -> list[str]:
    """The placeholder names of a template, in order; ValueError naming `what` when it is malformed.

    >>> template_fields("Q: {prompt} {meta.level} within \\\\boxed{{}}.")
    ['prompt', 'meta.level']
    >>> template_fields("a {b")
    Traceback (most recent call last):
    ...
    ValueError: data.prompt_template: 'a {b' is not a valid template (expected '}' before end of string); \
write literal braces as {{ and }}
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"{what}: {template!r} is not a valid template ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    names = []
    for _, name, _, _ in parts:
        if name is None:
            continue
        if not name or name.isdigit() or "[" in name:
            raise ValueError(
                f"{what}: placeholder {{{name}}} in {template!r} must name a field (e.g. {{prompt}}, "
                "{reward_model.ground_truth}); write literal braces as {{ and }}"
            )
        names.append(name)
    return names


def fill_template(template: str, values: Mapping[str, Any], what: str = "data.prompt_template") -> str:
    """`template` with every placeholder replaced by `values[name]` (see `template_fields`).

    >>> fill_template("{prompt} Put the answer in \\\\boxed{{}}.", {"prompt": "1+1?"})
    '1+1? Put the answer in \\\\boxed{}.'
    """
    out = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if name not in values:
            raise KeyError(name)
        value = values[name]
        if conv:
            value = {"r": repr, "s": str, "a": ascii}[conv](value)
        try:
            out.append(format(value, spec or ""))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: cannot format {{{name}:{spec}}} with {value!r} ({e})") from None
    return "".join(out)


def _template_values(row: Any, names: Sequence[str], prompt: Any, prompt_field: str) -> dict[str, Any]:
    """Placeholder values from one row (missing fields are left out)."""
    values: dict[str, Any] = {}
    for name in names:
        value = prompt if name in ("prompt", prompt_field) else get_field(row, name)
        if value is not _MISSING:
            values[name] = value
    return values


def render_prompt(
    tokenizer,
    *,
    prompt: Any,
    row: Mapping[str, Any] | None = None,
    prompt_field: str = "prompt",
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> str:
    """The exact text the model sees for one prompt (see the comment above for the rules).

    prompt: the prompt field's value, a string or a list of chat messages ({role, content}); messages are used
    as is (no template), with the system prompt added only when they have no system turn. row: the dataset row
    the other placeholders read from. Raises KeyError(name) when a placeholder's field is missing from the row.

    >>> from gdpo.testing import tiny_tokenizer
    >>> print(render_prompt(tiny_tokenizer(), prompt="2+2?", prompt_template="{prompt} Use \\\\boxed{{}}.",
    ...                     system_prompt="Be brief."))
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    2+2? Use \\boxed{}.<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    >>> render_prompt(None, prompt="2+2?", use_chat_template=False, system_prompt="Be brief.")
    'Be brief.\\n\\n2+2?'
    """
    row = row if row is not None else {}
    system = None
    if system_prompt:
        names = template_fields(system_prompt, "data.system_prompt")
        system = fill_template(system_prompt, _template_values(row, names, prompt, prompt_field), "data.system_prompt")
    if isinstance(prompt, str):
        if prompt_template is None:
            content = prompt
        else:
            names = template_fields(prompt_template)
            content = fill_template(prompt_template, _template_values(row, names, prompt, prompt_field))
        messages = [{"role": "user", "content": content}]
    else:
        if prompt_template is not None:
            raise ValueError("data.prompt_template applies to string prompts; this prompt is a list of chat "
                             "messages (unset the template, or point data.prompt_field at a string field)")
        messages = list(prompt)
        content = None
    if not use_chat_template:
        if content is None:
            raise ValueError("a list of chat messages needs the chat template (data.use_chat_template: true)")
        return f"{system}\n\n{content}" if system else content
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_template_columns(
    rows: Sequence[Any], prompt_field: str, prompt_template: str | None, system_prompt: str | None
) -> None:
    """Fail at start when a template names a field that no row has (a typo would otherwise skip every row).

    A field missing from only some rows makes those rows bad rows (counted / fatal per on_bad_row).
    """
    for template, what in ((prompt_template, "data.prompt_template"), (system_prompt, "data.system_prompt")):
        if not template:
            continue
        for name in template_fields(template, what):
            if name in ("prompt", prompt_field):
                continue
            dicts = [r for r in rows if isinstance(r, dict)]
            if dicts and all(get_field(r, name) is _MISSING for r in dicts):
                cols = ", ".join(sorted(dicts[0])) if dicts else ""
                raise ValueError(f"{what}: placeholder {{{name}}} names a field that no row has; the rows' "
                                 f"fields are: {cols} ({{prompt}} is data.prompt_field {prompt_field!r})")


# ------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class PromptExample:
    row: int  # index of the row in the source
    prompt_ids: list[int]  # tokenized, rendered prompt
    prompt_text: str  # the rendered prompt (chat template applied)
    answer: Any  # the answer field (numbers made str), or None without an answer field
    extras: dict[str, Any]  # extra columns for the rewards, by their configured name


@dataclass
class PromptDataset:
    examples: list[PromptExample]
    num_rows: int  # rows read, valid or not
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    first_bad: list[str] = field(default_factory=list)  # the first bad rows, "line 7: not_utf8 (...)"

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]

    def skipped_summary(self) -> str:
        """One line for the start-up log ('' when nothing was skipped)."""
        if not self.skipped:
            return ""
        return (f"skipped {sum(self.skipped.values())} of {self.num_rows} rows {dict(self.skipped)}; first: "
                + "; ".join(self.first_bad))


def _as_messages(prompt: Any) -> list[dict] | None:
    """A chat-message list if `prompt` is one ([{role: str, content: str}, ...]), else None."""
    if not isinstance(prompt, list) or not prompt:
        return None
    for m in prompt:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _check_row(
    row: Any,
    prompt_field: str,
    answer_field: str | None,
    extra_fields: dict[str, str],
    use_chat_template: bool,
    template_names: Sequence[str],
    has_template: bool,
) -> tuple[str | None, Any, Any, dict]:
    """(error reason or None, prompt (str | messages), answer, extras)."""
    if isinstance(row, _BadLine):
        return row.reason, None, None, {}
    if not isinstance(row, dict):
        return "bad_row_type", None, None, {}
    prompt = get_field(row, prompt_field)
    if prompt is _MISSING or prompt is None:
        return "missing_prompt", None, None, {}
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty_prompt", None, None, {}
    else:
        msgs = _as_messages(prompt)
        if msgs is None:
            return "bad_prompt_type", None, None, {}
        if not use_chat_template:
            return "messages_without_chat_template", None, None, {}
        if has_template:
            return "messages_with_prompt_template", None, None, {}
        if not any(m["content"].strip() for m in msgs):
            return "empty_prompt", None, None, {}
        prompt = msgs
    for name in template_names:
        if name not in ("prompt", prompt_field) and get_field(row, name) is _MISSING:
            return f"missing_{name}", None, None, {}
    answer = None
    if answer_field is not None:
        answer = get_field(row, answer_field)
        if answer is _MISSING or answer is None:
            return "missing_answer", None, None, {}
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            return "bad_answer_type", None, None, {}
        answer = answer if isinstance(answer, str) else str(answer)
    extras = {}
    for name, path in extra_fields.items():
        value = get_field(row, path)
        if value is _MISSING:
            return f"missing_{name}", None, None, {}
        extras[name] = value
    return None, prompt, answer, extras


def prompt_token_limit(
    max_prompt_tokens: int | None, context_length: int | None, max_new_tokens: int = 0
) -> int | None:
    """The longest prompt allowed: `max_prompt_tokens`, and at most the model's context minus the completion.

    context_length: the model's `max_position_embeddings` (None = unknown, no context check). ValueError when
    `max_new_tokens` leaves no room for any prompt.

    >>> prompt_token_limit(1024, 4096, 3500), prompt_token_limit(1024, None, 3500), prompt_token_limit(None, 8, 2)
    (596, 1024, 6)
    """
    if context_length is None:
        return max_prompt_tokens
    room = int(context_length) - int(max_new_tokens)
    if room < 1:
        raise ValueError(f"rollout.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context_length} tokens (max_position_embeddings)")
    return room if max_prompt_tokens is None else min(max_prompt_tokens, room)


def _tokenize(kept: list, tokenizer, use_chat_template: bool, count, *, context_room: int | None,
              limit: int | None, why_context: str, why_limit: str) -> list[PromptExample]:
    """Tokenize the rendered prompts (one batched, Rust-side call) and drop, counted, those that do not fit:
    never truncated. The chat template already wrote any BOS."""
    texts = [t for _, t, _, _ in kept]
    ids = tokenizer(texts, add_special_tokens=not use_chat_template)["input_ids"] if texts else []
    examples = []
    for (i, text, answer, extras), prompt_ids in zip(kept, ids):
        n = len(prompt_ids)
        if context_room is not None and n > context_room:
            count(i, "prompt_exceeds_context", f"{n} tokens + {why_context}")
            continue
        if limit is not None and n > limit:
            count(i, "prompt_too_long", f"{n} > {why_limit}")
            continue
        examples.append(
            PromptExample(row=i, prompt_ids=list(prompt_ids), prompt_text=text, answer=answer, extras=extras)
        )
    return examples


def build_prompt_dataset(
    rows: Sequence[Any],
    tokenizer,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = None,
    extra_fields: dict[str, str] | None = None,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
    context_length: int | None = None,
    max_new_tokens: int = 0,
    on_error: str = "skip",
) -> PromptDataset:
    """Validate, render (`render_prompt`) and tokenize every row (see the module docstring for the rules).

    prompt_template / use_chat_template: independent; the template is filled first, then the chat template is
    applied when `use_chat_template` (pass the config's two values straight through). None = the prompt as is.
    max_prompt_tokens, context_length, max_new_tokens: a prompt longer than `prompt_token_limit(...)` is a bad
    row (`prompt_too_long` / `prompt_exceeds_context`), never truncated.
    on_error: "skip" (count bad rows) or "error" (fail listing the first ones), as `data.on_bad_row`.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_bad_row must be one of {ON_ERROR}, got {on_error!r}")
    if prompt_template == "{prompt}":
        prompt_template = None  # the identity template
    template_names = template_fields(prompt_template) if prompt_template else []
    system_names = template_fields(system_prompt, "data.system_prompt") if system_prompt else []
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "use_chat_template=True but the tokenizer has no chat template; "
            "set use_chat_template=False and a raw prompt_template"
        )
    check_template_columns(rows, prompt_field, prompt_template, system_prompt)
    extra_fields = dict(extra_fields or {})
    context_room = None if context_length is None else prompt_token_limit(None, context_length, max_new_tokens)
    limit = prompt_token_limit(max_prompt_tokens, context_length, max_new_tokens)

    skipped: Counter[str] = Counter()
    bad: list[str] = []

    def count(i: int, reason: str, detail: str = "") -> None:
        skipped[reason] += 1
        if len(bad) < 5:
            row = rows[i]
            where = f"line {row.lineno}" if isinstance(row, _BadLine) else f"row {i}"
            bad.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    kept: list[tuple[int, str, Any, dict]] = []  # (row, rendered text, answer, extras)
    for i, row in enumerate(rows):
        reason, prompt, answer, extras = _check_row(
            row, prompt_field, answer_field, extra_fields, use_chat_template,
            template_names + system_names, prompt_template is not None,
        )
        if reason is not None:
            count(i, reason, row.error if isinstance(row, _BadLine) else "")
            continue
        text = render_prompt(tokenizer, prompt=prompt, row=row, prompt_field=prompt_field,
                             prompt_template=prompt_template, system_prompt=system_prompt,
                             use_chat_template=use_chat_template)
        kept.append((i, text, answer, extras))

    examples = _tokenize(kept, tokenizer, use_chat_template, count, context_room=context_room, limit=limit,
                         why_context=f"rollout.max_new_tokens {max_new_tokens} > the model's context {context_length}",
                         why_limit=f"data.max_prompt_tokens {max_prompt_tokens}")

    if skipped and on_error == "error":
        raise ValueError(f"{sum(skipped.values())} bad rows {dict(skipped)} (data.on_bad_row: error); first: "
                         f"{'; '.join(bad)}")
    if not examples:
        raise ValueError(
            f"no valid prompts in {len(rows)} rows (skipped: {dict(skipped)}; first: {'; '.join(bad)})"
        )
    return PromptDataset(examples=examples, num_rows=len(rows), skipped=dict(skipped), first_bad=bad)


def load_prompt_dataset(
    source: str | os.PathLike,
    tokenizer,
    *,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
    where: Mapping[str, Any] | None = None,
    **kwargs,
) -> PromptDataset:
    """`read_rows` + `select_rows(where)` + `build_prompt_dataset` (kwargs as there). limit: keep the first
    `limit` rows (after `where`)."""
    rows = select_rows(read_rows(source, split=split, subset=subset), where)
    if limit is not None:
        rows = rows[:limit]
    return build_prompt_dataset(rows, tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------- iterator


@dataclass
class PromptBatch:
    """B prompts for one step (lists: prompts are ragged). Expand by G for per-completion rewards."""

    indices: list[int]  # dataset indices
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    answers: list[Any]
    extras: dict[str, list[Any]]  # extra field name -> B values

    def __len__(self) -> int:
        return len(self.indices)


def collate(dataset: PromptDataset, indices: Iterable[int]) -> PromptBatch:
    exs = [dataset[i] for i in indices]
    names = exs[0].extras.keys() if exs else ()
    return PromptBatch(
        indices=[int(i) for i in indices],
        prompt_ids=[e.prompt_ids for e in exs],
        prompt_texts=[e.prompt_text for e in exs],
        answers=[e.answer for e in exs],
        extras={n: [e.extras[n] for e in exs] for n in names},
    )


class PromptIterator:
    """Endless (or `num_epochs`-long) batches of dataset indices in a seeded per-epoch order.

    A batch that reaches the end of an epoch is filled from the start of the next, so each epoch
    visits every example exactly once and no batch is short (except the very last one when
    `num_epochs` is set). State = (epoch, position): `state_dict()` goes into checkpoints.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0  # next index into this epoch's order
        self._order: list[int] | None = None
        self._order_epoch = -1

    def order(self, epoch: int) -> list[int]:
        """The visiting order of one epoch (a pure function of seed and epoch)."""
        if not self.shuffle:
            return list(range(self.num_examples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def _current(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.order(self.epoch), self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                break
            order = self._current()
            take = order[self.position : self.position + self.batch_size - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= self.num_examples:
                self.epoch += 1
                self.position = 0
        if not out:
            raise StopIteration
        return out

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        return self.next_indices()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_examples", self.num_examples) != self.num_examples:
            raise ValueError(
                f"data position was saved for {state['num_examples']} examples, the dataset now has "
                f"{self.num_examples}: the data or its filters changed since the checkpoint"
            )
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = -1
