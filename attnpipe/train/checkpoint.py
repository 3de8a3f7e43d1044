"""Per-epoch training checkpoints, resume, and the compatibility check that guards it.

Layout: for ``--out x/head.safetensors`` the checkpoint directory is ``x/head.ckpt/`` holding ``state.pt`` (written
to ``state.pt.tmp`` and renamed after every epoch, so it is always one whole epoch) and ``compat.json`` (what the
state was trained for, human-readable). ``state.pt`` is a ``torch.save`` of tensors and plain containers only and is
read back with ``torch.load(weights_only=True)``: trainable model state, optimizer state, epochs done, best epoch and
its encoder state, metric history, early-stopping counter and the torch RNG.

A checkpoint resumes only when its compat record equals the current one: backbone, pooling, source weights, image
size, label set, the training set's ids and labels, and every ``train.*`` setting except ``epochs``, ``patience`` and
``workers`` (which may change between runs: train longer, stop later, use more workers).

Example::

    ckpt = load_checkpoint(checkpoint_dir("out/head.safetensors"), compat)   # None when there is none
    save_checkpoint(checkpoint_dir("out/head.safetensors"), state, compat)
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from attnpipe.config import Config
from attnpipe.models.backbones import weights_fingerprint

STATE_FILE = "state.pt"
COMPAT_FILE = "compat.json"
FORMAT_VERSION = 1
RESUMABLE_CHANGES = ("epochs", "patience", "workers")


class CheckpointMismatch(ValueError):
    """A checkpoint exists but was made for another model, dataset or training config."""


def checkpoint_dir(out: str) -> str:
    """``x/head.safetensors`` -> ``x/head.ckpt``."""
    return out.removesuffix(".safetensors") + ".ckpt"


def compat_record(cfg: Config, classes: list[str], data_fingerprint: str) -> dict:
    """Everything a checkpoint's state depends on; a resumed run must match it exactly (JSON-ready)."""
    train = {k: v for k, v in cfg.to_dict()["train"].items() if k not in RESUMABLE_CHANGES}
    m = cfg.model
    return {
        "format_version": FORMAT_VERSION,
        "backbone": m.backbone,
        "pooling": m.pooling,
        "seed": m.seed,
        "weights": weights_fingerprint(m.weights, m.backbone, m.seed),
        "image_size": cfg.data.image_size,
        "classes": list(classes),
        "data": data_fingerprint,
        "train": train,
    }


def save_checkpoint(directory: str, state: dict, compat: dict) -> None:
    """Write ``state`` and ``compat`` aside, then rename each into place."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    torch.save({**state, "compat": compat}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(directory, COMPAT_FILE) + ".tmp", "w") as f:
        json.dump(compat, f, indent=2, sort_keys=True)
    os.replace(os.path.join(directory, COMPAT_FILE) + ".tmp", os.path.join(directory, COMPAT_FILE))


def load_checkpoint(directory: str, compat: dict) -> dict | None:
    """The saved state when ``directory`` holds one; None when it holds none.

    Raises:
        CheckpointMismatch: the checkpoint was made for a different backbone, pooling, data or config; the message
            names every differing field and how to start over.
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    diff = _differences(state.get("compat", {}), compat)
    if diff:
        raise CheckpointMismatch(
            f"checkpoint {directory} was made for a different run ({'; '.join(diff)}); pass --no-resume "
            f"(train_head(resume=False)) to start over, or choose another --out"
        )
    return state


def remove_checkpoint(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "train" and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"train.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "classes" and a != b:
            out.append(f"labels: checkpoint {a}, now {b}")
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out
