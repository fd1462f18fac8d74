"""Does GDPO beat GRPO when there are several rewards? A small-scale reproduction on the embedded CPU task.

    python benchmarks/reproduce.py --steps 100    # the study in docs/results.md: 3 estimators x 5 seeds, ~25 min
    python benchmarks/reproduce.py --quick        # smoke test: 3 estimators x 2 seeds, 3 steps (~1 min)
    python benchmarks/reproduce.py --task independent   # second study: independent rewards, G = 4 (docs/results.md)
    python benchmarks/reproduce.py --task independent --quick

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

``--task independent`` (gdpo/demo/independent.py): an easy and a hard question in one prompt, answered as
``<answer>E, H</answer>``, with three independent binary rewards (``format``, ``easy``, ``hard``) whose warm-start
rates differ widely; G = 4 and four estimators (GDPO w/o std = the gdpo preset with advantage.group_std=false).
It adds the paired differences (GDPO minus each other estimator, per seed), the collapse ratio over the first and
the last quarter of training, and a second collapse test for a rare reward: its last-quarter mean falls below a
third of its first-10-step mean.
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
# The train.py overrides behind each estimator label of the study.
# Steps per run of the independent study: see docs/results.md (pilot timing and power estimate).
STEPS_INDEPENDENT = 100
ESTIMATOR_ARGS = {
    "grpo": ["advantage.estimator=grpo"],
    "grpo_no_std": ["advantage.estimator=grpo_no_std"],
    "gdpo": ["advantage.estimator=gdpo"],
    "gdpo_no_std": ["advantage.estimator=gdpo", "advantage.group_std=false"],
}
# t_{0.975, n-1} for small n (two-sided 95% interval of a mean over seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        24: 2.064, 29: 2.045}
# t_{0.80, n-1}: with T975, the one-sided 80% power term of a paired t-test's smallest detectable effect
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 16: 0.865, 17: 0.863, 18: 0.862, 19: 0.861, 20: 0.860,
       24: 0.857, 29: 0.854}


def run_args_independent(sft: Path, estimator: str, seed: int, steps: int, run_dir: Path,
                         extra: list[str]) -> list[str]:
    """The train.py command line of one run of the independent-rewards study (G = 4, three independent rewards)."""
    from gdpo.demo.independent import TRAIN_FILE

    part = "fn: 'gdpo.demo.independent:answer_part', weight: 1.0"
    rewards = ("[{name: format, fn: format, weight: 1.0, kwargs: {template: think_answer}},"
               f" {{name: easy, {part}, kwargs: {{part: 0}}}}, {{name: hard, {part}, kwargs: {{part: 1}}}}]")
    return [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_gdpo.yaml"),
        f"model.name_or_path={sft}", f"data.path={TRAIN_FILE}", *ESTIMATOR_ARGS[estimator],
        f"train.seed={seed}", f"train.steps={steps}", f"train.run_dir={run_dir}", f"rewards.functions={rewards}",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", "logging.completions_every=0",
        # G = 4 as in the paper's tool-calling recipe; completions of the SFT mix take <= 50 tokens
        "rollout.group_size=4", "rollout.max_new_tokens=56", "checkpoint.save_final=false", *extra,
    ]


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
        *ESTIMATOR_ARGS[estimator], f"train.seed={seed}", f"train.steps={steps}",
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


def t975(df: int) -> float:
    """t_{0.975, df}: the table, the next smaller tabulated df between entries (conservative), 1.96 past 29."""
    if df > 29:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t975(n - 1) * sd / math.sqrt(n)


def collapsed(series: list[float], *, reached: float = 0.2, floor: float = 0.02) -> bool:
    """A reward that once reached ``reached`` and stays below ``floor`` over the last quarter of the run."""
    q = max(1, len(series) // 4)
    return max(series) >= reached and max(series[-q:]) < floor


def decayed(series: list[float], *, start_steps: int = 10, frac: float = 1 / 3, min_start: float = 0.02) -> bool:
    """A rare reward that fades: its mean over the last quarter is below ``frac`` of its mean over the first
    ``start_steps`` steps (which must be at least ``min_start``, so a reward that never fired cannot fade)."""
    start = series[:start_steps]
    q = max(1, len(series) // 4)
    s0 = sum(start) / len(start)
    return s0 >= min_start and sum(series[-q:]) / q < frac * s0


def paired(runs: dict[str, dict[int, list[dict]]], rewards: tuple[str, ...], tail: int,
           base: str = "gdpo") -> dict[str, dict[str, tuple[float, float, int, int]]]:
    """Per other estimator and reward: (mean, 95% half-width, seeds where base is ahead, seeds) of the per-seed
    difference base minus other, over the seeds both ran."""
    def final(ms: list[dict], r: str) -> float:
        return sum(m[f"rewards/{r}/mean"] for m in ms[-tail:]) / len(ms[-tail:])

    out = {}
    for est, by_seed in runs.items():
        if est == base or base not in runs:
            continue
        seeds = sorted(set(by_seed) & set(runs[base]))
        row = {}
        for r in (*rewards, "weighted_sum"):
            d = [final(runs[base][s], r) - final(by_seed[s], r) for s in seeds]
            row[r] = (*mean_ci(d), sum(x > 0 for x in d), len(d))
        out[est] = row
    return out


def detectable(sd: float, n: int) -> float:
    """Smallest true mean difference a two-sided 5% paired t-test over ``n`` seeds finds with 80% power, given the
    sd of the per-seed differences: (t_{0.975} + t_{0.80}) * sd / sqrt(n), df = n - 1 (normal quantiles past 29)."""
    df = n - 1
    t80 = 0.842 if df > 29 else T80[max(k for k in T80 if k <= df)]
    return (t975(df) + t80) * sd / math.sqrt(n)


def smooth(xs: list[float], w: int) -> list[float]:
    """Trailing moving average (window w), so early points average what exists."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def summarise(runs: dict[str, dict[int, list[dict]]], tail: int, rewards: tuple[str, ...] = REWARDS) -> dict:
    """Per estimator: final reward means with CIs, collapse ratio (whole run, first and last quarter), each
    reward's share of |advantage|, collapsed runs."""
    out = {}
    for est, by_seed in runs.items():
        row = {}
        for r in (*rewards, "weighted_sum"):
            finals = [sum(m[f"rewards/{r}/mean"] for m in ms[-tail:]) / len(ms[-tail:]) for ms in by_seed.values()]
            row[r] = mean_ci(finals)
        ratios = [sum(m["adv/collapse_ratio"] for m in ms) / len(ms) for ms in by_seed.values()]
        row["collapse_ratio"] = mean_ci(ratios)
        quarters = [(ms[:max(1, len(ms) // 4)], ms[-max(1, len(ms) // 4):]) for ms in by_seed.values()]
        for name, which in (("collapse_ratio_first_q", 0), ("collapse_ratio_last_q", 1)):
            row[name] = mean_ci([sum(m["adv/collapse_ratio"] for m in q[which]) / len(q[which]) for q in quarters])
        for r in rewards:
            shares = [sum(m.get(f"adv/{r}/share", float("nan")) for m in ms) / len(ms) for ms in by_seed.values()]
            row[f"share/{r}"] = mean_ci(shares)
            flat = [sum(m.get(f"adv/{r}/zero_spread_frac", float("nan")) for m in ms) / len(ms)
                    for ms in by_seed.values()]
            row[f"no_signal/{r}"] = mean_ci(flat)
        row["collapsed"] = sorted(f"seed {s}: {r}" for s, ms in by_seed.items() for r in rewards
                                  if collapsed([m[f"rewards/{r}/mean"] for m in ms]))
        row["decayed"] = sorted(f"seed {s}: {r}" for s, ms in by_seed.items() for r in rewards
                                if decayed([m[f"rewards/{r}/mean"] for m in ms]))
        row["seeds"] = len(by_seed)
        out[est] = row
    return out


def plot(runs: dict[str, dict[int, list[dict]]], path: Path, window: int, rewards: tuple[str, ...] = REWARDS) -> None:
    """Reward curves and the collapse ratio: mean over seeds (smoothed) with a 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*(f"rewards/{r}/mean" for r in rewards), "adv/collapse_ratio"]
    titles = [*(f"reward: {r}" for r in rewards), "collapse ratio (GRPO distinct / estimator distinct)"]
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


def table(summary: dict, rewards: tuple[str, ...] = REWARDS) -> str:
    cols = [*rewards, "weighted_sum", "collapse_ratio"]
    lines = ["| estimator | seeds | " + " | ".join(cols) + " | collapsed runs |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for est, row in summary.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cols]
        collapsed = ", ".join(row["collapsed"]) or "none"
        lines.append(f"| {est} | {row['seeds']} | " + " | ".join(cells) + f" | {collapsed} |")
    return "\n".join(lines)


def table_extra(summary: dict, rewards: tuple[str, ...]) -> str:
    """Collapse ratio early and late, each reward's share of |advantage|, the share of groups where a reward takes one
    value (no signal there), and the fading-reward test."""
    cols = ["collapse_ratio_first_q", "collapse_ratio_last_q", *(f"share/{r}" for r in rewards),
            *(f"no_signal/{r}" for r in rewards)]
    lines = ["| estimator | " + " | ".join(cols) + " | faded rewards |", "|---|" + "---|" * len(cols) + "---|"]
    for est, row in summary.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cols]
        lines.append(f"| {est} | " + " | ".join(cells) + f" | {', '.join(row['decayed']) or 'none'} |")
    return "\n".join(lines)


def table_paired(diffs: dict, rewards: tuple[str, ...], base: str = "gdpo") -> str:
    """Paired differences; below each estimator's row, the effect its seed count could detect (80% power)."""
    cols = [*rewards, "weighted_sum"]
    lines = [f"| {base} minus | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for est, row in diffs.items():
        cells = [f"{row[c][0]:+.3f} ± {row[c][1]:.3f} ({row[c][2]}/{row[c][3]})" for c in cols]
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
        n = row[cols[0]][3]
        if n > 1:  # sd of the differences, back out of the interval's half-width
            mde = [detectable(row[c][1] * math.sqrt(n) / t975(n - 1), n) for c in cols]
            lines.append(f"| (detectable at 80% power, {n} seeds) | " + " | ".join(f"{x:.3f}" for x in mde) + " |")
    return "\n".join(lines)


# Per task: the rewards reported, the estimators compared, the defaults of the study, the warm start's SFT file.
TASKS = {
    "hard": {"rewards": REWARDS, "estimators": ESTIMATORS, "seeds": 5, "steps": 100, "out": "runs/reproduce",
             "png": "reproduce_curves.png"},
    "independent": {"rewards": ("format", "easy", "hard"), "estimators": ("grpo", "grpo_no_std", "gdpo", "gdpo_no_std"),
                    "seeds": 8, "steps": STEPS_INDEPENDENT, "out": "runs/reproduce_independent",
                    "png": "reproduce_independent_curves.png"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="hard",
                   help="hard: the demo's hard task (nested rewards, G = 8); independent: independent rewards, G = 4")
    p.add_argument("--seeds", type=int, default=None, help="seeds per estimator (default: 5 hard, 8 independent)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run, the same for every estimator "
                   f"(default: 100 hard, {STEPS_INDEPENDENT} independent)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--tail", type=int, default=10, help="final value = mean over the last N steps")
    p.add_argument("--out", default=None, help="output directory (runs, warm start, PNG, JSON); default "
                   "runs/reproduce or runs/reproduce_independent")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 steps, tiny warm start, 2 seeds (1 for --task independent)")
    p.add_argument("--estimators", default=None, help="comma-separated subset of " + ",".join(ESTIMATOR_ARGS))
    args = p.parse_args(argv)
    task = TASKS[args.task]
    rewards = task["rewards"]
    args.seeds = task["seeds"] if args.seeds is None else args.seeds
    args.steps = task["steps"] if args.steps is None else args.steps
    estimators = list(task["estimators"]) if args.estimators is None else [e for e in args.estimators.split(",") if e]
    unknown = [e for e in estimators if e not in ESTIMATOR_ARGS]
    if unknown:
        p.error(f"--estimators: unknown {', '.join(unknown)}; allowed: {', '.join(ESTIMATOR_ARGS)}")
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1:
        p.error("--seeds, --steps and --jobs must be >= 1")

    from gdpo.demo.task import LENGTH_LIMIT
    from gdpo.demo.task import SFT_FILE as HARD_SFT_FILE
    from gdpo.demo.warmstart import warm_start

    out = Path(args.out or task["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if args.quick:
        # the independent task has 4 estimators: one seed keeps its smoke run under ~1 min (process start dominates)
        args.seeds, args.steps, args.tail = (1 if args.task == "independent" else 2), 3, 2
        extra = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=24"]
    t_start = time.perf_counter()

    # 1. one warm start shared by every run (same initial policy; the seed varies the RL sampling)
    if args.task == "independent":
        from gdpo.demo.independent import SFT_FILE
    else:
        SFT_FILE = HARD_SFT_FILE
    sft = warm_start(out, cache_dir=out / "sft", seed=0, steps=20 if args.quick else 800, sft_file=SFT_FILE,
                     log=lambda msg: print(msg, flush=True))

    # 2. the runs, seed-major so that the estimators alternate and machine noise hits them alike
    jobs = []
    for seed in range(args.seeds):
        for est in estimators:
            run_dir = out / est / f"seed{seed}"
            if args.task == "independent":
                cmd = run_args_independent(sft, est, seed, args.steps, run_dir, extra)
            else:
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
    summary = summarise(runs, args.tail, rewards)
    diffs = paired(runs, rewards, args.tail)
    png = out / task["png"]
    plot(runs, png, window=max(1, args.steps // 10), rewards=rewards)
    minutes = (time.perf_counter() - t_start) / 60
    command = "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(summary, rewards))
    if args.task == "independent":
        print()
        print(table_extra(summary, rewards))
    if diffs:
        print()
        print("paired differences, per seed (mean ± 95% interval; in brackets: seeds where gdpo is ahead / seeds)")
        print(table_paired(diffs, rewards))
    print(f"curves: {png}")
    print(f"wall time: {minutes:.1f} min")
    print(f"command: {command.strip()}")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "paired": diffs, "minutes": minutes,
                                                  "task": args.task, "steps": args.steps, "seeds": args.seeds,
                                                  "command": command.strip()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
