"""Shard discovery: input URIs -> shards (image folder | WebDataset tar | Parquet) with fingerprints and read units.

Everything goes through pyarrow filesystems, so a local path and an object-store URI are handled alike. A *shard*
is the unit of change for re-indexing; a *read unit* is the unit of parallel reading (a tar shard, one Parquet row
group, or a chunk of an image folder's files).

Rules for a directory given as ``--input``: if it holds ``*.tar`` / ``*.parquet`` files, each is a shard; else if it
holds images directly (flat) or in label sub-directories, it is one image-folder shard; else each sub-directory
that is an image folder is a shard (the layout ``attnpipe sample --format folder`` writes).

Example::

    shards = discover(["data/train"])          # [Shard(name='shard-00000', format='tar', ...), ...]
    units = read_units(shards, folder_chunk=512)
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import pyarrow.fs as pafs
import pyarrow.parquet as pq

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SHARD_EXTS = {".tar": "tar", ".parquet": "parquet"}
_HASH_THREADS = 8


class InputError(ValueError):
    """An input path is missing, empty or not a shard attnpipe can read; the message says which and why."""


@dataclass(frozen=True)
class Shard:
    name: str  # unique in a dataset; prefix of every id
    uri: str  # as resolved: filesystem path or URI
    format: str  # folder | tar | parquet
    size: int
    mtime_ns: int
    fingerprint: str  # content hash "blake2b:<hex>" ("" until hashed); see discover()
    stat: str = ""  # size + mtime of the file, or of every member of a folder: unchanged stat -> reuse fingerprint
    files: tuple[str, ...] = field(default=(), repr=False)  # image-folder members, relative paths, sorted

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("files")
        return d


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or a URI (s3://, gs://, file://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def check_inputs(uris: list[str]) -> None:
    """Fail fast (before any output is created) when no input is given or one does not exist.

    Raises:
        InputError: naming the missing input.
    """
    if not uris:
        raise InputError("no --input given; pass one or more shard files or directories")
    for uri in uris:
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise InputError(f"input {uri!r} does not exist")


def discover(uris: list[str], known: dict[str, dict] | None = None) -> list[Shard]:
    """Resolve input URIs into shards with content fingerprints, sorted by name.

    A shard's fingerprint is a BLAKE2b hash of its whole content (for an image folder: of every member's relative
    path and bytes). Hashing reads the data once, so it is skipped when ``known`` (name -> a manifest entry with
    ``stat`` and ``fingerprint``) has the shard with the same size, mtime and location: the known
    fingerprint is reused, like ``git status`` or ``rsync`` do. Shards to hash are read by a thread pool.

    Raises:
        InputError: a path does not exist, holds no shard, or two shards share a name.
    """
    check_inputs(uris)
    shards: list[Shard] = []
    for uri in uris:
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        found = _shards_in(fs, path, info, uri)
        if not found:
            raise InputError(
                f"input {uri!r} holds no shards: expected .tar or .parquet files, or image files "
                f"({', '.join(IMAGE_EXTS)}) directly or in label sub-directories"
            )
        shards.extend(found)
    names = [s.name for s in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"shard names must be unique across inputs (ids are <shard>/<key>); repeated: {dupes}")
    return sorted(_fingerprinted(shards, known or {}), key=lambda s: s.name)


def _fingerprinted(shards: list[Shard], known: dict[str, dict]) -> list[Shard]:
    def same(s: Shard) -> bool:
        k = known.get(s.name) or {}
        return (k.get("stat"), k.get("uri")) == (s.stat, s.uri) and bool(k.get("fingerprint"))

    todo = [s for s in shards if not same(s)]
    with ThreadPoolExecutor(min(_HASH_THREADS, max(len(todo), 1))) as pool:
        hashed = dict(zip((s.name for s in todo), pool.map(content_hash, todo)))
    return [replace(s, fingerprint=hashed.get(s.name) or known[s.name]["fingerprint"]) for s in shards]


def content_hash(shard: Shard) -> str:
    """BLAKE2b of a shard's bytes (a folder: each member's relative path, then its bytes, in sorted order)."""
    fs, _ = filesystem(shard.uri)
    h = hashlib.blake2b(digest_size=16)
    paths = [shard.uri] if shard.format != "folder" else [posixpath.join(shard.uri, f) for f in shard.files]
    for path in paths:
        if shard.format == "folder":
            h.update(f"{path[len(shard.uri) :]}\0".encode())
        with fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return f"blake2b:{h.hexdigest()}"


def _shards_in(fs: pafs.FileSystem, path: str, info: pafs.FileInfo, uri: str) -> list[Shard]:
    if info.type == pafs.FileType.File:
        fmt = SHARD_EXTS.get(_ext(path))
        if fmt is None:
            raise InputError(f"input file {uri!r} is not a shard: expected one of {sorted(SHARD_EXTS)}")
        return [_file_shard(fs, path, info, fmt)]
    children = fs.get_file_info(pafs.FileSelector(path))
    files = [c for c in children if c.type == pafs.FileType.File and _ext(c.path) in SHARD_EXTS]
    if files:
        return [_file_shard(fs, c.path, c, SHARD_EXTS[_ext(c.path)]) for c in files]
    folder = _folder_shard(fs, path)
    if folder is not None:
        return [folder]
    subdirs = [c for c in children if c.type == pafs.FileType.Directory]
    return [s for s in (_folder_shard(fs, c.path) for c in subdirs) if s is not None]


def _file_shard(fs: pafs.FileSystem, path: str, info: pafs.FileInfo, fmt: str) -> Shard:
    name = posixpath.basename(path).rsplit(".", 1)[0]
    return Shard(name, path, fmt, info.size, _mtime_ns(info), "", f"{info.size}:{_mtime_ns(info)}")


def _folder_shard(fs: pafs.FileSystem, path: str) -> Shard | None:
    """An image folder: images at depth 1 (flat) or 2 (``<label>/<file>``); None if it holds none."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = path.rstrip("/") + "/"
    images = [i for i in infos if i.type == pafs.FileType.File and _ext(i.path) in IMAGE_EXTS]
    images = [i for i in images if i.path[len(prefix) :].count("/") <= 1]
    if not images:
        return None
    images.sort(key=lambda i: i.path)
    rel = tuple(i.path[len(prefix) :] for i in images)
    h = hashlib.blake2b(digest_size=16)
    for i in images:
        h.update(f"{i.path[len(prefix) :]}\0{i.size}\0{_mtime_ns(i)}\n".encode())
    size, mtime = sum(i.size for i in images), max(_mtime_ns(i) for i in images)
    return Shard(posixpath.basename(path.rstrip("/")), path, "folder", size, mtime, "", f"listing:{h.hexdigest()}", rel)


def _mtime_ns(info: pafs.FileInfo) -> int:
    return int(info.mtime_ns or 0)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def read_units(shards: list[Shard], folder_chunk: int = 512) -> list[dict]:
    """Split shards into independent read units (dicts, so Ray Data can carry them as rows)."""
    units: list[dict] = []
    for s in shards:
        base = {"shard": s.name, "uri": s.uri, "format": s.format}
        if s.format == "tar":
            units.append({**base, "part": 0, "files": []})
        elif s.format == "parquet":
            fs, path = filesystem(s.uri)
            with fs.open_input_file(path) as f:
                groups = pq.ParquetFile(f).num_row_groups
            units.extend({**base, "part": g, "files": []} for g in range(max(groups, 1)))
        else:
            for i in range(0, len(s.files), folder_chunk):
                units.append({**base, "part": i // folder_chunk, "files": list(s.files[i : i + folder_chunk])})
    return units
