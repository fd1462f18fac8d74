"""Does GDPO beat GRPO when there are several rewards? A small-scale reproduction on the embedded CPU task.

    python benchmarks/reproduce.py --steps 100    # the study in docs/results.md: 3 estimators x 5 seeds, ~25 min
    python benchmarks/reproduce.py --quick        # smoke test: 3 estimators x 2 seeds, 3 steps (~1 min)

The task (gdpo/demo/train_hard.jsonl): two chained arithmetic operations answered as
``<think>…</think>\\n<answer>N</answer>``, so the rewards differ in difficulty as in the paper:
- ``format`` (easy): the think/answer template, which the warm start already mostly follows;
- ``correct`` (hard): the answer is right, which the tiny model gets much less often;
- ``short`` (conditioned on the hard one): the completion fits in LENGTH_LIMIT tokens, counted only when the
  answer is correct (the paper's length reward conditioned on correctness).

Every run starts from the same supervised warm start (trained once, cached in the output directory) and uses the
same budget and hyper-parameters; only ``advantage.estimator`` and the seed change. Each run is ``train.py`` in
its own process (one thread each, ``--jobs`` at a time); the report reads their ``metrics.jsonl``.

What is reported per estimator, over seeds (mean and a 95% t-interval):
- the final mean of each reward (average of the last ``--tail`` steps of a run);
- the correctness-conditioned score: the conditioned reward itself (short and correct), the quantity the paper's
  length experiments trade off against correctness;
- the collapse ratio over training (distinct advantage values per group under GRPO / under the estimator: < 1
  means the estimator separates more reward combinations than GRPO does);
- whether a run collapsed: a reward that reached >= 0.2 and then stays below 0.02 for the last quarter of training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESTIMATORS = ("grpo", "grpo_no_std", "gdpo")
REWARDS = ("correct", "format", "short")
# t_{0.975, n-1} for small n (two-sided 95% interval of a mean over seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_args(sft: Path, estimator: str, seed: int, steps: int, run_dir: Path, length_limit: int,
             extra: list[str]) -> list[str]:
    """The train.py command line of one run: the demo config on the hard task, one estimator and seed."""
    from gdpo.demo.task import TRAIN_HARD_FILE

    rewards = ("[{name: correct, fn: math_correct, weight: 1.0},"
               " {name: format, fn: format, weight: 1.0, kwargs: {template: think_answer}},"
               f" {{name: short, fn: length, weight: 1.0, kwargs: {{max_tokens: {length_limit}}},"
               " condition: {on: correct, threshold: 1.0}}]")
    return [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_gdpo.yaml"),
        f"model.name_or_path={sft}", f"data.path={TRAIN_HARD_FILE}",
        f"advantage.estimator={estimator}", f"train.seed={seed}", f"train.steps={steps}",
        f"train.run_dir={run_dir}", f"rewards.functions={rewards}",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", "logging.completions_every=0",
        # 96 new tokens: the warm start's padded thinking (up to ~80 tokens) fits, so a correct answer can be
        # long and the length reward is not just a copy of correctness (at 48 every long answer is truncated)
        "rollout.max_new_tokens=96", "checkpoint.save_final=false", *extra,
    ]


def run_all(jobs: list[tuple[str, list[str], Path, Path]], parallel: int) -> dict[str, float]:
    """Run every (name, command, log, run dir) with at most ``parallel`` at once; returns seconds per run.
    A finished run leaves its command in ``<run dir>/command.json``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", DS_ACCELERATOR="cpu")
    pending, running, seconds = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log, run_dir = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(log, "w")
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT),
                            fh, time.perf_counter(), cmd, run_dir))
        time.sleep(0.5)
        for item in list(running):
            name, proc, fh, t0, cmd, run_dir = item
            if proc.poll() is None:
                continue
            fh.close()
            running.remove(item)
            seconds[name] = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = Path(fh.name).read_text()[-3000:]
                raise SystemExit(f"run {name} failed (exit {proc.returncode}); its log {fh.name} ends:\n{tail}")
            (run_dir / "command.json").write_text(json.dumps(cmd[1:]))
            print(f"  {name}: {seconds[name]:.0f} s", flush=True)
    return seconds


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def collapsed(series: list[float], *, reached: float = 0.2, floor: float = 0.02) -> bool:
    """A reward that once reached ``reached`` and stays below ``floor`` over the last quarter of the run."""
    q = max(1, len(series) // 4)
    return max(series) >= reached and max(series[-q:]) < floor


def smooth(xs: list[float], w: int) -> list[float]:
    """Trailing moving average (window w), so early points average what exists."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def summarise(runs: dict[str, dict[int, list[dict]]], tail: int) -> dict:
    """Per estimator: final reward means with CIs, collapse ratio, collapsed runs."""
    out = {}
    for est, by_seed in runs.items():
        row = {}
        for r in (*REWARDS, "weighted_sum"):
            finals = [sum(m[f"rewards/{r}/mean"] for m in ms[-tail:]) / len(ms[-tail:]) for ms in by_seed.values()]
            row[r] = mean_ci(finals)
        ratios = [sum(m["adv/collapse_ratio"] for m in ms) / len(ms) for ms in by_seed.values()]
        row["collapse_ratio"] = mean_ci(ratios)
        row["collapsed"] = sorted(f"seed {s}: {r}" for s, ms in by_seed.items() for r in REWARDS
                                  if collapsed([m[f"rewards/{r}/mean"] for m in ms]))
        row["seeds"] = len(by_seed)
        out[est] = row
    return out


def plot(runs: dict[str, dict[int, list[dict]]], path: Path, window: int) -> None:
    """Reward curves and the collapse ratio: mean over seeds (smoothed) with a 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*(f"rewards/{r}/mean" for r in REWARDS), "adv/collapse_ratio"]
    titles = [*(f"reward: {r}" for r in REWARDS), "collapse ratio (GRPO distinct / estimator distinct)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for est, by_seed in runs.items():
        for ax, key in zip(axes, keys):
            curves = [smooth([m[key] for m in ms], window) for ms in by_seed.values()]
            n = min(len(c) for c in curves)
            steps = list(range(1, n + 1))
            stats = [mean_ci([c[i] for c in curves]) for i in range(n)]
            mu = [s[0] for s in stats]
            ax.plot(steps, mu, label=est)
            ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.2)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    cols = [*REWARDS, "weighted_sum", "collapse_ratio"]
    lines = ["| estimator | seeds | " + " | ".join(cols) + " | collapsed runs |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for est, row in summary.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cols]
        collapsed = ", ".join(row["collapsed"]) or "none"
        lines.append(f"| {est} | {row['seeds']} | " + " | ".join(cells) + f" | {collapsed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="RL steps per run (same for every estimator)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--tail", type=int, default=10, help="final value = mean over the last N steps")
    p.add_argument("--out", default="runs/reproduce", help="output directory (runs, warm start, PNG, JSON)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 3 steps, tiny warm start")
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = p.parse_args(argv)

    from gdpo.demo.task import LENGTH_LIMIT
    from gdpo.demo.warmstart import warm_start

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    estimators = [e for e in args.estimators.split(",") if e]
    extra: list[str] = []
    if args.quick:
        args.seeds, args.steps, args.tail = 2, 3, 2
        extra = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=24"]
    t_start = time.perf_counter()

    # 1. one warm start shared by every run (same initial policy; the seed varies the RL sampling)
    sft = warm_start(out, cache_dir=out / "sft", seed=0, steps=20 if args.quick else 800,
                     log=lambda msg: print(msg, flush=True))

    # 2. the runs, seed-major so that the estimators alternate and machine noise hits them alike
    jobs = []
    for seed in range(args.seeds):
        for est in estimators:
            run_dir = out / est / f"seed{seed}"
            cmd = run_args(sft, est, seed, args.steps, run_dir, LENGTH_LIMIT, extra)
            done = run_dir / "command.json"
            if done.exists() and json.loads(done.read_text()) == cmd[1:]:
                continue  # finished earlier with the same settings: rerunning the study resumes it
            if run_dir.exists():
                shutil.rmtree(run_dir)  # unfinished, or other settings
            jobs.append((f"{est}/seed{seed}", cmd, out / "logs" / f"{est}_seed{seed}.log", run_dir))
    print(f"{len(jobs)} runs to do ({len(estimators)} estimators x {args.seeds} seeds, {args.steps} steps), "
          f"{args.jobs} at a time", flush=True)
    run_all(jobs, args.jobs)

    # 3. read, summarise, plot
    runs = {est: {s: read_metrics(out / est / f"seed{s}") for s in range(args.seeds)} for est in estimators}
    summary = summarise(runs, args.tail)
    png = out / "reproduce_curves.png"
    plot(runs, png, window=max(1, args.steps // 10))
    minutes = (time.perf_counter() - t_start) / 60
    text = table(summary)
    command = "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(text)
    print(f"curves: {png}")
    print(f"wall time: {minutes:.1f} min")
    print(f"command: {command.strip()}")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "minutes": minutes, "steps": args.steps,
                                                  "seeds": args.seeds, "command": command.strip()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
