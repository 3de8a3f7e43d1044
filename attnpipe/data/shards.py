"""Shard discovery: input URIs -> shards (image folder | WebDataset tar | Parquet) with fingerprints and read units.

Everything goes through pyarrow filesystems, so a local path and an object-store URI are handled alike. A *shard*
is the unit of change for re-indexing; a *read unit* is the unit of parallel reading (a tar shard, one Parquet row
group, or a chunk of an image folder's files).

Rules for a directory given as ``--input``: if it holds ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` / ``*.parquet`` files,
each is a shard; else if it holds images directly (flat) or in label sub-directories, it is one image-folder shard;
else each sub-directory that is an image folder is a shard (the layout ``attnpipe sample --format folder`` writes).

Hostile input: discovery, read units and fingerprints never fail for a shard whose content is broken (a cut Parquet
footer, a fifo named like an image, a dangling symlink): the readers turn those into error rows. Ids are unique in a
shard whatever its keys (:func:`assign_keys`).

Example::

    shards = discover(["data/train"])          # [Shard(name='shard-00000', format='tar', ...), ...]
    units = read_units(shards, folder_chunk=512)
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attnpipe import fs as _fs

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SHARD_EXTS = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".parquet": "parquet"}  # longest suffix first below
SHARD_ERROR_KEY = "__shard__"  # key of the row that reports a shard (or one read unit of it) that cannot be read
RESERVED_PREFIX = "__"  # member keys starting with it are refused (attnpipe's own rows; WebDataset's __key__ too)
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
    """The pyarrow filesystem and path for a local path or a URI (resolved by :func:`attnpipe.fs.resolve`)."""
    return _fs.resolve(uri)


def _as_uri(given: str, root: str, shard_path: str) -> str:
    """A shard's path inside the filesystem of input ``given`` (resolved to ``root``) as a URI readers can resolve."""
    if _fs.is_local(given):
        return shard_path
    rel = shard_path[len(root) :].strip("/")
    return _fs.join(given, rel) if rel else given


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
        found = [replace(s, uri=_as_uri(uri, path, s.uri)) for s in _shards_in(fs, path, info, uri)]
        if not found:
            raise InputError(
                f"input {uri!r} holds no shards: expected {', '.join(SHARD_EXTS)} files, or image files "
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
    """BLAKE2b of a shard's bytes (a folder: each member's relative path, then its bytes, in sorted order).

    Never raises and never blocks: a member that is not a regular file (a fifo, a directory, a dangling symlink) or
    that fails while read contributes its path and the kind of failure instead of its bytes.
    """
    fs, root = filesystem(shard.uri)
    h = hashlib.blake2b(digest_size=16)
    paths = [root] if shard.format != "folder" else [posixpath.join(root, f) for f in shard.files]
    for path in paths:
        if shard.format == "folder":
            h.update(f"{path[len(root) :]}\0".encode())
        try:
            kind = fs.get_file_info(path).type
            if kind != pafs.FileType.File:  # opening a fifo would block until a writer comes
                h.update(f"\0not a file:{kind.name}\0".encode())
                continue
            with fs.open_input_stream(path) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except Exception as exc:  # noqa: BLE001 - unreadable: the readers report it as error rows; the hash stays stable
            h.update(f"\0unreadable:{type(exc).__name__}\0".encode())
    return f"blake2b:{h.hexdigest()}"


def _shards_in(fs: pafs.FileSystem, path: str, info: pafs.FileInfo, uri: str) -> list[Shard]:
    if info.type == pafs.FileType.File:
        if _shard_ext(path) is None:
            raise InputError(f"input file {uri!r} is not a shard: expected one of {list(SHARD_EXTS)}")
        return [_file_shard(fs, path, info)]
    children = fs.get_file_info(pafs.FileSelector(path))
    files = [c for c in children if c.type == pafs.FileType.File and _shard_ext(c.path)]
    if files:
        return [_file_shard(fs, c.path, c) for c in files]
    folder = _folder_shard(fs, path)
    if folder is not None:
        return [folder]
    subdirs = [c for c in children if c.type == pafs.FileType.Directory]
    return [s for s in (_folder_shard(fs, c.path) for c in subdirs) if s is not None]


def _file_shard(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> Shard:
    ext = _shard_ext(path) or ""
    name = posixpath.basename(path)[: -len(ext)]  # x.tar.gz -> x
    size = int(info.size or 0)
    return Shard(name, path, SHARD_EXTS[ext], size, _mtime_ns(info), "", f"{size}:{_mtime_ns(info)}")


def _shard_ext(path: str) -> str | None:
    lower = path.lower()
    return next((e for e in sorted(SHARD_EXTS, key=len, reverse=True) if lower.endswith(e)), None)


def _folder_shard(fs: pafs.FileSystem, path: str) -> Shard | None:
    """An image folder: images at depth 1 (flat) or 2 (``<label>/<file>``); None if it holds none.

    Entries named like images that are not regular files (a directory ``x.jpg/``, a fifo, a dangling symlink or a
    symlink loop) are members too, so that the reader reports each as an error row instead of dropping it.
    """
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = path.rstrip("/") + "/"
    named = [i for i in infos if _ext(i.path) in IMAGE_EXTS and i.path[len(prefix) :].count("/") <= 1]
    images = [i for i in named if i.type == pafs.FileType.File]
    if not images:
        return None
    listed = {i.path[len(prefix) :] for i in named}
    broken = sorted(set(_local_broken_links(fs, path)) - listed)  # pyarrow's listing leaves them out
    rel = tuple(sorted(listed | set(broken)))
    h = hashlib.blake2b(digest_size=16)
    for i in sorted(named, key=lambda i: i.path):
        h.update(f"{i.path[len(prefix) :]}\0{i.size}\0{_mtime_ns(i)}\0{i.type.name}\n".encode())
    for b in broken:
        h.update(f"{b}\0broken link\n".encode())
    size, mtime = sum(i.size or 0 for i in images), max(_mtime_ns(i) for i in images)
    return Shard(posixpath.basename(path.rstrip("/")), path, "folder", size, mtime, "", f"listing:{h.hexdigest()}", rel)


def _local_broken_links(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relative paths of symlinks named like images at depth 1 or 2 whose target is missing or a loop (local only)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return []
    found: list[str] = []
    for rel_dir in ["", *_subdirs(root)]:
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                for entry in it:
                    if _ext(entry.name) in IMAGE_EXTS and entry.is_symlink() and not _target_exists(entry.path):
                        found.append(posixpath.join(rel_dir, entry.name) if rel_dir else entry.name)
        except OSError:
            continue
    return found


def _subdirs(root: str) -> list[str]:
    try:
        with os.scandir(root) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _target_exists(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:  # ENOENT (dangling), ELOOP (a loop)
        return False
    return True


def _mtime_ns(info: pafs.FileInfo) -> int:
    return int(info.mtime_ns or 0)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def read_units(shards: list[Shard], folder_chunk: int = 512) -> list[dict]:
    """Split shards into independent read units (dicts, so Ray Data can carry them as rows).

    Never raises for a damaged shard: a Parquet file whose footer cannot be read is one unit, and its reader turns
    the failure into the shard's error row. Image-folder units carry the member keys assigned over the whole folder
    (``keys``, ``key_errors``), so that ``a.jpg`` and ``a.png`` get distinct ids whichever units they land in.
    """
    units: list[dict] = []
    for s in shards:
        base = {"shard": s.name, "uri": s.uri, "format": s.format, "files": [], "keys": [], "key_errors": []}
        if s.format == "tar":
            units.append({**base, "part": 0})
        elif s.format == "parquet":
            units.extend({**base, "part": g} for g in range(_row_groups(s.uri)))
        else:
            assigned = assign_keys([f.rsplit(".", 1)[0] for f in s.files], s.name)
            for i in range(0, len(s.files), folder_chunk):
                chunk = assigned[i : i + folder_chunk]
                units.append(
                    {
                        **base,
                        "part": i // folder_chunk,
                        "files": list(s.files[i : i + folder_chunk]),
                        "keys": [k for k, _ in chunk],
                        "key_errors": [e for _, e in chunk],
                    }
                )
    return units


def _row_groups(uri: str) -> int:
    try:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as f:
            return max(pq.ParquetFile(f).num_row_groups, 1)
    except Exception:  # noqa: BLE001 - a cut footer, not Parquet at all, unreadable: one unit, whose reader reports why
        return 1


def assign_keys(keys: list[str], shard: str) -> list[tuple[str, str | None]]:
    """The key each member's id uses (``<shard>/<key>``) and an error for members that cannot keep their own.

    ``keys`` are the members' keys in shard order. The first member with a key keeps it; the n-th repeat (n >= 2)
    becomes ``<key>#<n>`` with the error ``duplicate key '<key>' in <shard> (repeat n)`` (``__dup__#<key>#<n>`` if
    the shard also holds a real key ``<key>#<n>``). A key starting with ``__`` is reserved (attnpipe's
    ``__shard__`` rows, WebDataset's ``__key__``): its member becomes an error row with key ``__reserved__/<key>``.
    Keys are unique in the result, since no kept key starts with ``__`` and ``n`` is the digits after the last ``#``.
    """
    mapped = [f"__reserved__/{k}" if k.startswith(RESERVED_PREFIX) else k for k in keys]
    kept = set(mapped)
    seen: Counter[str] = Counter()
    out: list[tuple[str, str | None]] = []
    for key, m in zip(keys, mapped):
        seen[m] += 1
        n = seen[m]
        error = None
        if key.startswith(RESERVED_PREFIX):
            error = f"key {key!r} in {shard} is reserved (keys starting with {RESERVED_PREFIX!r} are attnpipe's)"
        if n == 1:
            out.append((m, error))
            continue
        repeat = f"{m}#{n}"
        out.append(
            (f"__dup__#{repeat}" if repeat in kept else repeat, f"duplicate key {key!r} in {shard} (repeat {n})")
        )
    return out
