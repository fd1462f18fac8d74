"""The training command line: ``python train.py`` and the installed ``gdpo-train`` script are this module.

    gdpo-train --config configs/tiny_gdpo.yaml [key=value ...]
    deepspeed train.py --config configs/math_gdpo.yaml
    python train.py --config configs/math_gdpo.yaml --dry-run   # no GPU, no weights: plan + first prompt

A config mistake prints one line and exits with code 2. The loop itself lives in gdpo/trainer.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description="Multi-reward RL (GRPO / GRPO w/o std / GDPO) for language models.",
        epilog="Overrides: key=value, e.g. advantage.estimator=grpo rewards.functions.0.weight=2",
    )
    p.add_argument("--config", help="YAML config file (omit for all defaults)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and meaning")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--dry-run", action="store_true", help="check everything that needs no GPU and no weights "
                   "(rewards, tokenizer, data, batch plan, resume path), print the plan and the first prompt, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        p.error(f"unrecognised option {bad[0]!r}; overrides are written key=value")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from gdpo.config import ConfigError, field_docs, load_config

    if args.help_config:
        for key, tp, doc in field_docs():
            print(f"{key}  ({tp})\n    {doc}")
        return 0
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check:  # also everything that needs no weights: files, rewards, run dir, resume (gdpo/preflight.py)
        from gdpo.preflight import preflight

        try:
            preflight(cfg)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        print(f"config OK: {args.config or '(defaults)'}")
        return 0
    if args.dry_run:
        from gdpo.dryrun import dry_run

        return dry_run(cfg)
    from gdpo.trainer import train

    try:
        train(cfg)
    except ConfigError as e:  # problems only visible once files are opened (data fields, reward functions...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def train_main() -> None:
    """The ``gdpo-train`` console script (installed with the package): the same as ``python train.py``."""
    sys.exit(main())
