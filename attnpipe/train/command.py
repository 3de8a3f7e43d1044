"""The ``attnpipe train`` sub-command: arguments and the call into :func:`attnpipe.train.trainer.train_head`.

Wired into ``attnpipe.cli`` (and ``jobs/train_head.py``) with::

    p = sub.add_parser("train", help="...")
    _config_args(p)
    add_train_arguments(p)
    COMMANDS["train"] = run_train_command

Errors (ConfigError, InputError, CheckpointMismatch, other ValueErrors) propagate to the caller, which turns them
into exit status 2 the way ``cli.main`` does for every sub-command.
"""

from __future__ import annotations

import argparse
import json


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``p`` (``--config``, ``--set`` and ``--ray-address`` come from ``cli``)."""
    p.add_argument("--input", nargs="+", required=True, help="labeled shard files or directories (local or URI)")
    p.add_argument(
        "--out",
        required=True,
        help="trained encoder, a .safetensors file; its sidecar <stem>.json and checkpoints <stem>.ckpt/ go next to it",
    )
    p.add_argument("--pooling", default=None, help="the head to train; same as a last --set model.pooling=NAME")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="delete any checkpoint next to --out and start from epoch 1",
    )
    p.add_argument("--json", action="store_true", help="print the training summary as one JSON line on stdout")


def run_train_command(args: argparse.Namespace) -> int:
    """Build the config from ``args``, train, print the summary; returns the exit status (0)."""
    from attnpipe.config import load_config
    from attnpipe.train.trainer import train_head

    overrides = [*args.overrides, *([f"model.pooling={args.pooling}"] if args.pooling else [])]
    cfg = load_config(args.config, overrides)
    summary = train_head(args.input, args.out, cfg, resume=args.resume, ray_address=args.ray_address)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        best = summary["history"][summary["best_epoch"] - 1] if summary["best_epoch"] else {}
        print(
            f"wrote {summary['weights']} (best epoch {summary['best_epoch']}: val map@r "
            f"{best.get('map@r', float('nan')):.4f}, p@1 {best.get('precision@1', float('nan')):.4f}); "
            f"encode with --set model.weights={summary['weights']}"
        )
    return 0
