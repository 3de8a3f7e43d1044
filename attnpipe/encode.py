"""The encode stage on Ray Data: shards -> read + decode (CPU tasks) -> encoder actor pool -> Parquet schema v1.

One row per input image, ok or error. Parts are written per shard (``part-<shard>-<n>.parquet``) into a staging
directory beside ``--out``; ``_manifest.json`` and ``_config.yaml`` are added and the directory is published with
one rename, so a failed run never leaves a partial dataset at ``--out``.

Example::

    summary = encode(["data/shards"], "out/emb", load_config(overrides=["model.backbone=resnet18"]))
    summary["ok"], summary["images_per_s"]
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import yaml
from ray.data import Datasink
from ray.data.block import Block

from attnpipe import store
from attnpipe.config import Config, from_dict
from attnpipe.data.decode import decode_batch
from attnpipe.data.readers import read_unit
from attnpipe.data.shards import discover, read_units
from attnpipe.models.backbones import weights_fingerprint
from attnpipe.runtime import init_ray


class EncodeActor:
    """Ray Data actor: decoded batches (numpy) -> Arrow tables with schema v1; the model is built once per actor."""

    def __init__(self, config: dict):
        from attnpipe.models.encoder import EncoderRunner

        cfg = from_dict(config)
        self.runner = EncoderRunner(cfg.model, cfg.encode.precision, cfg.encode.threads)
        size = cfg.data.image_size
        probe = self.runner(np.zeros((1, size, size, 3), np.uint8))  # warm-up, and the attention grid shape
        self.h, self.w = probe["attention"].shape[1:]
        meta = {
            "attnpipe.model": cfg.model.backbone,
            "attnpipe.pooling": cfg.model.pooling,
            "attnpipe.image_size": size,
            "attnpipe.embedding_dim": self.runner.dim,
            "attnpipe.weights": weights_fingerprint(cfg.model.weights, cfg.model.backbone, cfg.model.seed),
            "attnpipe.precision": str(self.runner.dtype).removeprefix("torch."),
        }
        self.schema = store.schema(self.runner.dim, self.h * self.w, meta)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["status"] == "ok"
        n, dim, pos = len(ok), self.runner.dim, self.h * self.w
        emb = np.zeros((n, dim), np.float32)
        attn = np.zeros((n, pos), np.float16)
        stats = {k: np.full(n, np.nan, np.float32) for k in ("attn_entropy", "attn_peak", "attn_top10_mass")}
        if ok.any():
            out = self.runner(batch["pixels"][ok])
            emb[ok], attn[ok] = out["embedding"], out["attention"].reshape(-1, pos)
            for k, column in stats.items():
                column[ok] = out[k]
        box = np.stack(list(batch["box"])).astype(np.float32).reshape(n, 4)  # NaN rows: no box
        has_box = np.asarray(~np.isnan(box).any(1))  # asarray: numpy's stubs type a reduction as scalar | array
        cols = {
            **{c: _strings(batch[c]) for c in ("id", "shard", "key", "label", "status", "error")},
            "embedding": store.fixed_list(emb, ok, self.schema.field("embedding").type),
            "attention": store.fixed_list(attn, ok, self.schema.field("attention").type),
            "attn_h": pa.array(np.where(ok, self.h, 0).astype(np.int16)),
            "attn_w": pa.array(np.where(ok, self.w, 0).astype(np.int16)),
            **{k: pa.array(v, mask=~ok) for k, v in stats.items()},
            "box": store.fixed_list(box, has_box, self.schema.field("box").type),
        }
        return pa.table(cols, schema=self.schema)


def _strings(values: np.ndarray) -> pa.Array:
    """A string column from a numpy batch; an all-null column arrives as float NaNs (Arrow null type)."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


class PartsDatasink(Datasink):
    """Writes each block's rows grouped by shard into ``part-<shard>-<uuid>.parquet`` files in the staging dir."""

    def __init__(self, staging: str, rows_per_file: int, crash_after_parts: int | None = None):
        self.staging = staging
        self.rows_per_file = rows_per_file
        self.crash_after_parts = crash_after_parts  # test hook: fail a write task after this many parts
        self.parts: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        written = []
        for shard in pc.unique(table.column("shard")).to_pylist():
            rows = table.filter(pc.equal(table.column("shard"), shard))
            name = f"part-{shard}-{uuid.uuid4().hex[:12]}.parquet"
            pq.write_table(rows, os.path.join(self.staging, name), compression="zstd")
            ok = pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0
            written.append({"shard": shard, "file": name, "rows": rows.num_rows, "ok": ok})
            if self.crash_after_parts is not None and len(written) >= self.crash_after_parts:
                raise RuntimeError(f"injected failure after {len(written)} parts (test hook)")
        return written

    def on_write_complete(self, write_result) -> None:
        self.parts = [p for ret in write_result.write_returns for p in (ret or [])]


