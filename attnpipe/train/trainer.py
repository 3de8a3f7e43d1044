"""``attnpipe train``: fit the pooling head the encoder uses on labeled shards, and save it as an encoder artifact.

Loads and decodes the labeled images once, holds out a stratified validation split, resumes from
``<out stem>.ckpt/`` when a compatible checkpoint is there, trains in this process (``train.workers=0``) or on Ray
Train workers, and writes ``<out>`` (``.safetensors``, the whole encoder) plus ``<out stem>.json`` (its sidecar).
Encode with it through ``--set model.weights=<out>``.

Example::

    cfg = load_config(overrides=["model.pooling=attn", "train.epochs=20"])
    summary = train_head(["data/train"], "out/head.safetensors", cfg)
    summary["best_epoch"], summary["history"][-1]["map@r"], summary["weights"]

    # a short schedule, e.g. for a demo: 5 epochs, stop after 2 without improvement
    train_head(inputs, "out/head.safetensors", load_config(overrides=["train.epochs=5", "train.patience=2"]))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from attnpipe import fs
from attnpipe.config import Config
from attnpipe.models.artifact import read_sidecar, sidecar_path
from attnpipe.train import checkpoint as ckpt
from attnpipe.train.data import load_labeled, split_holdout
from attnpipe.train.fit import Job, fit, stderr_progress


def train_head(
    inputs: list[str],
    out: str,
    cfg: Config,
    *,
    resume: bool = True,
    ray_address: str | None = None,
    progress: Callable[[str], None] = stderr_progress,
    _crash_after: int | None = None,
) -> dict:
    """Train ``cfg.model.pooling`` (with ``cfg.train``) on the labeled images of ``inputs``; write ``out``.

    Args:
        out: the artifact path, ending in ``.safetensors``; the sidecar and checkpoint directory go next to it.
        resume: continue from a compatible checkpoint (False: delete any checkpoint and start over).
        progress: receives one line per epoch (in the rank-0 worker when ``train.workers > 0``).
        _crash_after: test hook; raise :class:`~attnpipe.train.fit.SimulatedCrash` after that epoch index.

    Returns:
        ``weights``, ``sidecar``, ``checkpoint`` paths; ``start_epoch`` (0-based index of the first epoch run by this
        call), ``epochs_done``, ``best_epoch`` (1-based), ``stopped_early``, ``history`` (per epoch: losses,
        validation ``map@r`` and ``precision@1``, seconds), ``train_images``, ``val_images``, ``skipped``, ``labels``
        and ``seconds``.

    Raises:
        ValueError: ``out`` is not a ``.safetensors`` path, or the head has nothing to train.
        attnpipe.data.shards.InputError: no labeled image, or no label with enough images to validate on.
        attnpipe.train.checkpoint.CheckpointMismatch: the checkpoint at ``out`` belongs to another run.
    """
    start = time.perf_counter()
    if not fs.display(out).endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file (the trained encoder), got {out!r}")
    if not fs.is_local(out):  # train beside a local cache copy (checkpoints stay there), then upload the artifact
        summary = train_head(
            inputs,
            _local_target(out),
            cfg,
            resume=resume,
            ray_address=ray_address,
            progress=progress,
            _crash_after=_crash_after,
        )
        fs.write_bytes(out, fs.read_bytes(summary["weights"]))  # weights first, the sidecar names them: last
        fs.write_bytes(sidecar_path(out), fs.read_bytes(summary["sidecar"]))
        return {**summary, "weights": out, "sidecar": sidecar_path(out)}
    data = load_labeled(inputs, cfg.data)
    train_rows, val_rows = split_holdout(data.labels, cfg.train.val_fraction, cfg.train.seed)
    compat = ckpt.compat_record(cfg, data.classes, data.fingerprint())
    directory = ckpt.checkpoint_dir(out)
    if not resume:
        ckpt.remove_checkpoint(directory)
    state = ckpt.load_checkpoint(directory, compat)
    progress(
        f"train: {len(train_rows)} training and {len(val_rows)} held-out images, {len(data.classes)} labels, "
        f"skipped {data.skipped}; {cfg.model.backbone} + {cfg.model.pooling}, unfreeze={cfg.train.unfreeze}, "
        f"workers={cfg.train.workers}"
    )
    job = Job(cfg, out, data, train_rows, val_rows, compat, state, _crash_after)
    if cfg.train.workers == 0:
        fit(job, progress=progress)
    else:
        from attnpipe.train.distributed import run_distributed

        run_distributed(job, ray_address, progress)
    meta = read_sidecar(out)
    if meta is None:
        raise RuntimeError(f"training finished but no artifact sidecar was found at {sidecar_path(out)}")
    return {
        "weights": out,
        "sidecar": sidecar_path(out),
        "checkpoint": directory,
        "start_epoch": state["epoch"] if state else 0,
        "epochs_done": len(meta["history"]),
        "best_epoch": meta["best_epoch"],
        "stopped_early": meta["stopped_early"],
        "history": meta["history"],
        "train_images": len(train_rows),
        "val_images": len(val_rows),
        "skipped": data.skipped,
        "labels": data.classes,
        "seconds": round(time.perf_counter() - start, 2),
    }


def train_for_demo(inputs: list[str], out: str, cfg: Config, epochs: int = 5) -> str:
    """A short schedule for the demo (at most ``epochs`` epochs, patience 2, starting over); returns the weights."""
    t = dataclasses.replace(cfg.train, epochs=min(cfg.train.epochs, epochs), patience=2)
    return train_head(inputs, out, dataclasses.replace(cfg, train=t), resume=False)["weights"]


def _local_target(out: str) -> str:
    """Where a run for the object-store artifact ``out`` trains and keeps its checkpoints on this machine."""
    import os

    return os.path.join(fs.cache_dir("train", fs.display(out)), fs.basename(out))
