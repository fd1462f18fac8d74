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
from typing import Any, Sequence


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

            self._wandb = wandb.init(
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
