"""``python -m gdpo.eval``: math benchmarks the way the GDPO paper reports them (avg@k, pass@k, maj@k, exceed ratio),
and tool calling (BFCL v3 Non-Live / Live / Overall and format-correct, API-Bank levels 1-3; gdpo.eval.toolcall).

    python -m gdpo.eval --model runs/gdpo/checkpoint-500 --benchmarks aime24,amc,math500 --data-dir ../shared/data
    python -m gdpo.eval --oracle solution --benchmarks math500 --k 1            # check the grader, no model
    python -m gdpo.eval --model ckpt --benchmarks bfcl,apibank --k 1 --temperature 0 --max-tokens 4096  # tools
    torchrun --nproc_per_node 8 -m gdpo.eval --model ... --backend vllm        # data parallel, 1 GPU per rank

Bad input (unknown benchmark, missing data file, missing model path, ...) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from gdpo.eval.benchmarks import DATA_DIR_ENV, BENCHMARKS, GROUPS, EvalInputError, benchmark_source, load_problems
from gdpo.eval.benchmarks import is_tool_task, parse_fields, resolve_benchmarks
from gdpo.eval.metrics import default_pass_ks
from gdpo.eval.runner import DEFAULT_PROMPT_TEMPLATE, RUN_CONFIG
from gdpo.eval.toolcall import TOOL_PROMPTS

PAPER_BENCHMARKS = "aime24,amc,math500,minerva,olympiad"
FALLBACKS = ("answer_tag", "answer_is", "hashes", "last_number")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_parser() -> argparse.ArgumentParser:
    bench_list = "; ".join(f"{n}: {b.description}" for n, b in BENCHMARKS.items())
    bench_list += "; groups: " + "; ".join(f"{g} = {', '.join(m)}" for g, m in GROUPS.items())
    p = argparse.ArgumentParser(
        prog="python -m gdpo.eval",
        description="Evaluate a model (or an oracle) on math and tool-calling benchmarks: avg@k, pass@k, maj@k, "
        "length-exceed ratio, response lengths and truncation, per benchmark; BFCL / API-Bank add accuracy, "
        "format-correct and the Non-Live / Live / Overall summaries. Resumable: rerunning with the same --output-dir "
        "skips finished problems.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m gdpo.eval --model runs/gdpo/final --benchmarks aime24,amc,math500 --data-dir ../shared/data\n"
        "  python -m gdpo.eval --oracle solution --benchmarks math500 --k 1 --data-dir ../shared/data\n"
        "  python -m gdpo.eval --oracle ground_truth --benchmarks bfcl,apibank --k 1 --data-dir ../shared/data\n"
        "  torchrun --nproc_per_node 8 -m gdpo.eval --model ckpt --backend vllm   # problems split over 8 ranks",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", help="checkpoint directory or hub id to sample from (not needed with --oracle)")
    g.add_argument("--adapter", help="a LoRA training checkpoint (PEFT adapter) applied to --model, the base model; "
                   "merged into the weights before sampling")
    g.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --model); with --oracle it "
                   "measures lengths in tokens (without one they are whitespace words)")
    g.add_argument("--oracle", metavar="FIELD", help="no model: use each problem's FIELD (e.g. 'solution') as "
                   "all k completions, to validate the grader; tool-calling benchmarks: 'ground_truth', rendered "
                   "in the --tool-prompt format")
    g.add_argument("--oracle-shuffle", action="store_true", help="with --oracle: give each problem another "
                   "problem's FIELD (a seeded derangement within the benchmark); should score about 0")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model / tokenizer code")

    g = p.add_argument_group("benchmarks")
    g.add_argument("--benchmarks", default=PAPER_BENCHMARKS, help="comma-separated names, name=file.jsonl or "
                   f"file.jsonl for custom data (default: %(default)s, the paper's Table 3). Known: {bench_list}")
    g.add_argument("--data-dir", default=None, help=f"directory with the benchmark JSONL files (default: "
                   f"${DATA_DIR_ENV}); without one, benchmarks load from the hub through `datasets`")
    g.add_argument("--hub", action="store_true", help="load built-in benchmarks from their hub dataset ids even "
                   "when a data directory is set")
    g.add_argument("--fields", help="field mapping for custom JSONL files, e.g. problem=question,answer=target "
                   "(keys: id, problem, answer, answers, solution)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each benchmark")

    g = p.add_argument_group("sampling (paper: k=16, temperature 0.6, top-p 0.95, 32k tokens)")
    g.add_argument("--k", type=int, default=16, help="samples per problem (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy "
                   "(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, 1 = off (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=32768, help="max new tokens per response; a response that "
                   "hits it counts as truncated (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed; also seeds --oracle-shuffle "
                   "(default: %(default)s)")

    g = p.add_argument_group("prompt")
    g.add_argument("--prompt-template", default=None, help="user message, filled as in training "
                   "(gdpo.data.render_prompt): {problem} = the problem, {name} = the row's field, {{ }} = literal "
                   f"braces (default: the code benchmarks' own, else DeepSeek-R1 style, {DEFAULT_PROMPT_TEMPLATE!r})")
    g.add_argument("--system-prompt", default=None, help="optional system message (default: none)")
    g.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto", help="wrap the prompt in "
                   "the tokenizer's chat template: auto = when the tokenizer has one (default: %(default)s)")
    g.add_argument("--tool-prompt", choices=TOOL_PROMPTS, default="toolrl", help="tool-calling benchmarks (bfcl*, "
                   "apibank*): toolrl = the <think> + <tool_call> JSON-lines format configs/tool_gdpo.yaml trains on, "
                   "tools listed in the system prompt; chat = the model's own tool format (tools= of its chat "
                   "template, <tool_call> blocks with name/arguments; BFCL only). --prompt-template, "
                   "--system-prompt and --fallbacks apply to math benchmarks only (default: %(default)s)")

    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation engine (default: "
                   "%(default)s); vllm needs the vllm package")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="model "
                   "dtype: auto = bf16 on GPU, fp32 on CPU (default: %(default)s)")
    g.add_argument("--device", default=None, help="hf: device, e.g. cuda:0 or cpu (default: cuda if available; "
                   "under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--batch-problems", type=int, default=8, help="problems per generate call; also how often "
                   "samples are saved (default: %(default)s)")
    g.add_argument("--generation-batch-size", type=int, default=None, help="hf: most rows (problems x k) per "
                   "transformers.generate call (default: all rows of a --batch-problems batch)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory "
                   "(default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)")

    g = p.add_argument_group("metrics and grading")
    g.add_argument("--pass-k", default=None, help="comma-separated k for unbiased pass@k (default: powers of two "
                   "up to --k, and --k)")
    g.add_argument("--maj-k", default=None, help="comma-separated k for maj@k, majority vote over the first k "
                   "samples with math-verify-equivalent answers merged (default: --k)")
    g.add_argument("--exceed-length", type=int, default=4000, help="L of the length-exceed ratio: share of "
                   "responses longer than L tokens (default: %(default)s)")
    g.add_argument("--fallbacks", default=None, help="answer extraction after the last \\boxed{}: comma list of "
                   f"{', '.join(FALLBACKS)}, or 'none' for \\boxed{{}} only (default: answer_tag,answer_is; "
                   "gsm8k adds hashes)")
    g.add_argument("--grader-workers", type=int, default=None, help="processes grading with math-verify, 0 = in "
                   "the main process (default: min(8, CPU cores))")
    g.add_argument("--grader-timeout", type=float, default=5.0, help="seconds per math-verify parse / compare "
                   "(default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None, help="where results.json, samples.jsonl and run_config.json go "
                   "(default: runs/eval/<model name>)")
    g.add_argument("--overwrite", action="store_true", help="delete earlier samples / results in --output-dir "
                   "instead of resuming")
    g.add_argument("--no-progress", action="store_true", help="do not show the progress bar over problems (stderr)")
    g.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled", help="log a summary, "
                   "a metrics table and a samples table to W&B (online falls back to offline without an API "
                   "key; default: %(default)s)")
    g.add_argument("--wandb-project", default="gdpo-eval", help="W&B project (default: %(default)s)")
    g.add_argument("--wandb-name", default=None, help="W&B run name (default: the output dir's name)")
    g.add_argument("--wandb-max-samples", type=int, default=2000, help="most rows in the W&B samples table "
                   "(default: %(default)s)")
    return p


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise EvalInputError(f"{flag}: empty")
    return sorted(set(vals))


def _check_args(a: argparse.Namespace) -> None:
    if a.oracle is None and not a.model:
        raise EvalInputError("--model is required (or --oracle FIELD to grade a dataset field)")
    if a.adapter is not None and (a.oracle is not None or not (Path(a.adapter) / "adapter_config.json").is_file()):
        raise EvalInputError(f"--adapter: {a.adapter} is not a LoRA checkpoint (no adapter_config.json)"
                             if a.oracle is None else "--adapter needs --model, not --oracle")
    if a.oracle is None and a.oracle_shuffle:
        raise EvalInputError("--oracle-shuffle needs --oracle FIELD")
    for flag, value, low in (("--k", a.k, 1), ("--max-tokens", a.max_tokens, 1), ("--batch-problems",
                             a.batch_problems, 1), ("--exceed-length", a.exceed_length, 0)):
        if value < low:
            raise EvalInputError(f"{flag} must be >= {low}, got {value}")
    if a.limit is not None and a.limit < 1:
        raise EvalInputError(f"--limit must be >= 1, got {a.limit}")
    if a.grader_workers is not None and a.grader_workers < 0:
        raise EvalInputError(f"--grader-workers must be >= 0 (0 = grade in the main process), got {a.grader_workers}")
    if not a.grader_timeout > 0:
        raise EvalInputError(f"--grader-timeout must be > 0 seconds, got {a.grader_timeout}")
    if a.output_dir:
        _check_output_dir(Path(a.output_dir))
    if not 0 < a.top_p <= 1 or a.temperature < 0 or a.top_k < 0:
        raise EvalInputError("need 0 < --top-p <= 1, --temperature >= 0, --top-k >= 0")


def _check_tool_args(a: argparse.Namespace, runs) -> bool:
    """Whether tool-calling benchmarks are in the run; refuses flags that would not take effect on them."""
    tool = [r.benchmark.name for r in runs if is_tool_task(r.benchmark.task)]
    if not tool:
        return False
    if len(tool) == len(runs):
        for flag, unset in (("--prompt-template", a.prompt_template is None),
                            ("--system-prompt", a.system_prompt is None), ("--fallbacks", a.fallbacks is None)):
            if not unset:
                raise EvalInputError(f"{flag} applies to math benchmarks only; the tool-calling benchmarks use "
                                     "--tool-prompt")
    api = [r.benchmark.name for r in runs if r.benchmark.task == "apibank"]
    if api and a.tool_prompt == "chat":
        raise EvalInputError(f"--tool-prompt chat: {api[0]} holds ToolRL-format prompts; use --tool-prompt toolrl")
    if a.oracle is not None and len(tool) < len(runs):
        raise EvalInputError("--oracle: math benchmarks and tool-calling benchmarks read different fields "
                             "(solution / ground_truth); run them separately")
    if a.oracle is not None and a.oracle not in ("ground_truth", "answer"):
        raise EvalInputError(f"--oracle {a.oracle}: tool-calling benchmarks ({tool[0]}, ...) take --oracle "
                             "ground_truth")
    return True


def _check_output_dir(out: Path) -> None:
    """--output-dir must be (or be creatable as) a directory: not a file, not under a file."""
    p = out
    while not p.exists() and p.parent != p:
        p = p.parent
    if p.exists() and not p.is_dir():
        where = "is a file" if p == out else f"is under {p}, which is a file"
        raise EvalInputError(f"--output-dir: {out} {where}; give a directory")


def _fallbacks(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip() == "none":
        return ()
    fbs = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in fbs if x not in FALLBACKS]
    if bad:
        raise EvalInputError(f"--fallbacks: unknown {bad[0]!r}; allowed: {', '.join(FALLBACKS)} or none")
    return fbs


def _resolve_model_ref(ref: str, flag: str) -> str:
    """A local path (absolute, so run_config.json identifies it) or a hub id; a path that does not exist is an
    input error before anything heavy is loaded."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ref  # a hub id; loading it may still fail (offline, no such repo): reported in one line too
    raise EvalInputError(f"{flag}: model path {ref} does not exist")


