"""Embeddings on disk: Parquet schema v1, atomic publish, and readers.

A dataset is a directory of ``part-<shard>-*.parquet`` files plus ``_manifest.json`` (input shards with their
fingerprints and the parts each produced) and ``_config.yaml`` (the resolved config). It is built in a staging
directory beside the target and moved into place by one rename; a directory without ``_manifest.json`` is never
read as a dataset.

Example::

    table = read_embeddings("out/emb")                 # pyarrow Table, ok and error rows
    ids, X = load_vectors("out/emb")                   # ok rows only: list[str], float32 (n, D)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
MANIFEST = "_manifest.json"
CONFIG_FILE = "_config.yaml"


def schema(dim: int, positions: int, metadata: dict[str, object] | None = None) -> pa.Schema:
    """Parquet schema v1 (see README): one row per input image, ok or not."""
    fields = [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("attention", pa.list_(pa.float16(), positions)),
        ("attn_h", pa.int16()),
        ("attn_w", pa.int16()),
        ("attn_entropy", pa.float32()),
        ("attn_peak", pa.float32()),
        ("attn_top10_mass", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),  # v1 extension: object box [x0, y0, x1, y1] normalized, when known
    ]
    meta = {"attnpipe.schema_version": SCHEMA_VERSION, **(metadata or {})}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def fixed_list(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """``(n, k)`` array -> ``fixed_size_list`` array, null where ``valid`` is False (no copy of the values)."""
    k = values.shape[1]
    flat = pa.array(values.reshape(-1), type=type_.value_type)
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(flat, k, mask=mask)


def staging_dir(out: str) -> str:
    """A fresh directory beside ``out`` (same filesystem, so publishing is one rename)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.staging-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def publish(staging: str, out: str, overwrite: bool = False) -> None:
    """Move a complete staging directory to ``out`` atomically; an existing ``out`` is swapped out, then removed."""
    out = os.path.abspath(out)
    old = None
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        old = f"{os.path.dirname(out)}/.{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    _fsync_dir(os.path.dirname(out))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (index checksums, artifact fingerprints, weights ids)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, and rename into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: str) -> dict:
    """The ``_manifest.json`` of an embeddings dataset.

    Raises:
        FileNotFoundError: ``path`` is not a published attnpipe embeddings dataset.
    """
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} is not an attnpipe embeddings dataset (no {MANIFEST}); run `attnpipe encode --out {path}` first"
        )
    with open(file) as f:
        return json.load(f)


def part_numbers(manifest: dict) -> dict[str, int]:
    """Each part file's number: stable across re-indexing (FAISS ids are ``part number << 32 | row``).

    Manifests written before numbers existed get positional numbers over the sorted file names.
    """
    if "part_numbers" in manifest:
        return dict(manifest["part_numbers"])
    return {f: i for i, f in enumerate(sorted(p for s in manifest["shards"] for p in s["parts"]))}


def number_parts(shards: list[dict], first: int = 0) -> dict:
    """Manifest fields that number the parts of ``shards`` from ``first`` on, in sorted file order."""
    files = sorted(p for s in shards for p in s["parts"])
    return {"part_numbers": {f: first + i for i, f in enumerate(files)}, "next_part_number": first + len(files)}


def commit(directory: str, staging: str | None, manifest: dict) -> None:
    """Update a dataset in place: move the staged parts in (invisible: not yet listed), then replace the manifest.

    The manifest is the commit point: readers list parts from it, so they see the old or the new dataset, never a
    mix. Parts the new manifest drops are named in its ``retired`` list and deleted by the next ``clean_dataset``
    (one run of grace for readers still on the old manifest).
    """
    if staging:
        for name in os.listdir(staging):
            if name.startswith("part-"):
                os.rename(os.path.join(staging, name), os.path.join(directory, name))
        _fsync_dir(directory)
    write_json(os.path.join(directory, MANIFEST), manifest)
    if staging:
        shutil.rmtree(staging, ignore_errors=True)


