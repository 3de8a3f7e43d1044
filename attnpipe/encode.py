"""The encode stage on Ray Data: shards -> read + decode (CPU tasks) -> encoder actor pool -> Parquet (the embeddings schema).

One row per input image, ok or error. Write tasks put parts straight into ``--out`` under unique names (invisible
until listed); the driver receives a small record per part as the stream flows, commits each shard once all its
rows are written (a record in the run's staging area), and publishes ``_manifest.json`` last. ``--out`` may be a
local path or an object-store URI. A rerun of the same command after any failure — SIGKILL of the driver included —
skips committed shards and writes every input row exactly once (see :mod:`attnpipe.store.writer`).

Example::

    summary = encode(["data/shards"], "s3://bucket/emb", load_config(overrides=["model.backbone=resnet18"]))
    summary["ok"], summary["resumed_shards"], summary["images_per_s"]
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from attnpipe import fs, store
from attnpipe.config import Config, encoder_pool, from_dict
from attnpipe.data.decode import decode_batch
from attnpipe.data.gpu_decode import GPU_DECODE_CHUNKS, decode_and_encode, encoders_decode
from attnpipe.data.readers import read_unit
from attnpipe.data.shards import Shard, discover, read_units
from attnpipe.models.backbones import weights_fingerprint
from attnpipe.runtime import init_ray

log = logging.getLogger("attnpipe.encode")
TRACKING = ("_unit", "_unit_rows")  # per-row bookkeeping columns, dropped before Parquet
# Fault tests only: "N[:SECONDS]" makes the driver pause after N shard commits (an hour by default), so a kill lands
# mid-run on every machine (without it the last commits and the publish can follow the first within milliseconds).
HOLD_ENV = "ATTNPIPE_TEST_HOLD_AFTER_SHARDS"


class EncodeActor:
    """Ray Data actor: decoded batches (numpy) -> Arrow tables of the embeddings schema; the model is built once per actor."""

    def __init__(self, config: dict):
        from attnpipe.data.gpu_decode import TorchDecoder, resolve_decode
        from attnpipe.models.encoder import EncoderRunner

        cfg = from_dict(config)
        e = cfg.encode
        device = _actor_device(e.device)
        self.runner = EncoderRunner(
            cfg.model, e.precision, e.threads, batch_size=e.batch_size, compile=e.compile, device=device
        )
        size = cfg.data.image_size
        self.size, self.max_pixels = size, cfg.data.max_pixels
        # Raw rows (``data``) arrive when build_dataset leaves decoding to the encoders: nvJPEG on this GPU, or the
        # CPU decoder here when this actor has none (data.decode=auto on a cluster whose GPUs went elsewhere).
        gpu = resolve_decode(cfg.data.decode, self.runner.device) == "gpu"
        self.decoder = TorchDecoder(size, self.max_pixels, self.runner.device) if gpu else None
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
        if "data" in batch and self.decoder is None:
            batch = decode_batch(batch, size=self.size, max_pixels=self.max_pixels)
        if "data" in batch:
            out, batch = self._decode_and_encode(batch)
        ok = batch["status"] == "ok"
        n, dim, pos = len(ok), self.runner.dim, self.h * self.w
        emb = np.zeros((n, dim), np.float32)
        attn = np.zeros((n, pos), np.float16)
        stats = {k: np.full(n, np.nan, np.float32) for k in ("attn_entropy", "attn_peak", "attn_top10_mass")}
        if ok.any():
            if "pixels" in batch:
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
        return _with_tracking(pa.table(cols, schema=self.schema), batch)

    def _decode_and_encode(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Raw rows -> (model outputs of the ok rows, the batch with ``status``/``error`` and without ``data``).

        Chunks are decoded on the GPU as the runner pulls them, so decoding chunk i+1 overlaps the model on chunk i.
        """
        assert self.decoder is not None
        out, errors = decode_and_encode(self.decoder, self.runner, batch["data"], batch["error"])
        rest = {k: v for k, v in batch.items() if k not in ("data", "error")}
        rest["error"] = np.array(errors, dtype=object)
        rest["status"] = np.array(["ok" if e is None else "error" for e in errors], dtype=object)
        return out, rest


def _strings(values: np.ndarray) -> pa.Array:
    """A string column from a numpy batch; an all-null column arrives as float NaNs (Arrow null type)."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _actor_device(device: str) -> str | None:
    """The torch device of an encoder actor; ``cuda`` on a node without a usable GPU fails naming the node."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                f"encode.device=cuda but the encoder landed on node {ray.util.get_node_ip_address()} without a "
                "usable CUDA GPU (check the node's drivers and its GPU resource); refusing to encode on CPU"
            )
    return None if device == "auto" else device


def _with_tracking(table: pa.Table, batch: dict[str, np.ndarray]) -> pa.Table:
    """Carry the read unit of every row (and its unit's row count) through the encoder to the writer."""
    for c in TRACKING:
        if c in batch:
            table = table.append_column(c, pa.array(np.asarray(batch[c], np.int64)))
    return table


