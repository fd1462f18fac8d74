"""Small arithmetic word problems: the task the demo and the benchmarks train on.

Everything here is deterministic given a seed (only ``random.Random`` is used, whose integer and
choice draws are stable across CPython 3.x), so the shipped JSONL files can be regenerated
byte-for-byte with ``python -m gdpo.demo.task --write``.

Two difficulties:

* ``easy``: one operation on small numbers (``a + b <= 10``, ``a - b`` with ``a <= 10``, ``a * b``
  with factors 2..5).
* ``hard``: two chained operations (``a + b - c``, ``a * b + c``, ``a * b - c``), the last two on
  two-digit intermediate results, so a tiny model gets it right much less often. The benchmark
  uses it to make correctness the hard reward while format stays easy.

A completion has the shape ``<think>3 + 5 = 8</think>\\n<answer>8</answer>``. The SFT set mixes in
deliberately flawed completions (wrong result, broken format, padded thinking) so that the
warm-started model is imperfect on every reward and RL has something to improve.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TRAIN_FILE = DATA_DIR / "train.jsonl"
TRAIN_HARD_FILE = DATA_DIR / "train_hard.jsonl"
SFT_FILE = DATA_DIR / "sft.jsonl"

# Seeds and sizes of the shipped files. Disjoint seeds keep RL prompts apart from SFT prompts.
TRAIN_SEED, TRAIN_HARD_SEED, SFT_SEED = 1, 2, 3
N_TRAIN, N_TRAIN_HARD, N_SFT = 1000, 1000, 2000

# No system prompt by default: the SFT phase teaches the format, and every prompt token costs
# forward/backward time on CPU. This one is available for models that need telling.
SYSTEM_PROMPT = "Think inside <think> </think>, then give the number inside <answer> </answer>."

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Eva")
ITEMS = ("apples", "pens", "books", "cards", "eggs", "balls", "coins", "cups", "shells", "stamps")

# Each template: (text, operation). Placeholders: {n} name, {m} second name, {i} item, {a} {b} {c}.
EASY_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?", "add"),
    ("{n} has {a} {i}. {m} gives {n} {b} more. How many {i} does {n} have?", "add"),
    ("{n} has {a} {i} and gives {b} to {m}. How many {i} does {n} have left?", "sub"),
    ("{n} had {a} {i} and lost {b} of them. How many {i} are left?", "sub"),
    ("{n} buys {a} bags with {b} {i} in each bag. How many {i} does {n} buy?", "mul"),
    ("There are {a} boxes and each box holds {b} {i}. How many {i} are there?", "mul"),
)
HARD_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {a} {i}, buys {b} more and then gives {c} to {m}. How many {i} does {n} have now?",
     "add_sub"),
    ("{n} buys {a} bags with {b} {i} in each bag and already had {c}. How many {i} does {n} have?",
     "mul_add"),
    ("There are {a} boxes with {b} {i} in each box and {n} takes {c} of them. How many {i} are left?",
     "mul_sub"),
)

# Filler sentences for the over-long thinking in the SFT mix. Four or five are drawn per padded
# example (25+ tokens), which pushes any completion past LENGTH_LIMIT while well-formed unpadded
# ones stay under it.
FILLER = (
    "let me read the problem again.",
    "I need to be careful here.",
    "first I find the numbers.",
    "then I do the math step by step.",
    "let me check the numbers once more.",
    "so the question asks for the total.",
    "I think this is right but I will check.",
    "ok now I am sure.",
)
EXTRA_TEXT = ("done.", "I hope this is right.", "so the answer is this.")

# Proportions of each (independent) flaw in the SFT mix; see ``make_sft_examples``.
P_WRONG, P_BAD_FORMAT, P_LONG = 0.3, 0.25, 0.5

DIFFICULTIES = ("easy", "hard")

# Length budget of a completion, in tokens of the demo tokenizer. In the SFT mix, well-formed
# unpadded completions take 13-26 tokens and padded ones 39-78 (any format), so "length <= 36"
# separates them whether or not the end-of-turn token is counted.
LENGTH_LIMIT = 36


def _solve(rng: random.Random, op: str) -> tuple[dict[str, int], list[str], int]:
    """Draw operands for ``op``; return them, the reasoning steps and the integer answer."""
    # Easy facts are few (sums up to 10, products of 2..5) so that a ~0.5M-parameter model learns
    # most of them in a one-minute warm start; hard ones chain two steps, and two of the three
    # templates need two-digit sums and differences that only the hard problems exercise.
    if op == "add":
        a = rng.randint(1, 9)
        b = rng.randint(1, 10 - a)
        return {"a": a, "b": b}, [f"{a} + {b} = {a + b}"], a + b
    if op == "sub":
        a = rng.randint(2, 10)
        b = rng.randint(1, a - 1)
        return {"a": a, "b": b}, [f"{a} - {b} = {a - b}"], a - b
    if op == "mul":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return {"a": a, "b": b}, [f"{a} * {b} = {a * b}"], a * b
    if op == "add_sub":  # two easy facts chained
        a = rng.randint(1, 9)
        b = rng.randint(1, 10 - a)
        c = rng.randint(1, a + b - 1)
        steps = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"]
        return {"a": a, "b": b, "c": c}, steps, a + b - c
    if op == "mul_add":  # an easy product, then a two-digit sum the easy set never asks for
        a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
        steps = [f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"]
        return {"a": a, "b": b, "c": c}, steps, a * b + c
    if op == "mul_sub":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        c = rng.randint(1, min(9, a * b - 1))
        steps = [f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"]
        return {"a": a, "b": b, "c": c}, steps, a * b - c
    raise ValueError(f"unknown operation {op!r}")


def _make_one(rng: random.Random, difficulty: str, uid: str) -> tuple[dict[str, str], list[str]]:
    """One problem row and its reasoning steps (used to write SFT completions)."""
    templates = EASY_TEMPLATES if difficulty == "easy" else HARD_TEMPLATES
    text, op = rng.choice(templates)
    name = rng.choice(NAMES)
    other = rng.choice([n for n in NAMES if n != name])
    item = rng.choice(ITEMS)
    nums, steps, answer = _solve(rng, op)
    problem = text.format(n=name, m=other, i=item, **nums)
    return {"id": uid, "problem": problem, "answer": str(answer)}, steps


def _check_difficulty(difficulty: str) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")


def make_problems(n: int, seed: int, difficulty: str = "easy") -> list[dict[str, str]]:
    """``n`` problems as ``{"id", "problem", "answer"}`` (answer: the integer as a string)."""
    _check_difficulty(difficulty)
    rng = random.Random(f"{difficulty}-{seed}")
    return [_make_one(rng, difficulty, f"{difficulty}-{seed}-{k}")[0] for k in range(n)]


def chat_messages(problem: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation a policy sees for one problem (feed to ``apply_chat_template``)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": problem}]


def format_completion(think: str, answer: str) -> str:
    """The target shape: ``<think>…</think>\\n<answer>…</answer>``."""
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def _wrong(rng: random.Random, value: int) -> int:
    """A plausible wrong result: off by a little, never equal to the true one, never negative."""
    delta = rng.choice((-2, -1, 1, 2, 10))
    return value + delta if value + delta >= 0 and delta != 0 else value + abs(delta)


def _sft_completion(rng: random.Random, steps: list[str], answer: int) -> tuple[str, list[str]]:
    """A completion for one problem, flawed at random; returns it and the list of flaws."""
    flaws = []
    think_steps = list(steps)
    final = answer
    if rng.random() < P_WRONG:
        flaws.append("wrong")
        final = _wrong(rng, answer)
        # The error shows up in the last step, as a model's arithmetic slip would.
        lhs = think_steps[-1].rsplit("=", 1)[0]
        think_steps[-1] = f"{lhs}= {final}"
    think = ", ".join(think_steps)
    if rng.random() < P_LONG:
        flaws.append("long")
        filler = " ".join(rng.sample(FILLER, rng.randint(4, 5)))
        think = f"{filler} {think}"
    text = format_completion(think, str(final))
    if rng.random() < P_BAD_FORMAT:
        flaws.append("format")
        kind = rng.randrange(4)
        if kind == 0:  # unterminated answer
            text = text.removesuffix("</answer>")
        elif kind == 1:  # chatter after the answer
            text = f"{text} {rng.choice(EXTRA_TEXT)}"
        elif kind == 2:  # no thinking tags
            text = f"{think}\n<answer>{final}</answer>"
        else:  # no newline between the blocks
            text = text.replace("</think>\n", "</think> ")
    return text, flaws


def make_sft_examples(n: int, seed: int, hard_fraction: float = 0.3) -> list[dict[str, object]]:
    """SFT rows ``{"id", "problem", "answer", "completion", "flaws"}`` mixing both difficulties.

    Flaws are drawn independently (``P_WRONG``, ``P_BAD_FORMAT``, ``P_LONG``); about
    ``(1-P_WRONG)(1-P_BAD_FORMAT)(1-P_LONG)`` of the rows are clean. One SFT set covers both
    difficulties so a single cached warm start serves the demo and the hard benchmark variant.
    """
    rng = random.Random(f"sft-{seed}")
    rows: list[dict[str, object]] = []
    for k in range(n):
        difficulty = "hard" if rng.random() < hard_fraction else "easy"
        row, steps = _make_one(rng, difficulty, f"sft-{seed}-{k}")
        completion, flaws = _sft_completion(rng, steps, int(row["answer"]))
        rows.append({**row, "completion": completion, "flaws": flaws})
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, object]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, object]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_shipped_files(out_dir: str | Path = DATA_DIR) -> list[Path]:
    """(Re)generate the JSONL files that ship in the package; deterministic."""
    out = Path(out_dir)
    files = {
        out / TRAIN_FILE.name: make_problems(N_TRAIN, TRAIN_SEED, "easy"),
        out / TRAIN_HARD_FILE.name: make_problems(N_TRAIN_HARD, TRAIN_HARD_SEED, "hard"),
        out / SFT_FILE.name: make_sft_examples(N_SFT, SFT_SEED),
    }
    for path, rows in files.items():
        write_jsonl(path, rows)
    return list(files)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate the shipped JSONL files")
    parser.add_argument("--out", default=str(DATA_DIR), help="directory to write into")
    args = parser.parse_args(argv)
    if not args.write:
        parser.error("nothing to do; pass --write")
    for path in write_shipped_files(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
