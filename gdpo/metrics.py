"""Where a run's numbers go: ``metrics.jsonl`` in the run directory (always), W&B (online / offline /
disabled), one concise line per step on stdout under a tqdm bar, a completions table every N steps, and a PNG
of the reward curves at the end. Only the main rank logs; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


# ----------------------------------------------------------------------------------------------------------
# A step's metrics, reduced explicitly over ranks.

_SUM_KINDS = ("mean", "sum", "std", "corr", "ratio")


class Metrics:
    """A step's metrics as local statistics that reduce exactly over ranks.

    Each metric says how it combines: ``mean`` (NaN-aware: sum and count of the finite values), ``sum``,
    ``max`` / ``min`` (NaN-aware), ``std`` (sample std from summed moments n, sum x, sum x^2: the std of the
    whole batch, not a mean of per-rank stds), ``corr`` (Pearson from summed pair moments) and ``ratio``
    (sum num / sum den). `reduce(all_reduce)` packs everything into three float64 vectors (sum, max, min), so a
    step costs three collectives whatever the number of metrics; every rank must record the same keys in the
    same order, which `reduce` checks.

    >>> m = Metrics(); m.mean_of("len/mean", torch.tensor([1.0, float("nan"), 3.0])); m.max("len/max", 3.0)
    >>> m.std("r/std", torch.tensor([0.0, 1.0, 1.0, 0.0])); m.reduce()
    {'len/mean': 2.0, 'len/max': 3.0, 'r/std': 0.5773502691896257}
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, str, list[float], Any]] = []  # (key, kind, payload, option)

    def _add(self, key: str, kind: str, payload: list[float], option: Any = None) -> None:
        self._entries.append((key, kind, [float(v) for v in payload], option))

    def mean(self, key: str, total: float, count: float = 1.0) -> None:
        """A mean over ranks of values worth ``count`` items each (a NaN total counts for nothing)."""
        if math.isnan(total):
            total, count = 0.0, 0.0
        self._add(key, "mean", [total, count])

    def mean_of(self, key: str, values) -> None:
        """The mean of the finite entries of ``values`` [n] over all ranks (NaN if there are none)."""
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        v = v[~torch.isnan(v)]
        self._add(key, "mean", [v.sum().item(), v.numel()])

    def sum(self, key: str, value: float) -> None:
        self._add(key, "sum", [value])

    def max(self, key: str, value: float) -> None:
        self._add(key, "max", [-math.inf if math.isnan(value) else value])

    def min(self, key: str, value: float) -> None:
        self._add(key, "min", [math.inf if math.isnan(value) else value])

    def std(self, key: str, values, *, small: float = 0.0) -> None:
        """Sample std of the finite entries of ``values`` over all ranks; ``small`` where fewer than two."""
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        v = v[~torch.isnan(v)]
        self._add(key, "std", [v.numel(), v.sum().item(), (v * v).sum().item()], small)

    def corr(self, key: str, x, y) -> None:
        """Pearson correlation of paired values (rows where both are finite) over all ranks."""
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        both = ~(torch.isnan(x) | torch.isnan(y))
        x, y = x[both], y[both]
        self._add(key, "corr", [x.numel(), x.sum().item(), y.sum().item(), (x * x).sum().item(),
                                (y * y).sum().item(), (x * y).sum().item()])

    def ratio(self, key: str, num: float, den: float, *, empty: float = math.nan) -> None:
        """sum(num) / sum(den) over ranks; ``empty`` where the denominator sums to 0."""
        self._add(key, "ratio", [num, den], empty)

    def keys(self) -> list[str]:
        return [e[0] for e in self._entries]

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> dict[str, float]:
        """The final values; ``all_reduce(tensor, op)`` combines over ranks (None: a world of one)."""
        import zlib

        sig = float(zlib.crc32(";".join(f"{k}:{kind}" for k, kind, _, _ in self._entries).encode()))
        parts = {"sum": [], "max": [sig], "min": [sig]}
        for _, kind, payload, _ in self._entries:
            parts["sum" if kind in _SUM_KINDS else kind].extend(payload)
        vecs = {op: torch.tensor(v, dtype=torch.float64) for op, v in parts.items()}
        if all_reduce is not None:
            vecs = {op: all_reduce(v, op) for op, v in vecs.items()}
        if vecs["max"][0] != vecs["min"][0]:
            raise RuntimeError("ranks recorded different metrics this step (their key lists differ)")
        pos = {"sum": 0, "max": 1, "min": 1}
        out: dict[str, float] = {}
        for key, kind, payload, option in self._entries:
            op = "sum" if kind in _SUM_KINDS else kind
            v = vecs[op][pos[op] : pos[op] + len(payload)].tolist()
            pos[op] += len(payload)
            out[key] = _final(kind, v, option)
        return out


