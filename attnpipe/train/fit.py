"""One training process: the epochs of one rank, shared by the single-process path and every Ray Train worker.

Rank ``r`` of ``world`` trains on its slice of the training rows (``rows[r::world]`` after padding by wrap-around to
equal slices, so every DDP rank takes the same number of steps). Rank 0 alone validates, checkpoints after every
epoch, decides early stopping (broadcast to the other ranks) and, at the end, writes the artifact from the
best-epoch weights. With one process there is no DDP and no collective at all.

Example::

    fit(job)                                   # single process, CPU or the local GPU
    fit(job, rank, world, device, report)      # inside a Ray Train worker (see attnpipe.train.distributed)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from attnpipe.config import Config
from attnpipe.models import artifact
from attnpipe.models.backbones import weights_fingerprint
from attnpipe.models.encoder import ImageEncoder, normalization, resolve_precision
from attnpipe.train import checkpoint as ckpt
from attnpipe.train.data import LabeledImages
from attnpipe.train.loop import embed_all, retrieval_metrics, train_epoch
from attnpipe.train.objective import Objective
from attnpipe.train.trainable import TrainModel, feature_maps, set_trainable


class SimulatedCrash(RuntimeError):
    """Raised by the test-only ``crash_after`` switch, after that epoch's checkpoint is written."""


def stderr_progress(line: str) -> None:
    # write, not print: Ray Train workers patch print() into a logger that echoes it, so lines would show twice
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class Job:
    """Everything a training process needs; shipped to Ray Train workers through the object store."""

    cfg: Config
    out: str
    data: LabeledImages
    train_rows: np.ndarray
    val_rows: np.ndarray
    compat: dict
    resume_state: dict | None = None
    crash_after: int | None = None  # test hook: raise SimulatedCrash after this epoch index is checkpointed


@dataclass
class _Run:
    """The built pieces of one rank's training."""

    model: TrainModel
    wrapped: torch.nn.Module  # model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor  # this rank's cached maps or uint8 images
    targets: torch.Tensor
    boxes: torch.Tensor
    val_inputs: torch.Tensor | None  # rank 0 only
    backbone_trains: bool
    device: torch.device
    dtype: torch.dtype