def encode(
    inputs: list[str],
    out: str,
    cfg: Config,
    overwrite: bool = False,
    resume: bool = True,
    ray_address: str | None = None,
    _crash_after_shards: int | None = None,
) -> dict:
    """Encode every image of ``inputs`` into an embeddings dataset at ``out``; returns the run summary.

    An unfinished run of the same command in ``out`` is resumed (``resume=False`` starts over); committed shards
    are skipped. ``summary["resumed_shards"]`` counts them, ``summary["encoded"]`` the rows this call encoded.

    Raises:
        InputError: an input is missing or holds no shard (before any Ray work).
        FileExistsError: ``out`` is a dataset and ``overwrite`` is False, or holds files that are not attnpipe's.
        RunMismatch: ``out`` holds an unfinished run of another command (``overwrite`` discards it).
    """
    shards = discover(inputs)
    check_out(out, overwrite)
    start = time.perf_counter()
    run = store.start_run(out, run_description(shards, cfg), resume=resume, replace=overwrite)
    todo = [s for s in shards if s.name not in run.resumed]
    if run.resumed:
        log.info("resuming %s: %d of %d shards already committed", fs.display(out), len(run.resumed), len(shards))
    committed = {name: rec["entry"] for name, rec in run.resumed.items()}
    hold_after, _, hold_s = (os.environ.get(HOLD_ENV) or "0").partition(":")
    if todo:
        init_ray(ray_address)
        for i, (entry, parts) in enumerate(encode_shards(todo, out, run.token, cfg), 1):
            run.commit_shard(entry, parts)
            committed[entry["name"]] = entry
            if _crash_after_shards is not None and i >= _crash_after_shards:
                raise RuntimeError(f"injected failure after {i} committed shards (test hook)")
            if i == int(hold_after):
                log.warning("%s: pausing after %d committed shards (test hook)", HOLD_ENV, i)
                time.sleep(float(hold_s or 3600))
    entries = [committed[s.name] for s in shards]
    run.publish(entries, {"model": model_signature(cfg)}, config=cfg.to_dict())
    summary = summarize(entries, out, time.perf_counter() - start)
    fresh = [committed[s.name] for s in todo]
    summary.update(resumed_shards=len(run.resumed), encoded=sum(e["rows"] for e in fresh))
    return summary


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` that is a dataset (without ``overwrite``) or a directory holding files that are not ours."""
    if fs.is_file(fs.join(out, store.MANIFEST)):
        if not overwrite:
            raise FileExistsError(
                f"--out {fs.display(out)} already exists; pass --overwrite to replace it, or choose another path"
            )
        return
    foreign = [
        n
        for n in fs.listdir(out)
        if n not in (store.writer.STAGING, store.CONFIG_FILE, ".reindex.lock") and not n.startswith("part-")
    ]
    if foreign:
        raise store.NotOurs(
            f"--out {fs.display(out)} exists and is not an attnpipe embeddings dataset (it holds {foreign[:3]}); "
            "choose a new or empty directory"
        )


def run_description(shards: list[Shard], cfg: Config) -> dict:
    """What a run encodes: a rerun with the same description resumes it, another one is refused."""
    return {
        "inputs": {s.name: s.fingerprint for s in shards},
        "model": model_signature(cfg),
        "data": cfg.to_dict()["data"],
        "precision": cfg.encode.precision,
    }


def plan_units(shards: list[Shard], cfg: Config) -> list[dict]:
    """Read units, numbered: every row carries its unit number through the pipeline (see :func:`encode_shards`)."""
    return [{**u, "index": i} for i, u in enumerate(read_units(shards, cfg.data.read_chunk))]


def encode_shards(shards: list[Shard], out: str, token: str, cfg: Config):
    """Run the pipeline over ``shards``; yields ``(manifest entry, part records)`` for each shard once all its rows
    are written to ``out`` (mid-stream, so the caller can commit shard by shard).

    Completeness is tracked per read unit: every row carries its unit and the unit's row count, every part record
    says how many rows of which units it holds. A shard is complete when all its units are. At the end of the stream
    every remaining shard is complete by construction (empty shards included).
    """
    units = plan_units(shards, cfg)
    units_of: dict[str, set[int]] = defaultdict(set)
    for u in units:
        units_of[u["shard"]].add(u["index"])
    written: dict[int, int] = defaultdict(int)
    expected: dict[int, int] = {}
    parts: dict[str, list[dict]] = defaultdict(list)
    id_hashes: dict[str, list[np.ndarray]] = defaultdict(list)
    by_name = {s.name: s for s in shards}
    write = functools.partial(_write_batch, out=out, token=token)
    ds = build_dataset(shards, cfg, units).map_batches(
        write,
        batch_size=cfg.encode.rows_per_file,
        batch_format="pyarrow",
        num_cpus=0.25,  # I/O bound
    )
    pending = set(by_name)
    for rec in ds.iter_rows():
        rec = dict(rec)
        name = rec["shard"]
        for unit, (rows, total) in json.loads(rec.pop("units")).items():
            written[int(unit)] += rows
            expected[int(unit)] = total
        id_hashes[name].append(np.frombuffer(rec.pop("id_hashes"), np.uint64))
        parts[name].append(rec)
        done = all(written[u] >= expected.get(u, 1 << 62) for u in units_of[name])
        if name in pending and done:
            pending.discard(name)
            yield _finish_shard(by_name[name], parts[name], id_hashes.pop(name))
    for name in sorted(pending):
        yield _finish_shard(by_name[name], parts[name], id_hashes.pop(name, []))


def _finish_shard(shard: Shard, parts: list[dict], hashes: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """The shard's manifest entry, after checking its ids are unique (the readers' rule; checked again here)."""
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    if len(np.unique(h)) != len(h):
        raise ValueError(f"shard {shard.name} produced duplicate ids; refusing to publish (a reader bug: report it)")
    entry = {
        **shard.to_json(),
        "parts": sorted(p["file"] for p in parts),
        "rows": sum(p["rows"] for p in parts),
        "ok": sum(p["ok"] for p in parts),
    }
    return entry, [{k: p[k] for k in ("shard", "file", "rows", "ok", "sha256", "size")} for p in parts]


def _write_batch(table: pa.Table, out: str, token: str) -> pa.Table:
    """Write task: one part per shard present in the batch; returns one small record per part."""
    records = []
    for shard in pc.unique(table.column("shard")).to_pylist():
        rows = table.filter(pc.equal(table.column("shard"), shard))
        units = rows.group_by("_unit").aggregate([("_unit", "count"), ("_unit_rows", "max")])
        counts = {str(u): [c, t] for u, c, t in zip(*(units.column(i).to_pylist() for i in range(3)), strict=True)}
        rec = store.write_part(out, token, shard, rows.drop_columns(list(TRACKING)))
        ids = rows.column("id").to_pylist()
        hashes = np.array([hash64(i) for i in ids], np.uint64)
        records.append({**rec, "units": json.dumps(counts), "id_hashes": hashes.tobytes()})
    return pa.Table.from_pylist(records)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def summarize(entries: list[dict], out: str, seconds: float) -> dict:
    """The run summary of shard entries, also logged as one line."""
    rows = sum(s["rows"] for s in entries)
    ok = sum(s["ok"] for s in entries)
    summary = {
        "out": fs.display(out),
        "shards": len(entries),
        "rows": rows,
        "ok": ok,
        "error": rows - ok,
        "seconds": round(seconds, 2),
        "images_per_s": round(rows / seconds, 1) if seconds else 0.0,
    }
    log.warning(
        "encoded %d images from %d shards: %d ok, %d error in %.1f s (%s images/s) -> %s",
        rows,
        len(entries),
        ok,
        rows - ok,
        seconds,
        summary["images_per_s"],
        summary["out"],
    )
    return summary


def build_dataset(shards, cfg: Config, units: list[dict] | None = None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read units -> raw rows -> decoded pixels -> encoded Arrow tables."""
    d, e = cfg.data, cfg.encode
    units = units if units is not None else plan_units(shards, cfg)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = e.device == "cuda" or (e.device == "auto" and gpus > 0)
    lo, hi = encoder_pool(e.num_encoders)
    if hi == 0:  # auto: one encoder per GPU present now (at least one), one CPU encoder without GPUs
        lo = hi = max(int(gpus / e.gpus_per_encoder), 1) if use_gpu else 1
    ds: ray.data.Dataset = ray.data.from_items(units, override_num_blocks=max(len(units), 1))
    read = functools.partial(_read_batch, max_bytes=d.max_bytes)
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow")
    # raw JPEG bytes travel to the GPU actors (nvJPEG there); cuda encoders get a GPU even if it is still autoscaling
    on_gpu = encoders_decode(d.decode, max(gpus, 1) if use_gpu else 0)
    if not on_gpu:
        decode = functools.partial(decode_batch, size=d.image_size, max_pixels=d.max_pixels)
        ds = ds.map_batches(decode, batch_size=e.decode_batch_size, batch_format="numpy")
    return ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"config": cfg.to_dict()},
        # decoding actors get GPU_DECODE_CHUNKS chunks per call: decoding chunk i+1 overlaps the model on chunk i
        batch_size=e.batch_size * (GPU_DECODE_CHUNKS if on_gpu else 1),
        batch_format="numpy",
        # min < max: an elastic pool that grows as (autoscaled) nodes arrive; cuda requests GPUs even when the
        # cluster has none yet, so Ray's autoscaler brings GPU workers up from zero
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=e.gpus_per_encoder if use_gpu else 0,
        num_cpus=1,  # a scheduling token: a CPU encoder uses all cores through torch threads
    )


def _read_batch(batch: pa.Table, max_bytes: int) -> pa.Table:
    tables = []
    for u in batch.to_pylist():
        t = read_unit(u, max_bytes)
        index = u.get("index", -1)
        tables.append(
            t.append_column("_unit", pa.array([index] * t.num_rows, pa.int64())).append_column(
                "_unit_rows", pa.array([t.num_rows] * t.num_rows, pa.int64())
            )
        )
    return pa.concat_tables(tables)


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
