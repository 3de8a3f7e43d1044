"""Reading an embeddings dataset: the manifest (commit point), its parts, checksums, and one vector reader.

A dataset is ``DIR/_manifest.json`` + the ``part-*.parquet`` files it lists + ``DIR/_config.yaml``; ``DIR`` is a
local path or an object-store URI. Readers trust only what the manifest lists. Every part is read whole (one GET on
an object store) and checked against the size and sha256 the manifest recorded at write time before Parquet parses
it, so damage at rest is reported by name (:class:`DamagedData`) instead of turning into wrong numbers. The manifest
carries a checksum of itself too.

Example::

    ds = open_dataset("s3://bucket/emb")             # reads and checks _manifest.json once
    for part in ds.parts():
        ids, X = part_vectors(ds.path, part.file)     # ok rows of one part: list[str], float32 (n, D)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attnpipe import fs
from attnpipe.store.schema import from_storage

MANIFEST = "_manifest.json"
CONFIG_FILE = "_config.yaml"


class DamagedData(RuntimeError):
    """A file attnpipe wrote no longer matches what its manifest recorded; the message names it."""


@dataclass(frozen=True)
class Part:
    number: int  # stable across re-indexing; FAISS ids are ``number << 32 | row``
    file: str  # name inside the dataset
    shard: str
    rows: int
    ok: int
    sha256: str | None = None  # None for datasets written before checksums existed
    size: int | None = None


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``self_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str) -> dict:
    """The ``_manifest.json`` of an embeddings dataset, checked against its own checksum.

    Raises:
        FileNotFoundError: ``path`` is not a published attnpipe embeddings dataset.
        DamagedData: the manifest is not UTF-8 JSON or does not match its checksum.
    """
    uri = fs.join(path, MANIFEST)
    if not fs.is_file(uri):
        raise FileNotFoundError(
            f"{fs.display(path)} is not an attnpipe embeddings dataset (no {MANIFEST}); "
            f"run `attnpipe encode --out {fs.display(path)}` first"
        )
    try:
        manifest = fs.read_json(uri)
    except ValueError as exc:
        raise DamagedData(str(exc)) from None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise DamagedData(f"{fs.display(uri)} is not an attnpipe manifest (no 'shards'): damaged")
    if "self_sha256" in manifest and manifest["self_sha256"] != manifest_checksum(manifest):
        raise DamagedData(f"{fs.display(uri)} is damaged: its content does not match its recorded checksum")
    return manifest


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


class Dataset:
    """A published embeddings dataset: its manifest, read once, and the parts it lists."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest

    @property
    def manifest_sha256(self) -> str:
        """Identifies this exact dataset state (recorded by index versions built from it)."""
        return self.manifest.get("self_sha256") or manifest_checksum(self.manifest)

    def parts(self) -> list[Part]:
        numbers = part_numbers(self.manifest)
        sums = self.manifest.get("checksums", {})
        out = []
        for s in self.manifest["shards"]:
            for f in s["parts"]:
                c = sums.get(f, {})
                rows = c.get("rows", s["rows"] if len(s["parts"]) == 1 else -1)
                ok = c.get("ok", s["ok"] if len(s["parts"]) == 1 else -1)
                out.append(Part(numbers[f], f, s["name"], rows, ok, c.get("sha256"), c.get("size")))
        return sorted(out, key=lambda p: p.number)

    def part(self, file: str) -> Part:
        for p in self.parts():
            if p.file == file:
                return p
        raise KeyError(f"{file} is not a part of {fs.display(self.path)}")

    def metadata(self) -> dict[str, str]:
        """File-level Parquet metadata (schema version, model, pooling, dim, ...) of the first non-empty part."""
        parts = self.parts()
        if not parts:
            return {}
        uri = fs.join(self.path, parts[0].file)
        fs_, path = fs.resolve(uri)
        try:
            with fs_.open_input_file(path) as f:  # the footer only: parts are verified when their rows are read
                meta = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowInvalid) as exc:
            raise DamagedData(f"part {fs.display(uri)} is missing or damaged: {exc}") from None
        return {k.decode(): v.decode() for k, v in meta.items()}

    def config_text(self) -> str | None:
        uri = fs.join(self.path, CONFIG_FILE)
        return fs.read_text(uri) if fs.is_file(uri) else None

    def read(self, columns: list[str] | None = None, ok_only: bool = False) -> pa.Table:
        """All rows of the dataset (parts in number order). Use :meth:`parts` + :func:`read_part` to stream."""
        tables = [read_part(self.path, p, columns, ok_only) for p in self.parts()]
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["id"])})
        return pa.concat_tables(tables)


def open_dataset(path: str) -> Dataset:
    """Load (and check) the manifest of the dataset at ``path`` once."""
    return Dataset(path, read_manifest(path))