def _load_tokenizer(ref: str, trust_remote_code: bool):
    from gdpo.policy.model import load_tokenizer

    try:
        return load_tokenizer(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline hub, not a tokenizer dir, ...: one line for the user
        raise EvalInputError(f"cannot load tokenizer {ref!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _make_engine(a, model_ref: str, tokenizer, device: str | None):
    """The rollout engine for --backend; any engine with `generate(prompt_ids, n) -> RolloutBatch` fits."""
    from gdpo.rollout import SamplingParams

    sampling = SamplingParams(max_new_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                              top_k=a.top_k, stop_strings=tuple(a.stop))
    from gdpo.rollout.factory import make_rollout_engine

    if a.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001
            raise EvalInputError(
                f"--backend vllm needs the vllm package (pip install 'gdpo[vllm]'): {_first_line(e)}"
            ) from None
        if a.adapter:  # vLLM loads weights from a directory: the merged model, in a temporary one
            model_ref = _merged_dir(a, model_ref)
        # No trainer model to push weights from: vLLM loads them from model_ref itself, and never sleeps.
        try:
            return make_rollout_engine(
                "vllm", None, tokenizer, sampling, model_path=model_ref,
                gpu_memory_utilization=a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size,
                sleep=False, seed=a.seed, max_model_len=a.max_model_len, dtype=a.dtype,
                llm_kwargs={"trust_remote_code": a.trust_remote_code},
            )
        except Exception as e:  # noqa: BLE001
            raise EvalInputError(f"cannot start vLLM for {model_ref!r}: {_first_line(e)}") from None

    import torch

    from gdpo.policy.model import load_causal_lm, resolve_dtype

    if not torch.cuda.is_available():  # transformers imports DeepSpeed while loading; spare its CPU warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = resolve_dtype(a.dtype)
    try:
        model = load_causal_lm(model_ref, dtype=dtype, device=device, trust_remote_code=a.trust_remote_code)
        if a.adapter:  # merged: plain Linear layers again, the same function as base + adapter
            from gdpo.policy.lora import load_adapter

            model = load_adapter(model, a.adapter).merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"cannot load model {model_ref!r}: {_first_line(e)}") from None
    model.eval()
    return make_rollout_engine("hf", model, tokenizer, sampling, generation_batch_size=a.generation_batch_size)


def _merged_dir(a, model_ref: str) -> str:
    """--adapter with --backend vllm: the merged model in a temporary directory, removed at exit."""
    import atexit
    import shutil
    import tempfile

    from gdpo.export import export_merged
    from gdpo.policy.model import resolve_dtype

    out = tempfile.mkdtemp(prefix="gdpo-eval-merged-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    try:
        return str(export_merged(a.adapter, Path(out) / "model", model=model_ref, dtype=resolve_dtype(a.dtype),
                                 trust_remote_code=a.trust_remote_code))
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"--adapter: cannot merge {a.adapter!r} into {model_ref!r}: {_first_line(e)}") from None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _main(a)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(a: argparse.Namespace) -> int:
    _check_args(a)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    is_main = rank == 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if is_main else (lambda s: None)

    # 1. Benchmarks first: a typo or a missing file fails before anything heavy loads.
    fields = parse_fields(a.fields)
    data_dir = a.data_dir or os.environ.get(DATA_DIR_ENV) or None
    fallbacks = _fallbacks(a.fallbacks)
    from gdpo.eval.runner import BenchmarkRun

    runs = []
    for b in resolve_benchmarks(a.benchmarks, fields):
        where, _ = benchmark_source(b, data_dir, a.hub)
        all_problems = load_problems(b, data_dir, hub=a.hub)
        problems = all_problems[: a.limit] if a.limit else all_problems
        runs.append(BenchmarkRun(b, problems, all_problems, where, b.fallbacks if fallbacks is None else fallbacks,
                                 tool_prompt=a.tool_prompt))
    has_tool = _check_tool_args(a, runs)
    pass_ks = _int_list(a.pass_k, "--pass-k") if a.pass_k else default_pass_ks(a.k)
    maj_ks = _int_list(a.maj_k, "--maj-k") if a.maj_k else [a.k]
    for flag, ks in (("--pass-k", pass_ks), ("--maj-k", maj_ks)):
        if ks[0] < 1 or ks[-1] > a.k:
            raise EvalInputError(f"{flag}: every k must be in 1..--k ({a.k}), got {ks}")

    # 2. Model / tokenizer references and the settings that identify the samples (for resuming).
    model_ref = _resolve_model_ref(a.model, "--model") if a.model and a.oracle is None else None
    tok_ref = _resolve_model_ref(a.tokenizer, "--tokenizer") if a.tokenizer else model_ref
    tokenizer = _load_tokenizer(tok_ref, a.trust_remote_code) if tok_ref else None
    if a.oracle is not None:
        fingerprint = {"source": "oracle", "oracle_field": a.oracle, "oracle_shuffle": a.oracle_shuffle,
                       "seed": a.seed, "tokenizer": tok_ref, "k": a.k, "fallbacks": a.fallbacks}
        if has_tool:
            fingerprint["tool_prompt"] = a.tool_prompt
        source_desc = f"oracle: {a.oracle}" + (" (shuffled across problems)" if a.oracle_shuffle else "")
    else:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        use_chat = a.chat_template == "on" or (a.chat_template == "auto" and has_template)
        if a.chat_template == "on" and not getattr(tokenizer, "chat_template", None):
            raise EvalInputError(f"--chat-template on: tokenizer {tok_ref} has no chat template")
        fingerprint = {"source": "model", "model": model_ref, "tokenizer": tok_ref, "backend": a.backend,
                       **({"adapter": str(Path(a.adapter).resolve())} if a.adapter else {}),
                       "dtype": a.dtype, "k": a.k, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                       "max_tokens": a.max_tokens, "stop": list(a.stop), "seed": a.seed,
                       "prompt_template": a.prompt_template, "system_prompt": a.system_prompt,
                       "chat_template": use_chat, "fallbacks": a.fallbacks}
        if has_tool:
            fingerprint["tool_prompt"] = a.tool_prompt
            if a.tool_prompt == "chat" and not use_chat:
                raise EvalInputError("--tool-prompt chat needs the tokenizer's chat template (it has none, or "
                                     "--chat-template off)")
            if a.tool_prompt == "chat":
                from gdpo.eval.toolcall import check_chat_tools

                check_chat_tools(tokenizer, tok_ref)
        source_desc = f"model ({a.backend})"

    oracle_name = f"oracle-{a.oracle}" + ("-shuffled" if a.oracle_shuffle else "")
    default_name = Path(a.adapter or model_ref).name if model_ref else oracle_name
    out_dir = Path(a.output_dir or Path("runs") / "eval" / default_name)
    _check_output_dir(out_dir)
    if a.overwrite:
        if world > 1:
            raise EvalInputError("--overwrite with several ranks: delete the output dir once, then launch")
        for name in ("results.json", RUN_CONFIG, "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        for p in out_dir.glob("samples.rank*.jsonl"):
            p.unlink()
    from gdpo.eval.runner import check_run_config, data_fingerprint, write_run_config

    fingerprint["data"] = data_fingerprint(runs)  # the samples belong to these data files (path + sha256)
    check_run_config(out_dir, fingerprint)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(out_dir, fingerprint)

    # 3. The grader pool is forked before the model loads (no CUDA state, no model memory in the children).
    from gdpo.eval.runner import Grader, ModelSource, OracleSource, format_table, log_wandb, run_eval

    workers = a.grader_workers if a.grader_workers is not None else min(8, len(os.sched_getaffinity(0)))
    grader = Grader(workers, a.grader_timeout)
    try:
        if a.oracle is not None:
            source = OracleSource(a.oracle, shuffle=a.oracle_shuffle, seed=a.seed, tokenizer=tokenizer,
                                  tokenizer_name=tok_ref, tool_prompt=a.tool_prompt)
        else:
            import torch

            device = a.device
            if device is None and world > 1 and torch.cuda.is_available():
                device = f"cuda:{local_rank}"
            engine = _make_engine(a, model_ref, tokenizer, device)
            own = {} if a.prompt_template else {r.benchmark.name: r.benchmark.prompt_template for r in runs
                                                 if r.benchmark.prompt_template}
            source = ModelSource(engine, tokenizer, prompt_template=a.prompt_template or DEFAULT_PROMPT_TEMPLATE,
                                 system_prompt=a.system_prompt, use_chat_template=use_chat, benchmark_templates=own,
                                 tool_prompt=a.tool_prompt)
        meta = {
            "model": model_ref,
            "completion_source": source_desc,
            "settings": fingerprint,
            "pass_k": pass_ks,
            "maj_k": maj_ks,
            "world_size": world,
        }
        if a.oracle is None:
            meta["prompt_example"] = source.prompt_text(runs[0].problems[0], runs[0].benchmark.name)
        t0 = time.time()
        results = run_eval(source, runs, out_dir=out_dir, k=a.k, pass_ks=pass_ks, maj_ks=maj_ks,
                           exceed_length=a.exceed_length, grader=grader, batch_problems=a.batch_problems,
                           seed=a.seed, rank=rank, world_size=world, progress=not a.no_progress, meta=meta, log=log)
    finally:
        grader.close()
    if results is None:  # not rank 0: rank 0 merges and reports
        return 0
    print(format_table(results), flush=True)
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'samples.jsonl'} ({time.time() - t0:.1f}s)")
    if a.wandb != "disabled":
        from gdpo.eval.runner import SampleStore

        store = SampleStore(out_dir)
        store.refresh()
        note = log_wandb(results, store, mode=a.wandb, project=a.wandb_project, name=a.wandb_name,
                         out_dir=out_dir, max_samples=a.wandb_max_samples)
        if note:
            log(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