def fit(
    job: Job,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    report: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] = stderr_progress,
) -> None:
    """Train ``job`` on this rank; rank 0 writes checkpoints and the artifact at ``job.out``.

    Raises:
        ValueError: nothing to train (a parameter-free head with a frozen backbone).
        attnpipe.train.loop.TrainingDiverged: non-finite held-out embeddings (a ValueError).
        SimulatedCrash: the ``job.crash_after`` test hook fired.
    """
    t = job.cfg.train
    run = _build(job, rank, world, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    st = _restore(job.resume_state, run.model, run.optimizer, run.backbone_trains)
    if rank == 0 and job.resume_state is not None:
        progress(f"train: resuming after epoch {st['epoch']} from {ckpt.checkpoint_dir(job.out)}")
    batch = max(2, t.batch_size // world)
    for epoch in range(st["epoch"], t.epochs if not st["stopped"] else st["epoch"]):
        start = time.perf_counter()
        stats = train_epoch(
            run.wrapped,
            run.optimizer,
            run.inputs,
            run.targets,
            run.boxes,
            batch,
            t.seed,
            epoch,
            rank,
            run.device,
            run.dtype,
        )
        stats = _mean_over_ranks(stats, run.device) if world > 1 else stats
        stop = _validate_and_save(job, run, st, epoch, stats, start, progress) if rank == 0 else False
        stop = _broadcast_flag(stop, run.device) if world > 1 else stop
        if report is not None:
            report(st["history"][-1] if rank == 0 else {"epoch": epoch + 1})
        if job.crash_after is not None and epoch >= job.crash_after:
            raise SimulatedCrash(f"crash_after={job.crash_after}: stopped after epoch index {epoch}")
        if stop:
            break
    if rank == 0:
        _write_artifact(job, run.model, st)


def _build(job: Job, rank: int, world: int, device: torch.device) -> _Run:
    cfg, t = job.cfg, job.cfg.train
    dtype = resolve_precision(cfg.encode.precision, device)
    encoder = ImageEncoder(cfg.model).to(device)
    backbone_trains = bool(set_trainable(encoder, cfg.model.backbone, t.unfreeze))
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ValueError(
            f"model.pooling={cfg.model.pooling} has no parameters and train.unfreeze=none freezes the "
            "backbone: nothing to train; pick a learned head (attn, mha, gem) or train.unfreeze=last"
        )
    objective = Objective(encoder.dim, len(job.data.classes), t, seed=t.seed)
    model = TrainModel(encoder, objective, from_features=t.unfreeze == "none").to(device)
    mine = _slice(job.train_rows, rank, world)
    val_inputs = _inputs(model, job.data.pixels[job.val_rows], device, dtype) if rank == 0 else None
    return _Run(
        model,
        _ddp(model, device, t.unfreeze) if world > 1 else model,
        _optimizer(model, backbone_trains, t),
        _inputs(model, job.data.pixels[mine], device, dtype),
        torch.from_numpy(job.data.targets()[mine]),
        torch.from_numpy(job.data.boxes[mine]),
        val_inputs,
        backbone_trains,
        device,
        dtype,
    )


def _validate_and_save(
    job: Job, run: _Run, st: dict, epoch: int, stats: dict, start: float, progress: Callable[[str], None]
) -> bool:
    """Rank 0 after each epoch: validate, record, checkpoint, print; True when early stopping says stop."""
    assert run.val_inputs is not None  # built on rank 0
    emb = embed_all(run.model, run.val_inputs, run.device, run.dtype)
    val = retrieval_metrics(emb, job.data.labels[job.val_rows])
    stop = _record(
        st, epoch, stats, val, time.perf_counter() - start, run.model, run.backbone_trains, job.cfg.train.patience
    )
    ckpt.save_checkpoint(
        ckpt.checkpoint_dir(job.out), _state(st, run.model, run.optimizer, run.backbone_trains), job.compat
    )
    progress(_line(st["history"][-1], job.cfg.train.epochs, epoch == st["best"]["epoch"] - 1))
    return stop


def _slice(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    if world == 1:
        return rows
    padded = np.resize(rows, -(-len(rows) // world) * world)  # wrap-around padding to a multiple of world
    return padded[rank::world]


def _inputs(model: TrainModel, pixels: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if model.from_features:
        return feature_maps(model.encoder, pixels, device, dtype)
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _ddp(model: TrainModel, device: torch.device, unfreeze: str):
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # unfreeze=all also unfreezes classifier layers kept inside some trunks (a ViT's heads) that never run
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unfreeze == "all")


def _optimizer(model: TrainModel, backbone_trains: bool, t) -> torch.optim.Optimizer:
    head = [p for p in (*model.encoder.head.parameters(), *model.objective.parameters()) if p.requires_grad]
    groups = [{"params": head, "lr": t.lr}]
    if backbone_trains:
        trunk = [p for p in model.encoder.backbone.parameters() if p.requires_grad]
        groups.append({"params": trunk, "lr": t.lr * t.backbone_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def _restore(saved: dict | None, model: TrainModel, optimizer, backbone_trains: bool) -> dict:
    st = {
        "epoch": 0,
        "history": [],
        "best": {"epoch": 0, "map@r": -1.0, "state": None},
        "bad_epochs": 0,
        "stopped": False,
    }
    if saved is None:
        return st
    model.load_trainable_state(saved["model"], backbone_trains)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return {k: saved[k] for k in st}


def _record(
    st: dict,
    epoch: int,
    stats: dict,
    val: dict,
    seconds: float,
    model: TrainModel,
    backbone_trains: bool,
    patience: int,
) -> bool:
    """Append the epoch to the history, keep the best weights; True when early stopping says stop."""
    row = {
        "epoch": epoch + 1,
        "loss": stats.get("loss", float("nan")),
        "attn_loss": stats.get("attn"),
        "metric_loss": stats.get("metric"),
        "map@r": val["map@r"],
        "precision@1": val["precision@1"],
        "seconds": round(seconds, 3),
    }
    st["history"].append(row)
    st["epoch"] = epoch + 1
    if val["map@r"] > st["best"]["map@r"]:
        state = {
            k: v.detach().cpu().clone()
            for k, v in model.encoder.state_dict().items()
            if backbone_trains or k.startswith("head.")
        }
        st["best"] = {"epoch": epoch + 1, "map@r": val["map@r"], "state": state}
        st["bad_epochs"] = 0
    else:
        st["bad_epochs"] += 1
    st["stopped"] = patience > 0 and st["bad_epochs"] >= patience
    return st["stopped"]


def _state(st: dict, model: TrainModel, optimizer, backbone_trains: bool) -> dict:
    return {
        **st,
        "model": model.trainable_state(backbone_trains),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def _mean_over_ranks(stats: dict, device: torch.device) -> dict:
    keys = sorted(k for k in stats if k != "steps")
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {**dict(zip(keys, (t / dist.get_world_size()).tolist())), "steps": stats["steps"]}


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _line(row: dict, epochs: int, best: bool) -> str:
    attn = f"  attn {row['attn_loss']:.4f}" if row["attn_loss"] is not None else ""
    return (
        f"train: epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}{attn}  val map@r {row['map@r']:.4f}  "
        f"p@1 {row['precision@1']:.4f}  {row['seconds']:.1f}s{'  *best' if best else ''}"
    )


def _write_artifact(job: Job, model: TrainModel, st: dict) -> None:
    """Best-epoch weights (the source backbone plus the trained parts) -> ``job.out`` + sidecar."""
    encoder = model.encoder
    if st["best"]["state"] is not None:
        encoder.load_state_dict(st["best"]["state"], strict=False)
    cfg = job.cfg
    meta = {
        "backbone": cfg.model.backbone,
        "pooling": cfg.model.pooling,
        "image_size": cfg.data.image_size,
        "embedding_dim": encoder.dim,
        "normalization": normalization(),
        "labels": job.data.classes,
        "model": cfg.to_dict()["model"],
        "train": cfg.to_dict()["train"],
        "history": st["history"],
        "best_epoch": st["best"]["epoch"],
        "stopped_early": st["stopped"],
        "source_weights": weights_fingerprint(cfg.model.weights, cfg.model.backbone, cfg.model.seed),
        "data": {
            "fingerprint": job.compat["data"],
            "train_images": len(job.train_rows),
            "val_images": len(job.val_rows),
            "skipped": job.data.skipped,
        },
    }
    artifact.save_encoder(encoder.cpu(), job.out, meta)