def _final(kind: str, v: list[float], option: Any) -> float:
    if kind == "mean":
        return v[0] / v[1] if v[1] > 0 else math.nan
    if kind == "sum":
        return v[0]
    if kind in ("max", "min"):
        return v[0] if math.isfinite(v[0]) else math.nan
    if kind == "ratio":
        return v[0] / v[1] if v[1] != 0 else option
    if kind == "std":
        n, s1, s2 = v
        if n < 2:
            return option
        return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1))
    n, sx, sy, sxx, syy, sxy = v  # corr
    if n < 2:
        return math.nan
    vx, vy, cov = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    if vx <= 1e-12 * max(sxx, 1e-300) or vy <= 1e-12 * max(syy, 1e-300):
        return math.nan  # a constant column: no correlation defined
    return max(-1.0, min(1.0, cov / math.sqrt(vx * vy)))


def step_metrics(
    sb,  # gdpo.sampling.StepBatch
    advantages: torch.Tensor,  # [N]
    upd,  # gdpo.update.UpdateStats
    *,
    names: Sequence[str],
    weights: Sequence[float],
    adv_kwargs: dict[str, Any],
    timings: dict[str, float],
    sync_stats: dict[str, float] | None = None,
) -> Metrics:
    """Everything a step logs, recorded with its reduction over ranks (see `Metrics`)."""
    from gdpo.advantage.diagnostics import record_advantage_stats

    m = Metrics()
    rewards = sb.rewards
    for k, name in enumerate(names):
        m.mean_of(f"rewards/{name}/mean", rewards[:, k])
        m.std(f"rewards/{name}/std", rewards[:, k])
        m.max(f"rewards/{name}/seconds", sb.reward_seconds.get(name, 0.0))
        m.sum(f"rewards/{name}/errors", sb.reward_errors.get(name, 0))
        m.sum(f"rewards/{name}/timeouts", sb.reward_timeouts.get(name, 0))
        m.sum(f"rewards/{name}/memory_kills", sb.reward_memory_kills.get(name, 0))
        m.mean_of(f"rewards/{name}/nan_frac", torch.isnan(rewards[:, k]).double())
    w = torch.tensor(list(weights), dtype=rewards.dtype)
    m.mean_of("rewards/weighted_sum/mean", (torch.nan_to_num(rewards) * w).sum(1))
    record_advantage_stats(m, rewards, advantages.cpu(), sb.rollout.group_size, names, weights=weights,
                           **adv_kwargs)
    for k, v in upd.means.items():
        if k == "logprob_gap":
            m.mean("sampling/logprob_gap", v)
        elif k != "num_tokens":
            m.mean(f"loss/{k}", v)
    m.mean("optim/grad_norm", upd.grad_norm)
    m.mean("optim/lr", upd.lr)
    m.max("optim/micro_batches", upd.micro_batches)  # forwards + backwards per step (ranks agree under a budget)
    m.mean("optim/pad_frac", upd.pad_frac)  # share of the update's forward positions that were padding
    lengths = sb.rollout.completion_lengths.double()
    m.mean_of("len/mean", lengths)
    m.max("len/max", lengths.max().item())
    m.min("len/min", lengths.min().item())
    m.sum("len/tokens", lengths.sum().item())
    m.mean_of("len/truncated_frac", sb.rollout.truncated.double())
    m.sum("sampling/dropped_groups", sb.dropped_groups)
    m.max("sampling/rounds", sb.rounds)
    for k, v in sorted((sync_stats or {}).items()):
        m.max(k, v)
    for k, v in sorted(sb.rollout_stats.items()):
        (m.max if k == "rollout/seconds" else m.sum)(k, v)  # ranks generate in parallel: rates add up
    for k, v in timings.items():
        m.max(f"time/{k}", v)
    return m


