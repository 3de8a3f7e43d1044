"""Writing an embeddings dataset: parts under unique names, per-shard commits of a run, the manifest as commit point.

One protocol for a local disk and an object store (where there is no rename):

- A *run* (an ``encode`` or a ``reindex``) gets a token and a staging area ``DIR/_staging/<token>/`` holding
  ``run.json`` (what the run encodes: inputs, model, config) and one ``shards/<shard>.json`` per finished shard,
  written after the shard's parts exist (the shard's commit record: a rerun of the same command skips it).
- Parts are written directly into ``DIR`` as ``part-<shard>-<token>-<uuid>.parquet``: unique, and invisible until a
  manifest lists them. Their size and sha256 are computed from the bytes written and go into the manifest.
- ``DIR/_manifest.json`` (one object, written last) publishes the dataset. Then the run's staging area, its own
  unlisted parts (retried tasks), and parts the previous manifest listed but the new one does not are deleted:
  every deletion is of a file a manifest or a staging record of attnpipe names as its own; nothing else in ``DIR``
  is ever touched.

Example::

    run = start_run("s3://bucket/emb", {"inputs": [...], "model": {...}})
    rec = write_part("s3://bucket/emb", run.token, "shard-0", table)   # inside a Ray task
    run.commit_shard({"name": "shard-0", "parts": [rec["file"]], ...}, [rec])
    run.publish(entries, {"model": {...}})
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from attnpipe import fs
from attnpipe.store.dataset import (
    CONFIG_FILE,
    MANIFEST,
    DamagedData,
    manifest_checksum,
    number_parts,
    part_numbers,
    read_manifest,
)
from attnpipe.store.schema import SCHEMA_VERSION, VECTOR_KEY, fixed_list, schema, to_storage

STAGING = "_staging"
_TOKEN = re.compile(r"^[0-9a-f]{8}$")


class RunMismatch(ValueError):
    """An unfinished run of another command holds the output; the message names what differs."""


def part_name(shard: str, token: str) -> str:
    return f"part-{shard}-{token}-{uuid.uuid4().hex[:8]}.parquet"


def owned_by(name: str, token: str) -> bool:
    """True for a part file a run with ``token`` wrote (``part-<shard>-<token>-<8 hex>.parquet``)."""
    return bool(re.fullmatch(rf"part-.+-{token}-[0-9a-f]{{8}}\.parquet", name))


def parquet_options(schema: pa.Schema) -> dict:
    """Stored vector columns (:func:`~attnpipe.store.schema.to_storage`) plain: no compression, dictionary or
    statistics; everything else zstd with dictionaries.

    Embeddings barely compress (zstd saved ~7%) but decompressing them cost as much as reading them, and a dictionary
    over floats is always abandoned after it was tried: every index build and evaluation reads them.
    """
    vectors = {f.name for f in schema if VECTOR_KEY in (f.metadata or {})}
    others = [f.name for f in schema if f.name not in vectors]
    return {
        "compression": {f.name: "none" if f.name in vectors else "zstd" for f in schema},
        "use_dictionary": others,
        "write_statistics": others,
    }


def write_part(out: str, token: str, shard: str, table: pa.Table) -> dict:
    """Write one part of ``shard`` into dataset ``out`` (one PUT); returns its record for the manifest.

    Runs inside Ray tasks: every argument is a plain value.
    """
    sink = pa.BufferOutputStream()
    stored = to_storage(table)
    pq.write_table(stored, sink, **parquet_options(stored.schema))
    buf = sink.getvalue()
    name = part_name(shard, token)
    fs.write_bytes(fs.join(out, name), buf)
    ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    return {
        "shard": shard,
        "file": name,
        "rows": table.num_rows,
        "ok": ok,
        "sha256": fs.sha256_bytes(buf),
        "size": buf.size,
    }


@dataclass
class Run:
    """A run's staging area in dataset ``out``: its token, what it encodes, and the shards it has committed."""

    out: str
    token: str
    info: dict
    resumed: dict[str, dict] = field(default_factory=dict)  # shard name -> committed entry found at start

    @property
    def dir(self) -> str:
        return fs.join(self.out, STAGING, self.token)

    def add_table(self, shard: str, table: pa.Table, fingerprint: str | None = None) -> dict:
        """Write a ready-made table as one part of ``shard`` and commit that shard (tests, benchmarks, synthetic
        data); returns its manifest entry."""
        rec = write_part(self.out, self.token, shard, table)
        entry = {
            "name": shard,
            "uri": "synthetic",
            "format": "synthetic",
            "size": 0,
            "mtime_ns": 0,
            "fingerprint": fingerprint or f"synthetic:{shard}",
            "parts": [rec["file"]],
            "rows": rec["rows"],
            "ok": rec["ok"],
        }
        self.commit_shard(entry, [rec])
        return entry

    def commit_shard(self, entry: dict, parts: list[dict]) -> None:
        """Record one finished shard (its parts exist): a rerun of the same command will skip it."""
        missing = [p["file"] for p in parts if fs.info(fs.join(self.out, p["file"])).size != p["size"]]
        if missing:  # a write task on a node whose disk the driver cannot see
            raise DamagedData(
                f"parts {missing} of shard {entry['name']} are not in {fs.display(self.out)} as written; on a "
                "multi-node cluster --out must be shared storage or an object-store URI (s3://...)"
            )
        fs.write_json(fs.join(self.dir, "shards", f"{entry['name']}.json"), {"entry": entry, "parts": parts})

    def committed(self) -> dict[str, dict]:
        """Shard name -> {"entry", "parts"} of every shard this run committed so far."""
        out = {}
        for name in fs.listdir(fs.join(self.dir, "shards")):
            if name.endswith(".json"):
                try:
                    rec = fs.read_json(fs.join(self.dir, "shards", name))
                except (ValueError, FileNotFoundError):
                    continue  # a half-written record (local disk only) counts as not committed
                out[rec["entry"]["name"]] = rec
        return out

    def publish(self, entries: list[dict], fields: dict, config: dict | None = None, keep: dict | None = None) -> dict:
        """Write ``_config.yaml`` and the manifest (the commit point), then delete what is no longer listed.

        ``entries`` are the shard entries of the new dataset state. For an update in place (``reindex``), ``keep``
        maps file -> number for parts of the previous manifest that stay (their numbers do not change) and new parts
        are numbered after the previous manifest's ``next_part_number``; without ``keep`` (a new dataset) numbering
        starts at 0. Returns the manifest written.
        """
        old = _manifest_or_none(self.out)
        parts = {p["file"]: p for rec in self.committed().values() for p in rec["parts"]}
        sums = {**(old or {}).get("checksums", {}), **{f: _checksum(p) for f, p in parts.items()}}
        listed = {p for e in entries for p in e["parts"]}
        numbers = dict(keep or {})
        fresh = [{"parts": [p for p in e["parts"] if p not in numbers]} for e in entries]
        first = (old or {}).get("next_part_number", len(part_numbers(old or {"shards": []}))) if keep is not None else 0
        numbered = number_parts(fresh, first)
        manifest = {
            **fields,
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": sorted(entries, key=lambda e: e["name"]),
            "part_numbers": {**numbers, **numbered["part_numbers"]},
            "next_part_number": max(numbered["next_part_number"], first),
            "checksums": {f: sums[f] for f in sorted(listed) if f in sums},
        }
        manifest["self_sha256"] = manifest_checksum(manifest)
        if config is not None:
            fs.write_bytes(fs.join(self.out, CONFIG_FILE), yaml.safe_dump(config, sort_keys=False).encode())
        fs.write_json(fs.join(self.out, MANIFEST), manifest)  # the commit point
        retired = sorted(set(part_numbers(old)) - listed) if old else []
        for name in retired:
            fs.delete_file(fs.join(self.out, name))
        self.discard(listed)
        return manifest

    def discard(self, listed: Collection[str] = ()) -> list[str]:
        """Delete this run's staging area and its parts that ``listed`` does not name; returns the deleted parts."""
        live = _manifest_or_none(self.out)
        keep = set(listed) | (set(part_numbers(live)) if live else set())  # never a part a manifest lists
        gone = [n for n in fs.listdir(self.out) if owned_by(n, self.token) and n not in keep]
        for name in gone:
            fs.delete_file(fs.join(self.out, name))
        fs.delete_dir(self.dir)
        if not fs.listdir(fs.join(self.out, STAGING)):
            fs.delete_dir(fs.join(self.out, STAGING))
        return gone