def _verified_bytes(path: str, part: Part, sha256: bool = True) -> pa.Buffer:
    uri = fs.join(path, part.file)
    try:
        buf = fs.read_buffer(uri)
    except FileNotFoundError:
        raise DamagedData(f"part {fs.display(uri)} is missing (listed in {MANIFEST})") from None
    if part.size is not None and buf.size != part.size:
        raise DamagedData(f"part {fs.display(uri)} is damaged: {buf.size} bytes, {MANIFEST} recorded {part.size}")
    if sha256 and part.sha256 is not None and fs.sha256_bytes(buf) != part.sha256:
        raise DamagedData(f"part {fs.display(uri)} is damaged: its sha256 does not match {MANIFEST}")
    return buf


def damaged_parts(path: str, manifest: dict, full: bool = True) -> dict[str, str]:
    """Part file -> why it is unusable (missing, other size, other sha256 when ``full``), for every listed part."""
    bad = {}
    for p in Dataset(path, manifest).parts():
        uri = fs.join(path, p.file)
        info = fs.info(uri)
        if info.type != fs.pafs.FileType.File:
            bad[p.file] = f"part {fs.display(uri)} is missing"
        elif p.size is not None and info.size != p.size:
            bad[p.file] = f"part {fs.display(uri)} is damaged: {info.size} bytes, {MANIFEST} recorded {p.size}"
        elif full and p.sha256 is not None and fs.sha256_file(uri) != p.sha256:
            bad[p.file] = f"part {fs.display(uri)} is damaged: its sha256 does not match {MANIFEST}"
    return bad


def read_part(
    path: str, part: Part | str, columns: list[str] | None = None, ok_only: bool = False, sha256: bool = True
) -> pa.Table:
    """One part, verified against its recorded size and checksum; ``ok_only`` keeps rows with ``status == "ok"``.

    ``sha256=False`` checks the size only: for a pass whose result is thrown away unless a later, verified pass
    over the same part succeeds (the index build's training sample). Takes plain values (a path and a
    :class:`Part` or file name), so it runs inside Ray tasks.

    Raises:
        DamagedData: the part is missing, has another size or checksum, or does not parse.
    """
    if isinstance(part, str):
        part = open_dataset(path).part(part)
    buf = _verified_bytes(path, part, sha256)
    cols = None if columns is None else list(dict.fromkeys([*columns, *(["status"] if ok_only else [])]))
    try:
        table = from_storage(pq.read_table(pa.BufferReader(buf), columns=cols))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DamagedData(f"part {fs.display(fs.join(path, part.file))} cannot be read as Parquet: {exc}") from None
    if ok_only:
        if part.ok != table.num_rows:  # a filter copies every column: skip it when every row is ok
            table = table.filter(pc.equal(table.column("status"), "ok"))
        if columns is not None and "status" not in columns:
            table = table.drop_columns(["status"])
    return table


def iter_parts(
    path: str, parts: Iterable[Part], columns: list[str] | None = None, ok_only: bool = False, sha256: bool = True
) -> Iterator[tuple[Part, pa.Table]]:
    """``(part, table)`` for each part in order, like :func:`read_part`; the next part is read in a thread while
    the caller works on this one (reading and checksumming release the GIL), so at most two are in memory."""
    parts = list(parts)
    with ThreadPoolExecutor(1, thread_name_prefix="attnpipe-read") as pool:

        def read(part: Part) -> Future[pa.Table]:
            return pool.submit(read_part, path, part, columns, ok_only, sha256)

        ahead = read(parts[0]) if parts else None
        for i, part in enumerate(parts):
            assert ahead is not None
            table = ahead.result()
            ahead = read(parts[i + 1]) if i + 1 < len(parts) else None
            yield part, table


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A ``fixed_size_list<float32, D>`` column -> float32 ``(n, D)`` (no copy when contiguous)."""
    chunks = table.column(column)
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()  # combine_chunks copies even one
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def part_vectors(path: str, part: Part | str) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings ``(n, D)`` float32 of the ok rows of one part."""
    table = read_part(path, part, ["id", "embedding"], ok_only=True)
    return table.column("id").to_pylist(), embedding_matrix(table)


def read_embeddings(path: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    """All rows of a published dataset (parts listed in the manifest only), optionally filtered."""
    table = open_dataset(path).read(columns if filter is None else None)
    if filter is not None:
        table = table.filter(filter)
        if columns is not None:
            table = table.select(columns)
    return table


def load_vectors(path: str) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings ``(n, D)`` float32 of the ok rows of the whole dataset (small datasets, tests)."""
    table = open_dataset(path).read(["id", "embedding"], ok_only=True)
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    return table.column("id").to_pylist(), embedding_matrix(table)


def dataset_metadata(path: str) -> dict[str, str]:
    """File-level metadata (schema version, model, pooling, ...) of the first part."""
    return open_dataset(path).metadata()