WANDB_GROUPS = ("rewards", "adv", "loss", "len", "time", "optim", "sampling", "rollout", "throughput", "weight_sync")


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode to use, a note for the user). ``online`` without an API key falls back to ``offline``."""
    if requested != "online":
        return requested, None
    if os.environ.get("WANDB_API_KEY"):
        return "online", None
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online", None
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc): logging offline; `wandb sync` uploads later"


def _fmt(v: float) -> str:
    if not isinstance(v, (int, float)) or math.isnan(v):
        return "nan"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


class RunLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        active: bool = True,
        total_steps: int = 0,
        start_step: int = 0,
        progress_bar: bool = True,
        wandb_mode_requested: str = "offline",
        project: str = "gdpo",
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        config: dict | None = None,
        reward_names: Sequence[str] = (),
    ):
        self.active = active
        self.run_dir = Path(run_dir)
        self.reward_names = list(reward_names)
        self.history: list[dict[str, Any]] = []
        self._wandb = None
        self._bar = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        mode, note = wandb_mode(wandb_mode_requested)
        if note:
            print(note, flush=True)
        self.wandb_mode = mode
        if mode != "disabled":
            import wandb

            self._wandb = run = wandb.init(
                mode=mode,
                project=project,
                entity=entity,
                name=name or self.run_dir.name,
                tags=list(tags),
                config=config or {},
                dir=str(self.run_dir),
                resume="allow",
                id=_run_id(self.run_dir),
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
            # Every chart against train/step, one panel section per metric group: a new project's dashboard is
            # readable without editing panels.
            run.define_metric("train/step")
            for group in WANDB_GROUPS:
                run.define_metric(f"{group}/*", step_metric="train/step")
        if progress_bar and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        line = self.step_line(step, metrics)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path, *, active: bool, total_steps: int, start_step: int = 0,
                    config: dict | None = None, reward_names: Sequence[str] = ()) -> "RunLogger":
        """A logger from the ``logging`` config section (gdpo.config.LoggingConfig)."""
        return cls(run_dir, active=active, total_steps=total_steps, start_step=start_step,
                   progress_bar=cfg.progress_bar, wandb_mode_requested=cfg.wandb.mode, project=cfg.wandb.project,
                   entity=cfg.wandb.entity, name=cfg.wandb.name, tags=cfg.wandb.tags, config=config,
                   reward_names=reward_names)

    def log_histogram(self, step: int, key: str, values: torch.Tensor) -> None:
        """A W&B histogram (e.g. the step's advantages); nothing without W&B."""
        if not self.active or self._wandb is None:
            return
        import wandb

        self._wandb.log({key: wandb.Histogram(values.detach().float().cpu().numpy())}, step=step)

    def step_line(self, step: int, m: dict[str, float]) -> str:
        """One concise line: rewards, advantage collapse, loss, lengths, time split."""
        rewards = " ".join(f"{n} {_fmt(m.get(f'rewards/{n}/mean', float('nan')))}" for n in self.reward_names)
        parts = [
            f"step {step}",
            rewards,
            f"collapse {_fmt(m.get('adv/collapse_ratio', float('nan')))}",
            f"loss {_fmt(m.get('loss/loss', float('nan')))} kl {_fmt(m.get('loss/approx_kl', float('nan')))}",
            f"len {_fmt(m.get('len/mean', float('nan')))} trunc {_fmt(m.get('len/truncated_frac', float('nan')))}",
            f"{m.get('time/step', 0.0):.1f}s (gen {m.get('time/generate', 0.0):.1f} rew {m.get('time/reward', 0.0):.1f}"
            f" upd {m.get('time/update', 0.0):.1f})",
        ]
        return " | ".join(p for p in parts if p)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """rows: dicts with prompt, completion, one key per reward, advantage."""
        if not self.active or not rows:
            return
        with open(self.run_dir / "completions.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self._wandb is not None:
            import wandb

            cols = list(rows[0])
            table = wandb.Table(columns=["step"] + cols, data=[[step] + [r[c] for c in cols] for r in rows])
            self._wandb.log({"completions": table}, step=step)

    def finish(self) -> Path | None:
        """Close everything; write ``reward_curves.png``; return its path."""
        if not self.active:
            return None
        if self._bar is not None:
            self._bar.close()
        png = self.plot_rewards(self.run_dir / "reward_curves.png")
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        return png

    def plot_rewards(self, path: Path) -> Path | None:
        rows = read_metrics(self.run_dir / "metrics.jsonl")
        if not rows or not self.reward_names:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        steps = [r["step"] for r in rows]
        for n in self.reward_names:
            ys = [r.get(f"rewards/{n}/mean", float("nan")) for r in rows]
            ax.plot(steps, ys, label=n, alpha=0.35)
            ax.plot(steps, _smooth(ys), color=ax.lines[-1].get_color(), label=f"{n} (smoothed)")
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(ys)):
        w = [y for y in ys[max(0, i - k + 1) : i + 1] if not math.isnan(y)]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def _run_id(run_dir: Path) -> str:
    """A stable W&B id per run directory, so a resumed run continues the same W&B run."""
    f = run_dir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; a resumed run's repeated steps keep the last value written."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]
