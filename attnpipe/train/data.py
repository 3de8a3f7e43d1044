"""Training data: labeled shards -> uint8 pixels, labels and object boxes in memory, and the held-out split.

Images go through the same readers, decoder and resize as ``attnpipe encode`` (``read_unit`` -> ``decode_batch`` at
``data.image_size``), so a head is trained on exactly the pixels it will later encode. Rows that fail to read or
decode, and rows without a label, are skipped and counted. Everything is held in memory (``N * S * S * 3`` bytes:
10,000 images at 224 px take 1.5 GB); training sets larger than that want a streaming loader.

Example::

    data = load_labeled(["data/train"], cfg.data)      # data.pixels (N, S, S, 3) uint8, data.skipped
    train_idx, val_idx = split_holdout(data.labels, 0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from attnpipe.config import DataConfig
from attnpipe.data.decode import decode_batch
from attnpipe.data.readers import read_unit
from attnpipe.data.shards import InputError, discover, read_units

MIN_PER_LABEL_FOR_VAL = 3  # a label needs >= 2 held-out images (leave-one-out) and >= 1 for training


@dataclass
class LabeledImages:
    """Decoded labeled images; row ``i`` of every array is one image."""

    ids: np.ndarray  # (N,) object: "<shard>/<key>"
    pixels: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) object: str
    boxes: np.ndarray  # (N, 4) float32 [x0, y0, x1, y1] in 0..1; NaN rows have no box
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    def targets(self) -> np.ndarray:
        """``(N,)`` int64 class index of each image in :attr:`classes` order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.fromiter((index[x] for x in self.labels), np.int64, len(self.labels))

    def fingerprint(self) -> str:
        """BLAKE2b of the ids and labels: a checkpoint only resumes on the same training set."""
        h = hashlib.blake2b(digest_size=16)
        for i, lab in zip(self.ids, self.labels):
            h.update(f"{i}\0{lab}\n".encode())
        return f"blake2b:{h.hexdigest()}"


def load_labeled(inputs: list[str], data: DataConfig, threads: int = 0) -> LabeledImages:
    """Read and decode every labeled image of ``inputs`` (any shard format ``discover`` accepts), sorted by id.

    Read units are processed by a thread pool (PIL decodes without holding the GIL).

    Raises:
        InputError: no input, or no labeled image could be decoded.
    """
    units = read_units(discover(inputs), data.read_chunk)
    with ThreadPoolExecutor(threads or min(len(units), os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda u: _load_unit(u, data), units))
    skipped = {"error": sum(p[1] for p in parts), "unlabeled": sum(p[2] for p in parts)}
    rows = [r for p in parts for r in p[0]]
    if not rows:
        raise InputError(f"no labeled image could be decoded from {inputs} (skipped: {skipped})")
    rows.sort(key=lambda r: r[0])
    ids, pixels, labels, boxes = zip(*rows)
    return LabeledImages(
        np.array(ids, object),
        np.stack(pixels),
        np.array(labels, object),
        np.array(boxes, np.float32).reshape(-1, 4),
        skipped,
    )


def _load_unit(unit: dict, data: DataConfig) -> tuple[list, int, int]:
    table = read_unit(unit, data.max_bytes)
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in ("id", "label", "data", "error")}
    boxes = [b if b is not None else [np.nan] * 4 for b in table.column("box").to_pylist()]
    out = decode_batch(batch, data.image_size, data.max_pixels)
    rows, errors, unlabeled = [], 0, 0
    for i in range(len(out["id"])):
        if out["status"][i] != "ok":
            errors += 1
        elif out["label"][i] is None:
            unlabeled += 1
        else:
            rows.append((out["id"][i], out["pixels"][i], out["label"][i], boxes[i]))
    return rows, errors, unlabeled


def split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split into ``(train rows, held-out rows)``, both sorted.

    Every label with at least :data:`MIN_PER_LABEL_FOR_VAL` images gives ``round(fraction * n)`` of them, clamped to
    ``[2, n - 1]``, to the held-out set (two, so leave-one-out retrieval has a relevant item); rarer labels train only.

    Raises:
        InputError: no label has enough images for a held-out set.
    """
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng([seed, 7])
    val: list[np.ndarray] = []
    for lab in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == lab)
        if len(rows) >= MIN_PER_LABEL_FOR_VAL:
            k = min(max(2, round(fraction * len(rows))), len(rows) - 1)
            val.append(rng.permutation(rows)[:k])
    if not val:
        raise InputError(
            f"no label has {MIN_PER_LABEL_FOR_VAL} or more images, so there is nothing to validate on "
            f"({len(labels)} images, {len(set(labels.tolist()))} labels)"
        )
    held = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), held), held