def _checksum(p: dict) -> dict:
    return {k: p[k] for k in ("sha256", "size", "rows", "ok")}


def _manifest_or_none(out: str) -> dict | None:
    try:
        return read_manifest(out)
    except FileNotFoundError:
        return None


def unfinished_runs(out: str) -> list[Run]:
    """Runs that started in ``out`` and did not publish (killed, failed), oldest first."""
    runs = []
    for token in fs.listdir(fs.join(out, STAGING)):
        if not _TOKEN.match(token):
            continue
        try:
            info = fs.read_json(fs.join(out, STAGING, token, "run.json"))
        except (ValueError, FileNotFoundError):
            info = {}
        runs.append(Run(out, token, info))
    return sorted(runs, key=lambda r: r.info.get("started", ""))


def differences(a: dict, b: dict) -> list[str]:
    """Keys (dotted) whose values differ between two run descriptions."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += [f"{k}.{d}" for d in differences(a[k], b[k])]
        elif a.get(k) != b.get(k):
            out.append(k)
    return out


def start_run(out: str, info: dict, resume: bool = True, replace: bool = False) -> Run:
    """Start a run in ``out``, or resume the unfinished run of the same command.

    ``info`` describes the command (inputs with fingerprints, model, config). An unfinished run with the same
    ``info`` is resumed (``resume``) — its committed shards are in ``Run.resumed`` — or discarded (not ``resume``).
    An unfinished run with another ``info`` is refused naming the difference, unless ``replace``.

    Raises:
        RunMismatch: another command's unfinished run holds ``out``.
    """
    fs.makedirs(out)
    run = None
    for old in unfinished_runs(out):
        if not old.info:  # a staging area without its run.json (a half-deleted one): nothing to resume or refuse
            old.discard()
            continue
        diff = differences(old.info.get("command", {}), info)
        if not diff and resume and run is None:
            run = old
            continue
        if diff and not replace:
            raise RunMismatch(
                f"{fs.display(out)} holds an unfinished run of another command (started {old.info.get('started')}; "
                f"differs in {', '.join(diff)}): rerun that command to finish it, or pass --overwrite to discard it"
            )
        old.discard()
    if run is not None:
        run.resumed = run.committed()
        return run
    run = Run(out, uuid.uuid4().hex[:8], {"command": info, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
    fs.write_json(fs.join(run.dir, "run.json"), run.info)
    return run


def clean_dataset(out: str, live: set[str] | None = None) -> list[str]:
    """Remove leftovers of runs that died in ``out``: their staging areas and the parts they wrote but never
    published. Only files a staging record of attnpipe names as its own are removed; returns them.

    Call it only while no other run can be active on ``out`` (under the dataset lock).
    """
    gone = []
    for run in unfinished_runs(out):
        gone += run.discard(live or set())
        gone.append(f"{STAGING}/{run.token}/")
    return gone


def commit(out: str, run: Run, entries: list[dict], fields: dict, keep: dict[str, int]) -> dict:
    """Publish an in-place update of a dataset (``reindex``): ``keep`` = kept part file -> its number."""
    return run.publish(entries, fields, keep=keep)


def write_vectors(
    out: str,
    ids: list[str],
    X: np.ndarray,
    labels: list[str | None] | None = None,
    num_shards: int = 1,
    model: str = "synthetic",
    overwrite: bool = False,
) -> None:
    """Publish ready-made vectors as an embeddings dataset (one 1x1 attention map each): for tests and benchmarks."""
    if fs.is_file(fs.join(out, MANIFEST)) and not overwrite:
        raise FileExistsError(f"{fs.display(out)} already exists; pass overwrite=True to replace it")
    n, dim = X.shape
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    shard_of = np.arange(n) * num_shards // max(n, 1)
    meta = {"attnpipe.model": model, "attnpipe.pooling": "none", "attnpipe.embedding_dim": dim}
    sch = schema(dim, 1, meta)
    run = start_run(out, {"synthetic": model, "n": n}, resume=False, replace=True)
    entries = []
    for s in range(num_shards):
        rows = np.flatnonzero(shard_of == s)
        name = f"{model}-{s:05d}"
        ok = np.ones(len(rows), bool)
        m = len(rows)
        table = pa.table(
            {
                "id": pa.array([ids[i] for i in rows], pa.string()),
                "shard": pa.array([name] * m, pa.string()),
                "key": pa.array([ids[i].rsplit("/", 1)[-1] for i in rows], pa.string()),
                "label": pa.array([labels[i] for i in rows] if labels is not None else [None] * m, pa.string()),
                "status": pa.array(["ok"] * m, pa.string()),
                "error": pa.array([None] * m, pa.string()),
                "embedding": fixed_list(X[rows].astype(np.float32), ok, sch.field("embedding").type),
                "attention": fixed_list(np.ones((m, 1), np.float16), ok, sch.field("attention").type),
                "attn_h": pa.array(np.ones(m, np.int16)),
                "attn_w": pa.array(np.ones(m, np.int16)),
                "attn_entropy": pa.array(np.zeros(m, np.float32)),
                "attn_peak": pa.array(np.ones(m, np.float32)),
                "attn_top10_mass": pa.array(np.ones(m, np.float32)),
                "box": fixed_list(np.zeros((m, 4), np.float32), ~ok, sch.field("box").type),
            },
            schema=sch,
        )
        entries.append(run.add_table(name, table, f"synthetic:{s}:{m}"))
    run.publish(entries, {"model": {"backbone": model}})
