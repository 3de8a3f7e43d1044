"""Readers: one read unit (see ``shards.read_units``) -> raw rows ``id, shard, key, label, box, data, error``.

Readers never decode images; they only pull bytes and labels out of a shard. A member that cannot be read
(too large, not a regular file, no image for a key, a repeated or reserved key) becomes a row with ``error`` set,
and a shard that cannot be read (cut off, not a tar, a Parquet file without a usable ``image`` column or with a cut
footer) becomes one row ``<shard>/__shard__`` naming the file, after the rows read before the break. So
:func:`read_unit` never raises and nothing is dropped silently: a bad member costs a row, a bad shard a shard.

Label sources: image folder -> the label directory (and a ``<key>.json`` sidecar); tar -> ``<key>.cls`` or the
``label`` field of ``<key>.json``; Parquet -> a ``label`` column (or ``json``). ``box`` is an optional object box
``[x0, y0, x1, y1]`` in normalized image coordinates from the JSON.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attnpipe.data.shards import IMAGE_EXTS, SHARD_ERROR_KEY, assign_keys, filesystem

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
_SIDECAR_MAX_BYTES = 1 << 20


class ShardError(ValueError):
    """A shard (or one read unit of it) cannot be read any further; the message says why."""


def read_unit(unit: dict, max_bytes: int) -> pa.Table:
    """All rows of one read unit as a table with :data:`RAW_SCHEMA`; never raises.

    Any failure of the reader keeps the rows read before it and adds one error row with key ``__shard__`` (unit
    ``part`` 0) or ``__shard__#<part>``, whose error names the shard file and the reason.
    """
    rows: list[dict] = []
    try:
        reader = {"tar": _read_tar, "parquet": _read_parquet, "folder": _read_folder}[unit["format"]]
        rows.extend(reader(unit, max_bytes))  # rows yielded before a failure stay in the list
    except Exception as exc:  # noqa: BLE001 - the shard boundary: a broken shard never fails the Ray task (or the run)
        rows.append(_shard_error_row(unit, exc, len(rows)))
    for r in rows:
        r["id"] = f"{unit['shard']}/{r['key']}"
        r["shard"] = unit["shard"]
    try:
        return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    except Exception as exc:  # noqa: BLE001 - a value arrow refuses: the unit is lost, and says so
        row = _shard_error_row(unit, exc, 0)
        row.update(id=f"{unit['shard']}/{row['key']}", shard=unit["shard"])
        return pa.Table.from_pylist([row], schema=RAW_SCHEMA)


def _shard_error_row(unit: dict, exc: Exception, rows_before: int) -> dict:
    part = int(unit.get("part") or 0)
    key = SHARD_ERROR_KEY if part == 0 else f"{SHARD_ERROR_KEY}#{part}"
    reason = str(exc) if isinstance(exc, ShardError) else _describe(exc)
    where = f" (row group {part})" if unit["format"] == "parquet" and part else ""
    kept = f"; the {rows_before} rows before it are kept" if rows_before else ""
    return _row(key, error=f"cannot read {unit['format']} shard {unit['uri']}{where}: {reason}{kept}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        try:
            return [float(v) for v in box]
        except OverflowError:  # an int too large for a float
            pass
    return [float("nan")] * 4


def _parse_meta(text) -> dict:
    if not text or not isinstance(text, (bytes, str)):
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_folder(unit: dict, max_bytes: int) -> Iterator[dict]:
    fs, root = filesystem(unit["uri"])
    files = unit["files"]
    keys = unit.get("keys") or [rel.rsplit(".", 1)[0] for rel in files]
    key_errors = unit.get("key_errors") or [None] * len(files)
    for rel, key, key_error in zip(files, keys, key_errors):
        stem = rel.rsplit(".", 1)[0]
        label = rel.split("/", 1)[0] if "/" in rel else None
        if key_error:
            yield _row(key, label=label, error=key_error)
            continue
        path = posixpath.join(root, rel)
        try:
            data = _read_capped(fs, path, max_bytes)
        except Exception as exc:  # noqa: BLE001 - one member's failure is its row
            yield _row(key, label=label, error=f"unreadable file {path}: {exc}")
            continue
        meta = _sidecar(fs, posixpath.join(root, stem + ".json"))
        yield _row(key, data, meta.get("label", label), meta.get("box"))


def _read_capped(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    kind = fs.get_file_info(path).type
    if kind != pafs.FileType.File:  # never open a fifo (it blocks) or a directory
        raise ValueError(_not_a_file(fs, path, kind))
    with fs.open_input_file(path) as f:
        if f.size() > max_bytes:
            raise ValueError(f"{f.size()} bytes, over data.max_bytes={max_bytes}")
        return f.read()


def _not_a_file(fs: pafs.FileSystem, path: str, kind: pafs.FileType) -> str:
    if kind == pafs.FileType.Directory:
        return "a directory named like an image, not an image file"
    if kind == pafs.FileType.NotFound:
        if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path):
            try:
                os.stat(path)
            except OSError as exc:
                return f"a broken symlink to {os.readlink(path)!r} ({exc.strerror})"
        return "missing (removed since discovery?)"
    return "not a regular file (a fifo, socket or device)"


def _sidecar(fs: pafs.FileSystem, path: str) -> dict:
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File or (info.size or 0) > _SIDECAR_MAX_BYTES:
            return {}
        with fs.open_input_stream(path) as f:
            return _parse_meta(f.read())
    except Exception:  # noqa: BLE001 - a sidecar only adds a label/box; a broken one leaves the image as it is
        return {}


def _read_parquet(unit: dict, max_bytes: int) -> Iterator[dict]:
    fs, path = filesystem(unit["uri"])
    part = int(unit["part"])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        problem = _parquet_schema_problem(pf.schema_arrow)
        if problem:  # a shard-level problem is reported once, by the unit of row group 0
            if part == 0:
                raise ShardError(problem)
            return
        if part >= pf.num_row_groups:
            return
        names = pf.schema_arrow.names
        cols = [c for c in ("key", "image", "label", "json") if c in names]
        table = pf.read_row_group(part, columns=cols)
        offset = sum(pf.metadata.row_group(g).num_rows for g in range(part))
        # ids are unique across row groups: assign over every key of the file (only its key column is read)
        all_keys = pf.read(columns=["key"]).column("key").to_pylist() if "key" in names else None
    assigned: list[tuple[str, str | None]]
    if all_keys is None:
        assigned = [(f"{offset + i:08d}", None) for i in range(table.num_rows)]
    else:
        keys = [_key_text(k) if k is not None else f"{i:08d}" for i, k in enumerate(all_keys)]
        assigned = assign_keys(keys, unit["shard"])[offset : offset + table.num_rows]
    for rec, (key, key_error) in zip(table.to_pylist(), assigned):
        meta = _parse_meta(rec.get("json"))
        image = rec["image"]
        if isinstance(image, dict):  # struct<bytes, path>, as Hugging Face datasets write images
            image = image.get("bytes")
        label = rec.get("label", meta.get("label"))
        if key_error:
            yield _row(key, label=label, error=key_error)
        elif image is None:
            yield _row(key, label=label, box=meta.get("box"), error="image column is null")
        elif len(image) > max_bytes:
            yield _row(key, label=label, error=f"{len(image)} bytes, over data.max_bytes={max_bytes}")
        else:
            yield _row(key, bytes(image), label, meta.get("box"))


def _key_text(k) -> str:
    return k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _parquet_schema_problem(schema: pa.Schema) -> str | None:
    if "image" not in schema.names:
        return f"no 'image' column (columns: {schema.names}); expected image bytes in a column named 'image'"
    t = schema.field("image").type
    if _is_binary(t):
        return None
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
        return None
    return f"column 'image' has type {t}; expected binary image bytes (or a struct with a binary 'bytes' field)"


def _read_tar(unit: dict, max_bytes: int) -> Iterator[dict]:
    """Stream a WebDataset-style tar (plain, gzip, bzip2 or xz): a sample is a run of consecutive members sharing
    a key (the path up to the first dot of the basename); a key that comes back later is a repeat, not a merge."""
    fs, path = filesystem(unit["uri"])
    samples: list[tuple[str, dict]] = []
    problem: str | None = None
    try:
        with fs.open_input_file(path) as raw:
            stream = _TarStream(_decompressed(raw))
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    base = posixpath.basename(member.name)
                    if base.startswith(".") or "." not in base:
                        continue
                    key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                    ext = "." + base.split(".", 1)[1].lower()
                    if not samples or samples[-1][0] != key or ext in samples[-1][1]:
                        samples.append((key, {}))
                    samples[-1][1][ext] = _tar_member(tar, member, max_bytes)
                end = tar.offset  # where the header that stopped the iteration starts
            problem = stream.end_problem(end)
    except (tarfile.ReadError, tarfile.CompressionError) as exc:
        problem = f"not a readable tar archive ({exc})" if not samples else f"corrupt tar data: {exc}"
    except EOFError as exc:  # gzip/bz2/xz: the compressed stream ends early
        problem = f"truncated: {exc}"
    except Exception as exc:  # noqa: BLE001 - a bad gzip CRC (BadGzipFile), an I/O error, ...
        problem = f"corrupt: {_describe(exc)}"
    for (_, members), (key, key_error) in zip(samples, assign_keys([k for k, _ in samples], unit["shard"])):
        row = _tar_row(key, members)
        if key_error:
            row.update(data=None, error=key_error)
        yield row
    if problem:
        raise ShardError(problem)


_COMPRESSED = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, mode="rb")),  # noqa: SIM115 - closed with the raw file
)


def _decompressed(raw):
    """The tar byte stream of a plain or compressed file (gzip's own CRC and length checks apply at its end)."""
    head = raw.read(6)
    raw.seek(0)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(raw)
    return raw


class _TarStream:
    """Tracks how many (decompressed) bytes tarfile read and where the last non-zero byte was.

    tarfile's stream mode stops silently at a cut-off or garbled header, so the end is checked here: a whole tar
    ends with two zero blocks (and zero padding) right where tarfile stopped.
    """

    def __init__(self, f):
        self._f = f
        self._read1: Callable[[int], bytes] | None = getattr(
            f, "read1", None
        )  # decompressors: one step at a time, so a cut loses no earlier bytes
        self._error: Exception | None = None
        self.total = 0
        self.last_nonzero = -1

    def read(self, n: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        if self._read1 is None:
            data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
        else:
            data = self._read_steps(n if n is not None and n >= 0 else 1 << 62)
        body = len(data.rstrip(b"\0"))
        if body:
            self.last_nonzero = self.total + body - 1
        self.total += len(data)
        return data

    def _read_steps(self, n: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            while size < n:
                piece = self._read1(min(n - size, 1 << 16)) if self._read1 else b""
                if not piece:
                    break
                chunks.append(piece)
                size += len(piece)
        except (EOFError, OSError) as exc:  # a cut or bad compressed stream: hand out what came before, then fail
            if not chunks:
                raise
            self._error = exc
        return b"".join(chunks)

    def end_problem(self, end: int) -> str | None:
        while self.read(1 << 20):  # drain: gzip checks its CRC and length only at the end of its stream
            pass
        if self.last_nonzero >= end:
            return f"truncated or garbled: no valid member header at byte {end} (of {self.total})"
        if self.total - end < 2 * tarfile.BLOCKSIZE or self.total % tarfile.BLOCKSIZE:
            return f"truncated: no end-of-archive marker ({self.total} bytes)"
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
