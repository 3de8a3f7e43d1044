"""Readers: one read unit (see ``shards.read_units``) -> raw rows ``id, shard, key, label, box, data, error``.

Readers never decode images; they only pull bytes and labels out of a shard. A member that cannot be read
(too large, not a regular file, no image for a key, a shard that breaks mid-way) becomes a row with ``error``
set, so nothing is dropped silently.

Label sources: image folder -> the label directory (and a ``<key>.json`` sidecar); tar -> ``<key>.cls`` or the
``label`` field of ``<key>.json``; Parquet -> a ``label`` column (or ``json``). ``box`` is an optional object box
``[x0, y0, x1, y1]`` in normalized image coordinates from the JSON.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from attnpipe.data.shards import IMAGE_EXTS, filesystem

RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("box", pa.list_(pa.float32(), 4)),  # NaNs when the source has no box
        ("data", pa.large_binary()),
        ("error", pa.string()),
    ]
)


def read_unit(unit: dict, max_bytes: int) -> pa.Table:
    """All rows of one read unit as a table with :data:`RAW_SCHEMA`."""
    reader = {"tar": _read_tar, "parquet": _read_parquet, "folder": _read_folder}[unit["format"]]
    rows = list(reader(unit, max_bytes))
    for r in rows:
        r["id"] = f"{unit['shard']}/{r['key']}"
        r["shard"] = unit["shard"]
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _row(key: str, data: bytes | None = None, label=None, box=None, error: str | None = None) -> dict:
    return {
        "key": key,
        "label": None if label is None else str(label),
        "box": _valid_box(box),
        "data": data,
        "error": error,
    }


def _valid_box(box) -> list[float]:
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        return [float(v) for v in box]
    return [float("nan")] * 4


def _parse_meta(text: bytes | str | None) -> dict:
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_folder(unit: dict, max_bytes: int) -> Iterator[dict]:
    fs, root = filesystem(unit["uri"])
    for rel in unit["files"]:
        stem = rel.rsplit(".", 1)[0]
        label = rel.split("/", 1)[0] if "/" in rel else None
        path = posixpath.join(root, rel)
        try:
            data = _read_capped(fs, path, max_bytes)
        except (OSError, ValueError) as exc:
            yield _row(stem, label=label, error=f"unreadable file: {exc}")
            continue
        meta = _sidecar(fs, posixpath.join(root, stem + ".json"))
        yield _row(stem, data, meta.get("label", label), meta.get("box"))


def _read_capped(fs, path: str, max_bytes: int) -> bytes:
    with fs.open_input_file(path) as f:
        if f.size() > max_bytes:
            raise ValueError(f"{f.size()} bytes, over data.max_bytes={max_bytes}")
        return f.read()


def _sidecar(fs, path: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return _parse_meta(f.read())
    except (FileNotFoundError, OSError):
        return {}


def _read_parquet(unit: dict, max_bytes: int) -> Iterator[dict]:
    fs, path = filesystem(unit["uri"])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if unit["part"] >= pf.num_row_groups:
            return
        names = pf.schema_arrow.names
        if "image" not in names:
            raise ValueError(f"parquet shard {unit['uri']} has no 'image' column (columns: {names})")
        cols = [c for c in ("key", "image", "label", "json") if c in names]
        table = pf.read_row_group(unit["part"], columns=cols)
        offset = sum(pf.metadata.row_group(g).num_rows for g in range(unit["part"]))
    for i, rec in enumerate(table.to_pylist()):
        key = str(rec["key"]) if rec.get("key") is not None else f"{offset + i:08d}"
        meta = _parse_meta(rec.get("json"))
        image = rec["image"]
        if isinstance(image, dict):  # struct<bytes, path>, as Hugging Face datasets write images
            image = image.get("bytes")
        label = rec.get("label", meta.get("label"))
        if image is None:
            yield _row(key, label=label, box=meta.get("box"), error="image column is null")
        elif len(image) > max_bytes:
            yield _row(key, label=label, error=f"{len(image)} bytes, over data.max_bytes={max_bytes}")
        else:
            yield _row(key, bytes(image), label, meta.get("box"))


def _read_tar(unit: dict, max_bytes: int) -> Iterator[dict]:
    """Stream a WebDataset-style tar: members grouped by key (path up to the first dot of the basename)."""
    fs, path = filesystem(unit["uri"])
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower()
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = _tar_member(tar, member, max_bytes)
        problem = _tar_end_problem(fs, path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem = f"tar shard is corrupt: {exc}"
    if problem:  # rows read so far are kept; this row says the rest of the shard is lost
        order.append("__shard_error__")
        groups["__shard_error__"] = {"error": f"{problem} (after {len(order) - 1} keys)"}
    for key in order:
        yield _tar_row(key, groups[key])


def _tar_end_problem(fs, path: str) -> str | None:
    """tarfile's stream mode stops silently at a cut-off header; a whole tar ends with two zero blocks."""
    with fs.open_input_file(path) as f:
        size = f.size()
        if size % tarfile.BLOCKSIZE:
            return f"tar shard is truncated: {size} bytes is not a multiple of {tarfile.BLOCKSIZE}"
        f.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
        if f.read().strip(b"\0"):
            return "tar shard is truncated: no end-of-archive marker"
    return None


def _tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes | Exception:
    if not member.isfile():
        return ValueError(f"member {member.name} is not a regular file")
    if member.size > max_bytes:
        return ValueError(f"member {member.name} has {member.size} bytes, over data.max_bytes={max_bytes}")
    f = tar.extractfile(member)
    if f is None:
        return ValueError(f"member {member.name} cannot be read")
    data = f.read()
    if len(data) != member.size:  # a cut-off shard: stream mode does not raise, it returns short data
        return ValueError(f"member {member.name} truncated: {len(data)} of {member.size} bytes (the tar ends early)")
    return data


def _tar_row(key: str, members: dict) -> dict:
    if "error" in members:
        return _row(key, error=members["error"])
    meta = _parse_meta(members.get(".json")) if isinstance(members.get(".json"), bytes) else {}
    cls = members.get(".cls")
    label = cls.decode("utf-8", "replace").strip() if isinstance(cls, bytes) else meta.get("label")
    images = [e for e in members if e in IMAGE_EXTS]
    if not images:
        return _row(key, label=label, error=f"no image member ({'/'.join(IMAGE_EXTS)}) for this key")
    data = members[images[0]]
    if isinstance(data, Exception):
        return _row(key, label=label, error=f"unreadable shard member: {data}")
    return _row(key, data, label, meta.get("box"))
