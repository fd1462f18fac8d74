"""The evaluation loop: completions from a source -> graded samples on disk -> per-benchmark metrics.

Pieces
- `CompletionSource` (Protocol): given problems and k, return k completions per problem with their lengths
  and truncation flags. `ModelSource` wraps a rollout engine (hf now, vLLM when gdpo.rollout.vllm exists);
  `OracleSource` returns a dataset field (e.g. MATH-500's reference `solution`), optionally shuffled across
  problems, which checks the grader without a model.
- Grading runs in a fork pool (math-verify's signal timeouts need each call in a process's main thread),
  overlapped with generating the next batch of problems.
- Samples are appended to ``samples.jsonl`` after every batch; a rerun with the same output directory and
  settings (``run_config.json``) skips the problems that already have all k samples.
- Data parallel: with RANK / WORLD_SIZE set (torchrun, or by hand with one GPU per process), problem number g
  (counted over all benchmarks) belongs to rank g % WORLD_SIZE. Each rank appends to its own
  ``samples.rank<r>.jsonl``; rank 0 waits until every problem has its k samples in those files, merges them
  into ``samples.jsonl`` and writes the results. Ranks share nothing but the output directory (on a shared
  filesystem for multi-node runs), so no process group is needed and a vLLM engine per rank owns its own.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gdpo.eval.benchmarks import Benchmark, EvalInputError, Problem, is_tool_task
from gdpo.eval.metrics import ProblemGrades, cluster_answers, summarize

# DeepSeek-R1's recommended math prompt (no system prompt), used by DeepScaleR and the paper's evaluations. A
# template of gdpo.data.render_prompt: {problem} = the problem, {{ }} = literal braces.
DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
SAMPLES = "samples.jsonl"
RESULTS = "results.json"
RUN_CONFIG = "run_config.json"


# -------------------------------------------------------------------------------------- completion sources


@dataclass
class Completions:
    texts: list[str]  # [P*k]; rows i*k .. (i+1)*k-1 belong to problem i
    lengths: list[int]  # [P*k] in the source's length unit
    truncated: list[bool]  # [P*k] stopped by the token limit rather than by EOS / a stop string


class CompletionSource(Protocol):
    length_unit: str  # what `Completions.lengths` counts: "tokens", "whitespace words", ...

    def prepare(self, benchmark: str, problems: Sequence[Problem]) -> None:
        """Called once per benchmark with all its problems before any `complete` on them."""
        ...

    def complete(self, problems: Sequence[Problem], k: int, *, seed: int) -> Completions:
        """k completions for each problem (rows i*k .. (i+1)*k-1 for problem i)."""
        ...


def render_prompt(problem: str, template: str, system_prompt: str | None, tokenizer, use_chat_template: bool,
                  row: dict | None = None) -> str:
    """The prompt text, by the renderer training uses (`gdpo.data.render_prompt`): `template` filled first
    ({problem} / {prompt} = the problem, {name} = the row's field `name`, {{ }} = literal braces), then the chat
    template when `use_chat_template`."""
    from gdpo.data import render_prompt as render

    try:
        return render(tokenizer, prompt=problem, row=row or {}, prompt_field="problem", prompt_template=template,
                      system_prompt=system_prompt, use_chat_template=use_chat_template)
    except KeyError as e:
        raise EvalInputError(f"--prompt-template {template!r}: the problem has no field {e.args[0]!r}") from None
    except ValueError as e:
        raise EvalInputError(str(e).replace("data.prompt_template", "--prompt-template")) from None


class ModelSource:
    """Completions sampled from a model by a rollout engine (`engine.generate(prompt_ids, n) -> RolloutBatch`)."""

    length_unit = "tokens"

    def __init__(self, engine, tokenizer, *, prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                 system_prompt: str | None = None, use_chat_template: bool = True,
                 benchmark_templates: dict[str, str] | None = None, tool_prompt: str = "toolrl"):
        """benchmark_templates: a benchmark's own template (code benchmarks), used for its problems instead of
        `prompt_template`. tool_prompt: the tool-calling problems' format, "toolrl" or "chat"."""
        self.engine = engine
        self.tool_prompt = tool_prompt  # tool-calling problems: "toolrl" or "chat" (gdpo.eval.toolcall)
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.benchmark_templates = dict(benchmark_templates or {})
        self._template = prompt_template

    def prepare(self, benchmark: str, problems: Sequence[Problem]) -> None:
        self._template = self.benchmark_templates.get(benchmark, self.prompt_template)

    def prompt_text(self, problem: Problem, benchmark: str | None = None) -> str:
        if is_tool_task(problem.task):
            from gdpo.eval.toolcall import tool_prompt_text

            return tool_prompt_text(problem.task, problem.row, self.tokenizer, self.tool_prompt,
                                    self.use_chat_template)
        template = self._template if benchmark is None else self.benchmark_templates.get(benchmark,
                                                                                        self.prompt_template)
        return render_prompt(problem.problem, template, self.system_prompt, self.tokenizer,
                             self.use_chat_template, row=dict(problem.row))

    def prompt_ids(self, problem: Problem) -> list[int]:
        # A rendered chat template already holds any BOS it wants; raw text gets the tokenizer's specials.
        enc = self.tokenizer(self.prompt_text(problem), add_special_tokens=not self.use_chat_template)
        return list(enc["input_ids"])

    def complete(self, problems: Sequence[Problem], k: int, *, seed: int) -> Completions:
        import torch

        torch.manual_seed(seed)  # seeds every device too
        batch = self.engine.generate([self.prompt_ids(p) for p in problems], k)
        return Completions(
            texts=list(batch.completion_texts),
            lengths=[int(x) for x in batch.completion_lengths.tolist()],
            truncated=[bool(x) for x in batch.truncated.tolist()],
        )


def derangement(n: int, rng: random.Random) -> list[int]:
    """perm[i] != i for every i (n >= 2): a random cycle order, each element sent to the next one.

    >>> p = derangement(5, random.Random(0)); sorted(p) == list(range(5)) and all(p[i] != i for i in range(5))
    True
    """
    order = list(range(n))
    rng.shuffle(order)
    perm = [0] * n
    for j, i in enumerate(order):
        perm[i] = order[(j + 1) % n]
    return perm


class OracleSource:
    """Each problem's own `field` (e.g. its reference `solution`) as every one of its k completions; with
    `shuffle`, another problem's (a derangement within the benchmark, seeded), which should score ~0.

    Lengths are tokens of `tokenizer` when given, else whitespace-separated words. Never truncated.
    """

    def __init__(self, field: str = "solution", *, shuffle: bool = False, seed: int = 0, tokenizer=None,
                 tokenizer_name: str | None = None, tool_prompt: str = "toolrl"):
        self.field = field
        self.tool_prompt = tool_prompt  # tool problems: the ground truth is rendered in this format
        self.shuffle = shuffle
        self.seed = seed
        self.tokenizer = tokenizer
        self.length_unit = f"tokens ({tokenizer_name or 'tokenizer'})" if tokenizer is not None else "whitespace words"
        self._text: dict[str, str] = {}

    def _value(self, benchmark: str, p: Problem) -> str:
        if is_tool_task(p.task):
            from gdpo.eval.toolcall import oracle_text

            return oracle_text(p.task, p.row, self.field, self.tool_prompt)
        value = p.row.get(self.field)
        if value is None and self.field == "solution":
            value = p.solution
        if value is None or not str(value).strip():
            raise EvalInputError(f"--oracle {self.field}: benchmark {benchmark!r} problem {p.id!r} has no "
                                 f"{self.field!r} field")
        return str(value)

    def prepare(self, benchmark: str, problems: Sequence[Problem]) -> None:
        texts = [self._value(benchmark, p) for p in problems]
        if self.shuffle and len(problems) > 1:
            perm = derangement(len(problems), random.Random(zlib.crc32(f"{self.seed}|{benchmark}".encode())))
            texts = [texts[perm[i]] for i in range(len(problems))]
        self._text.update({f"{benchmark}\0{p.id}": t for p, t in zip(problems, texts)})
        self._bench = benchmark

    def _length(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t.split()) for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def complete(self, problems: Sequence[Problem], k: int, *, seed: int) -> Completions:
        texts = [self._text[f"{self._bench}\0{p.id}"] for p in problems]
        lengths = self._length(texts)
        return Completions(
            texts=[t for t in texts for _ in range(k)],
            lengths=[n for n in lengths for _ in range(k)],
            truncated=[False] * (len(texts) * k),
        )


# ------------------------------------------------------------------------------------------------- grading


def grade_samples(
    references: Sequence[str], texts: Sequence[str], fallbacks: Sequence[str], timeout_s: float
) -> tuple[list[str | None], list[bool], list[int]]:
    """(extracted answer, correct, answer cluster) for the n samples of one problem.

    Clusters (for maj@k): two answers that both match a reference are the same answer, one matching and
    one not are different; only two wrong answers are compared with each other by math-verify.
    """
    from gdpo.rewards.math import answers_match, extract_answer

    def match(ref: str, pred: str) -> bool:
        try:
            return answers_match(ref, pred, timeout_s)
        except Exception:  # noqa: BLE001 - a parse error or timeout means "not equal", never a crash
            return False

    extracted = [extract_answer(str(t), fallbacks) for t in texts]
    verdict: dict[str, bool] = {}
    for a in extracted:
        if a is not None and a not in verdict:
            verdict[a] = any(match(r, a) for r in references)
    correct = [a is not None and verdict[a] for a in extracted]

    def same(x: str, y: str) -> bool:
        if verdict[x] or verdict[y]:
            return verdict[x] and verdict[y]
        return match(x, y)

    return extracted, correct, cluster_answers(extracted, same)


def grade_code_samples(tests: dict, texts: Sequence[str], timeout_s: float) -> tuple[list, list[bool], list[int],
                                                                                      list[dict]]:
    """(extracted, correct, clusters, extras) for the n samples of one code problem: correct = every test passes
    (code_pass == 1), extras {"bug": ...}: the program or a test raised something other than AssertionError
    (code_bug == 0). No answer is extracted (None) and there are no answer clusters (-1): maj@k does not apply."""
    from gdpo.rewards.code import _row_asserts, extract_code, run_asserts

    cases, setup = _row_asserts({k: [v] for k, v in tests.items()}, 0)
    limits = {"wall_s": max(6.0, timeout_s), "cpu_s": 4.0, "memory_mb": 512}  # code_pass's defaults
    status = [run_asserts(extract_code(str(t)), cases, setup, limits) for t in texts]  # one run per sample
    n = len(texts)
    return [None] * n, [all(x == "pass" for x in st) for st in status], [-1] * n, [{"bug": "error" in st}
                                                                                    for st in status]


def _grade_job(job: tuple) -> tuple:
    if callable(job[0]):  # (grading function, *its arguments): code and tool calling
        return job[0](*job[1:])
    return grade_samples(*job)


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which closes the pool


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class Grader:
    """Grades lists of (references, texts, fallbacks) jobs, in `workers` forked processes (0 = inline)."""

    def __init__(self, workers: int, timeout_s: float = 5.0):
        from gdpo.rewards.math import math_correct

        self.timeout_s = timeout_s
        math_correct.warmup()  # build math-verify's parser once, before forking
        self._pool = None
        if workers > 0:
            import multiprocessing as mp

            self._pool = mp.get_context("fork").Pool(workers, initializer=_ignore_sigint)

    def submit(self, jobs: list[tuple]):
        """A handle whose .get() is [(extracted, correct, clusters[, extras])] per job; a job is (references,
        texts, fallbacks) for math, or (function, *arguments) graded by that function (code, tool calling)."""
        full = [job if callable(job[0]) else (*job, self.timeout_s) for job in jobs]
        if self._pool is None:
            return _Done([_grade_job(j) for j in full])
        return self._pool.map_async(_grade_job, full, chunksize=1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


# ------------------------------------------------------------------------------------------- sample store


class SampleStore:
    """All sample rows of an output directory: ``samples.jsonl`` plus data-parallel ``samples.rank<r>.jsonl``.

    Read incrementally (rank 0 polls while the other ranks write); a row's key is (benchmark, problem_id,
    sample_index) and a later row replaces an earlier one. An unparsable line (a crash mid-write) is skipped.
    Memory: `rows` holds every field but the completion (32k-token responses x thousands of samples would
    be gigabytes); `completion(key)` reads one back from its file, and `rewrite` copies lines byte for byte.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rows: dict[tuple[str, str, int], dict] = {}  # key -> the row without "completion"
        self._where: dict[tuple[str, str, int], tuple[Path, int, int]] = {}  # key -> (file, offset, length)
        self._offsets: dict[Path, int] = {}

    def files(self) -> list[Path]:
        ranks = sorted(self.out_dir.glob("samples.rank*.jsonl"))
        main = self.out_dir / SAMPLES
        return ([main] if main.exists() else []) + ranks

    def refresh(self) -> None:
        for path in self.files():
            start = self._offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            end = data.rfind(b"\n") + 1  # only whole lines; a line being written is read next time
            pos = 0
            for line in data[:end].split(b"\n")[:-1]:
                at, pos = start + pos, pos + len(line) + 1
                try:
                    r = json.loads(line)
                    key = (r["benchmark"], str(r["problem_id"]), int(r["sample_index"]))
                except (ValueError, KeyError, TypeError):
                    continue
                r.pop("completion", None)
                self.rows[key] = r
                self._where[key] = (path, at, len(line))
            self._offsets[path] = start + end

    def _line(self, key: tuple[str, str, int], handles: dict) -> bytes:
        path, at, n = self._where[key]
        if path not in handles:
            handles[path] = open(path, "rb")
        f = handles[path]
        f.seek(at)
        return f.read(n)

    def full_rows(self, keys) -> list[dict]:
        """The complete rows (with completion) of `keys`, read back from disk."""
        handles: dict = {}
        try:
            return [json.loads(self._line(key, handles)) for key in keys]
        finally:
            for f in handles.values():
                f.close()

    def done(self, benchmark: str, k: int) -> set[str]:
        """Problem ids of `benchmark` that have all samples 0..k-1."""
        seen: dict[str, set[int]] = {}
        for (b, pid, i) in self.rows:
            if b == benchmark and i < k:
                seen.setdefault(pid, set()).add(i)
        return {pid for pid, idx in seen.items() if len(idx) == k}

    def rewrite(self, order: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Write every row to samples.jsonl (benchmarks and problems in `order` first, in that order) and
        delete the rank files. Atomic: a crash leaves the old files."""
        pos: dict[tuple[str, str], tuple[int, int]] = {}
        for bi, (bench, pids) in enumerate(order):
            for pi, pid in enumerate(pids):
                pos[(bench, pid)] = (bi, pi)
        far = (len(order), 0)
        keys = sorted(self.rows, key=lambda key: (*pos.get(key[:2], far), key[0], key[1], key[2]))
        final = self.out_dir / SAMPLES
        tmp = self.out_dir / (SAMPLES + ".tmp")
        where: dict = {}
        handles: dict = {}
        try:
            with open(tmp, "wb") as out:
                for key in keys:
                    line = self._line(key, handles)
                    where[key] = (final, out.tell(), len(line))
                    out.write(line + b"\n")
        finally:
            for f in handles.values():
                f.close()
        rank_files = [p for p in self.files() if p.name != SAMPLES]
        os.replace(tmp, final)
        for p in rank_files:
            p.unlink()
        self.rows = {key: self.rows[key] for key in keys}
        self._where = where
        self._offsets = {final: final.stat().st_size}


def _open_append(path: Path):
    """Append mode; a last line left unterminated by a crash is terminated first so new rows stay separate."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            partial = f.read(1) != b"\n"
        if partial:
            with open(path, "ab") as f:
                f.write(b"\n")
    return open(path, "a", encoding="utf-8", buffering=1)


def check_run_config(out_dir: Path, fingerprint: dict) -> None:
    """Resume only into a directory whose samples were made with these settings: refuse (one line) when its
    ``run_config.json`` differs, is damaged, or is missing next to earlier samples / results."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_CONFIG
    how = "use another --output-dir or --overwrite"
    if not path.exists():
        earlier = [p.name for p in [out_dir / SAMPLES, out_dir / "results.json", *out_dir.glob("samples.rank*.jsonl")]
                   if p.is_file()]
        if earlier:
            raise EvalInputError(f"output dir {out_dir} holds {', '.join(earlier)} but no {RUN_CONFIG}, so they "
                                 f"cannot be matched to these settings; {how}")
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        if not isinstance(old, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise EvalInputError(f"output dir {out_dir}: {RUN_CONFIG} is damaged (no readable fingerprint), so its "
                             f"samples cannot be matched to these settings; {how}") from None
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        key = diff[0]
        raise EvalInputError(
            f"output dir {out_dir} holds samples made with other settings ({key}: {old.get(key)!r} there, "
            f"{fingerprint.get(key)!r} now{', and ' + str(len(diff) - 1) + ' more' if len(diff) > 1 else ''}); "
            f"{how}"
        )


def write_run_config(out_dir: Path, fingerprint: dict) -> None:
    """Write ``run_config.json`` once (atomically); an existing one was matched by `check_run_config`, so it is
    never replaced."""
    path = Path(out_dir) / RUN_CONFIG
    if path.exists():
        return
    tmp = path.with_name(f".{RUN_CONFIG}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def data_fingerprint(runs: Sequence["BenchmarkRun"]) -> dict:
    """{benchmark: {file, sha256} or {hub}}: the samples belong to exactly these data files."""
    import hashlib

    out: dict = {}
    for r in runs:
        p = Path(r.where)
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[r.benchmark.name] = {"file": str(p.resolve()), "sha256": h.hexdigest()}
        else:
            out[r.benchmark.name] = {"hub": r.where}
    return out


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class BenchmarkRun:
    benchmark: Benchmark
    problems: list[Problem]  # the problems evaluated (after --limit)
    all_problems: list[Problem]  # the whole benchmark (the oracle's shuffle draws from it)
    where: str  # file path or hub id
    fallbacks: tuple[str, ...]
    tool_prompt: str = "toolrl"  # tool-calling benchmarks: the prompt format the responses are parsed in


def _grading_job(run: BenchmarkRun, p: Problem, texts: list[str], timeout_s: float) -> tuple:
    if is_tool_task(p.task):
        from gdpo.eval.toolcall import grade_tool_samples

        return (grade_tool_samples, p.task, p.row, texts, run.tool_prompt)
    if p.task == "code":
        from gdpo.eval.benchmarks import code_tests

        return (grade_code_samples, code_tests(p), texts, timeout_s)
    return (p.references, texts, run.fallbacks)


def _seed(seed: int, bench: str, problems: Sequence[Problem]) -> int:
    # Per batch, from its content: a resumed run draws the same samples as an uninterrupted one would.
    return zlib.crc32(f"{seed}|{bench}|{problems[0].id}|{len(problems)}".encode()) & 0x7FFFFFFF


def run_eval(
    source: CompletionSource,
    runs: Sequence[BenchmarkRun],
    *,
    out_dir: str | os.PathLike,
    k: int,
    pass_ks: Sequence[int],
    maj_ks: Sequence[int],
    exceed_length: int,
    grader: Grader,
    batch_problems: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    meta: dict | None = None,
    poll_s: float = 1.0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict | None:
    """Generate, grade and store every missing sample of this rank; on rank 0 then wait for all ranks, merge,
    and return (and write) the results. Other ranks return None."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = SampleStore(out)
    store.refresh()

    # This rank's unfinished problems, in benchmark order.
    todo: list[tuple[BenchmarkRun, list[Problem]]] = []
    g = 0
    for run in runs:
        done = store.done(run.benchmark.name, k)
        mine = []
        for p in run.problems:
            if g % world_size == rank and p.id not in done:
                mine.append(p)
            g += 1
        todo.append((run, mine))
    total = sum(len(m) for _, m in todo)
    n_all = sum(len(r.problems) for r in runs)
    if rank == 0:
        log(f"{n_all - sum(len(store.done(r.benchmark.name, k) & {p.id for p in r.problems}) for r in runs)} of "
            f"{n_all} problems to evaluate" + (f" ({total} on rank 0 of {world_size})" if world_size > 1 else ""))

    bar = None
    if progress and rank == 0 and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="problem", file=sys.stderr, dynamic_ncols=True)
    path = out / (SAMPLES if world_size == 1 else f"samples.rank{rank}.jsonl")
    f = _open_append(path) if total else None

    def flush(item) -> None:
        run, batch, comps, handle = item
        graded = handle.get()
        for i, (p, g) in enumerate(zip(batch, graded)):
            extracted, correct, clusters = g[:3]
            extras = g[3] if len(g) > 3 else None  # per-sample extra fields (code: bug; tool calling: format_ok...)
            for j in range(k):
                r = i * k + j
                f.write(json.dumps({
                    "benchmark": run.benchmark.name,
                    "problem_id": p.id,
                    "sample_index": j,
                    "completion": comps.texts[r],
                    "extracted_answer": extracted[j],
                    "correct": bool(correct[j]),
                    "length": int(comps.lengths[r]),
                    "truncated": bool(comps.truncated[r]),
                    "cluster": int(clusters[j]),
                    **(extras[j] if extras else {}),
                }, ensure_ascii=False) + "\n")
        f.flush()
        if bar is not None:
            bar.update(len(batch))

    pending = None
    try:
        for run, mine in todo:
            if not mine:
                continue
            source.prepare(run.benchmark.name, run.all_problems)
            for s in range(0, len(mine), batch_problems):
                batch = mine[s : s + batch_problems]
                comps = source.complete(batch, k, seed=_seed(seed, run.benchmark.name, batch))
                n = len(batch) * k
                if not (len(comps.texts) == len(comps.lengths) == len(comps.truncated) == n):
                    raise RuntimeError(f"completion source returned {len(comps.texts)} completions for {n}")
                jobs = [_grading_job(run, p, comps.texts[i * k : (i + 1) * k], grader.timeout_s)
                        for i, p in enumerate(batch)]
                handle = grader.submit(jobs)  # graded while the next batch generates
                if pending is not None:
                    flush(pending)
                pending = (run, batch, comps, handle)
        if pending is not None:
            flush(pending)
    finally:
        if bar is not None:
            bar.close()
        if f is not None:
            f.close()
    if rank != 0:
        return None

    # Rank 0: wait until every problem has all k samples (the other ranks are still writing theirs).
    last_note = 0.0
    while True:
        store.refresh()  # incremental: only the bytes appended since the last poll are read
        missing = sum(len({p.id for p in r.problems} - store.done(r.benchmark.name, k)) for r in runs)
        if not missing:
            break
        if world_size == 1:
            raise RuntimeError(f"{missing} problems still lack samples after generation")
        if time.monotonic() - last_note > 60:
            log(f"waiting for the other ranks: {missing} problems left")
            last_note = time.monotonic()
        time.sleep(poll_s)
    store.rewrite([(r.benchmark.name, [p.id for p in r.problems]) for r in runs])
    results = compute_results(store.rows, runs, k=k, pass_ks=pass_ks, maj_ks=maj_ks, exceed_length=exceed_length,
                              length_unit=source.length_unit, meta=meta or {})
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / RESULTS)
    return results


def compute_results(
    rows: dict[tuple[str, str, int], dict],
    runs: Sequence[BenchmarkRun],
    *,
    k: int,
    pass_ks: Sequence[int],
    maj_ks: Sequence[int],
    exceed_length: int,
    length_unit: str,
    meta: dict,
) -> dict:
    """results.json: settings (`meta`), then per benchmark the metrics of gdpo.eval.metrics.summarize."""
    benches: dict[str, Any] = {}
    for run in runs:
        name = run.benchmark.name
        grades = []
        for p in run.problems:
            rs = [rows[(name, p.id, j)] for j in range(k)]
            grades.append(ProblemGrades(
                correct=[bool(r["correct"]) for r in rs],
                clusters=[int(r["cluster"]) for r in rs],
                lengths=[int(r["length"]) for r in rs],
                truncated=[bool(r["truncated"]) for r in rs],
            ))
        m = summarize(grades, pass_ks=pass_ks, maj_ks=maj_ks, exceed_length=exceed_length)
        if run.benchmark.task == "code":  # no answers to vote on; the bug ratio instead
            m = {key: v for key, v in m.items() if not key.startswith("maj@") and key != "no_answer_rate"}
            bugs = [bool(rows[(name, p.id, j)].get("bug", False)) for p in run.problems for j in range(k)]
            m["bug_ratio"] = sum(bugs) / len(bugs)
        benches[name] = {"description": run.benchmark.description, "data": run.where, **m}
    out = {**meta, "k": k, "length_unit": length_unit, "exceed_length": exceed_length, "benchmarks": benches}
    if any(is_tool_task(r.benchmark.task) for r in runs):  # tool calling: accuracy, format-correct, group summaries
        from gdpo.eval.benchmarks import GROUPS
        from gdpo.eval.toolcall import tool_results

        out["groups"] = tool_results(benches, rows, runs, k, GROUPS)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_table(results: dict) -> str:
    """One row per benchmark; rates in percent."""
    k = results["k"]
    L = results["exceed_length"]
    maj = f"maj@{k}"
    head = ["benchmark", "problems", f"avg@{k}", f"pass@{k}", maj, f"exceed>{L}", "mean_len", "max_len", "trunc"]
    bugs = any("bug_ratio" in m for m in results["benchmarks"].values())  # code benchmarks
    head += ["bug"] if bugs else []
    body = []
    for name, m in results["benchmarks"].items():
        body.append([
            name, str(m["num_problems"]), _pct(m[f"avg@{k}"]), _pct(m[f"pass@{k}"]),
            _pct(m[maj]) if maj in m else "-", _pct(m["exceed_ratio"]), f"{m['mean_length']:.1f}",
            str(m["max_length"]), _pct(m["truncation_rate"]),
        ] + ([_pct(m["bug_ratio"]) if "bug_ratio" in m else "-"] if bugs else []))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head)] + [fmt(r) for r in body]
    lines.append(f"(rates in %; lengths in {results['length_unit']}; exceed = share of responses longer than {L})")
    from gdpo.eval.toolcall import format_tool_table

    return "\n".join(lines + format_tool_table(results))


def log_wandb(results: dict, store: SampleStore, *, mode: str, project: str, name: str | None, out_dir: Path,
              max_samples: int) -> str | None:
    """A W&B run with the metrics as summary (``<benchmark>/<metric>``), a metrics table and a samples table
    (the first `max_samples` samples, completions cut to 4000 characters). Returns a note for the user."""
    from gdpo.metrics import wandb_mode

    mode, note = wandb_mode(mode)
    if mode == "disabled":
        return note
    import wandb

    run = wandb.init(mode=mode, project=project, name=name or Path(out_dir).name, dir=str(out_dir),
                     job_type="eval", config={k: v for k, v in results.items() if k not in ("benchmarks", "groups")},
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    metric_names = sorted({m for b in results["benchmarks"].values() for m in b if m not in ("description", "data")})
    for bench, m in results["benchmarks"].items():
        for key in metric_names:
            if key in m:
                run.summary[f"{bench}/{key}"] = m[key]
    for group, s in results.get("groups", {}).items():  # tool-calling summaries (Non-Live, Live, Overall, ...)
        for key, value in s.items():
            if isinstance(value, (int, float)):
                run.summary[f"{group}/{key}"] = value
    run.log({"metrics": wandb.Table(columns=["benchmark"] + metric_names,
                                    data=[[b] + [m.get(c) for c in metric_names]
                                          for b, m in results["benchmarks"].items()])})
    cols = ["benchmark", "problem_id", "sample_index", "extracted_answer", "correct", "length", "truncated",
            "completion"]
    rows = store.full_rows(list(store.rows)[:max_samples])
    data = [[r[c] if c != "completion" else r[c][:4000] for c in cols] for r in rows]
    run.log({"samples": wandb.Table(columns=cols, data=data)})
    run.finish()
    return note