def clean_dataset(directory: str) -> list[str]:
    """Remove what no manifest needs: staging dirs of dead runs, unlisted parts, parts retired by the last commit."""
    if not os.path.isdir(directory):
        return []
    manifest = read_manifest(directory) if os.path.isfile(os.path.join(directory, MANIFEST)) else {"shards": []}
    listed = {p for s in manifest["shards"] for p in s["parts"]}
    gone = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".staging-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(name)
        elif name.startswith("part-") and name.endswith(".parquet") and name not in listed:
            os.remove(path)
            gone.append(name)
    return gone


def read_embeddings(path: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """All rows of a published dataset (parts listed in the manifest only)."""
    manifest = read_manifest(path)
    files = [os.path.join(path, p) for s in manifest["shards"] for p in s["parts"]]
    if not files:
        return pa.table({c: [] for c in (columns or ["id"])})
    return pads.dataset(files, format="parquet").to_table(columns=columns, filter=filter)


def load_vectors(path: str) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings ``(n, D)`` float32 of the ok rows."""
    table = read_embeddings(path, ["id", "embedding"], filter=pads.field("status") == "ok")
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    return table.column("id").to_pylist(), emb.flatten().to_numpy().reshape(-1, dim)


def dataset_metadata(path: str) -> dict[str, str]:
    """File-level metadata (schema version, model, pooling, ...) of the first part."""
    manifest = read_manifest(path)
    parts = [p for s in manifest["shards"] for p in s["parts"]]
    if not parts:
        return {}
    meta = pq.read_schema(os.path.join(path, parts[0])).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def write_vectors(
    out: str,
    ids: list[str],
    X: np.ndarray,
    labels: list[str | None] | None = None,
    num_shards: int = 1,
    model: str = "synthetic",
    overwrite: bool = False,
) -> None:
    """Publish ready-made vectors as a schema-v1 dataset (one 1x1 attention map each): for tests and benchmarks."""
    n, dim = X.shape
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    shard_of = np.arange(n) * num_shards // max(n, 1)
    stage = staging_dir(out)
    meta = {"attnpipe.model": model, "attnpipe.pooling": "none", "attnpipe.embedding_dim": dim}
    sch = schema(dim, 1, meta)
    shards = []
    for s in range(num_shards):
        rows = np.flatnonzero(shard_of == s)
        name = f"{model}-{s:05d}"
        ok = np.ones(len(rows), bool)
        table = pa.table(
            {
                "id": pa.array([ids[i] for i in rows], pa.string()),
                "shard": pa.array([name] * len(rows), pa.string()),
                "key": pa.array([ids[i].rsplit("/", 1)[-1] for i in rows], pa.string()),
                "label": pa.array([labels[i] for i in rows] if labels is not None else [None] * len(rows), pa.string()),
                "status": pa.array(["ok"] * len(rows), pa.string()),
                "error": pa.array([None] * len(rows), pa.string()),
                "embedding": fixed_list(X[rows].astype(np.float32), ok, sch.field("embedding").type),
                "attention": fixed_list(np.ones((len(rows), 1), np.float16), ok, sch.field("attention").type),
                "attn_h": pa.array(np.ones(len(rows), np.int16)),
                "attn_w": pa.array(np.ones(len(rows), np.int16)),
                "attn_entropy": pa.array(np.zeros(len(rows), np.float32)),
                "attn_peak": pa.array(np.ones(len(rows), np.float32)),
                "attn_top10_mass": pa.array(np.ones(len(rows), np.float32)),
                "box": fixed_list(np.zeros((len(rows), 4), np.float32), ~ok, sch.field("box").type),
            },
            schema=sch,
        )
        part = f"part-{name}-0.parquet"
        pq.write_table(table, os.path.join(stage, part))
        shards.append(
            {
                "name": name,
                "uri": "synthetic",
                "format": "synthetic",
                "size": 0,
                "mtime_ns": 0,
                "fingerprint": f"synthetic:{s}:{len(rows)}",
                "parts": [part],
                "rows": len(rows),
                "ok": len(rows),
            }
        )
    write_json(
        os.path.join(stage, MANIFEST),
        {"schema_version": SCHEMA_VERSION, "model": {"backbone": model}, "shards": shards, **number_parts(shards)},
    )
    publish(stage, out, overwrite=overwrite)