def encode(
    inputs: list[str],
    out: str,
    cfg: Config,
    overwrite: bool = False,
    ray_address: str | None = None,
    _crash_after_parts: int | None = None,
) -> dict:
    """Encode every image of ``inputs`` into an embeddings dataset at ``out``; returns the run summary.

    Raises:
        InputError: an input is missing or holds no shard (before any Ray work).
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    shards = discover(inputs)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
    start = time.perf_counter()
    init_ray(ray_address)
    staging = store.staging_dir(out)
    try:
        entries = shard_entries(shards, write_parts(shards, staging, cfg, _crash_after_parts))
        manifest = new_manifest(entries, cfg)
        write_config(staging, cfg)
        store.write_json(os.path.join(staging, store.MANIFEST), manifest)
        store.publish(staging, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summarize(entries, os.path.abspath(out), time.perf_counter() - start)


def write_parts(shards, directory: str, cfg: Config, _crash_after_parts: int | None = None) -> list[dict]:
    """Run the pipeline over ``shards``, writing Parquet parts into ``directory``; returns the parts written."""
    sink = PartsDatasink(directory, cfg.encode.rows_per_file, _crash_after_parts)
    build_dataset(shards, cfg).write_datasink(sink)
    return sink.parts


def write_config(directory: str, cfg: Config) -> None:
    tmp = os.path.join(directory, f".{store.CONFIG_FILE}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(directory, store.CONFIG_FILE))


def summarize(entries: list[dict], out: str, seconds: float) -> dict:
    """The run summary of freshly encoded shard entries, also printed as one line on stderr."""
    rows = sum(s["rows"] for s in entries)
    ok = sum(s["ok"] for s in entries)
    summary = {
        "out": out,
        "shards": len(entries),
        "rows": rows,
        "ok": ok,
        "error": rows - ok,
        "seconds": round(seconds, 2),
        "images_per_s": round(rows / seconds, 1) if seconds else 0.0,
    }
    print(
        f"encoded {rows} images from {len(entries)} shards: {ok} ok, {rows - ok} error "
        f"in {seconds:.1f} s ({summary['images_per_s']} images/s) -> {out}",
        file=sys.stderr,
    )
    return summary


def build_dataset(shards, cfg: Config) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read units -> raw rows -> decoded pixels -> encoded Arrow tables."""
    d, e = cfg.data, cfg.encode
    units = read_units(shards, d.read_chunk)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = e.num_encoders or max(gpus, 1)
    ds: ray.data.Dataset = ray.data.from_items(units, override_num_blocks=max(len(units), 1))
    read = functools.partial(_read_batch, max_bytes=d.max_bytes)
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow")
    decode = functools.partial(decode_batch, size=d.image_size, max_pixels=d.max_pixels)
    ds = ds.map_batches(decode, batch_size=e.decode_batch_size, batch_format="numpy")
    return ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"config": cfg.to_dict()},
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0,
        num_cpus=1,  # a scheduling token: a CPU encoder uses all cores through torch threads
    )


def _read_batch(batch: pa.Table, max_bytes: int) -> pa.Table:
    return pa.concat_tables([read_unit(u, max_bytes) for u in batch.to_pylist()])


def shard_entries(shards, parts: list[dict]) -> list[dict]:
    """Manifest entries: each shard (with its fingerprint) and the part files, rows and ok rows it produced."""
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for p in parts:
        by_shard[p["shard"]].append(p)
    return [
        {
            **s.to_json(),
            "parts": sorted(p["file"] for p in by_shard[s.name]),
            "rows": sum(p["rows"] for p in by_shard[s.name]),
            "ok": sum(p["ok"] for p in by_shard[s.name]),
        }
        for s in shards
    ]


def model_signature(cfg: Config) -> dict:
    """What the embeddings depend on: another signature means every stored embedding is stale."""
    m = cfg.model
    return {
        "backbone": m.backbone,
        "pooling": m.pooling,
        "weights": m.weights,
        "weights_fingerprint": weights_fingerprint(m.weights, m.backbone, m.seed),
        "image_size": cfg.data.image_size,
    }


def new_manifest(entries: list[dict], cfg: Config, first_part: int = 0) -> dict:
    return {
        "schema_version": store.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_signature(cfg),
        "shards": sorted(entries, key=lambda e: e["name"]),
        **store.number_parts(entries, first_part),
    }
