"""Versioned index layout: ``ROOT/v<N>/{manifest.json, faiss*.index, ids.parquet, lsh/}`` and ``ROOT/CURRENT``.

``ROOT`` is a local path or an object-store URI. A version is built in a local staging directory, checksummed
(sha256 + size of every file), and published: on a local disk by one rename into ``ROOT/v<N>``; on an object store
by uploading its files, then its ``manifest.json`` (a version is complete when its manifest exists). Only then is
``CURRENT`` replaced (one small object: ``v<N> sha256=<hex of that manifest.json>``), so readers never see a version
that is not whole, and a damaged manifest is caught by the checksum ``CURRENT`` carries.

Readers resolve ``CURRENT``; a version on an object store is downloaded once into a local cache
(``$ATTNPIPE_CACHE`` or ``~/.cache/attnpipe``) because faiss reads local files. Loading checks every file's size,
and its sha256 when the file is small (≤ ``FULL_HASH_MAX`` bytes) or was just downloaded; bigger files get a cheap
sampled hash (``quick_digest``) on every load, and the full check in ``attnpipe verify``.

Example::

    version = current_version("s3://bucket/index")   # 'v3'
    manifest = load_manifest("s3://bucket/index")    # manifest["path"]: a local directory holding v3's files
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid

from attnpipe import fs

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
FULL_HASH_MAX = 64 << 20
_VERSION = re.compile(r"^v(\d+)$")


class IndexLayoutError(RuntimeError):
    """An index root or version is missing, incomplete or damaged; the message names the file."""


def versions(root: str) -> list[str]:
    """Complete versions under ``root`` (``v<N>`` with a manifest), oldest first."""
    found = [d for d in fs.listdir(root) if _VERSION.match(d) and fs.is_file(fs.join(root, d, MANIFEST))]
    return sorted(found, key=lambda d: int(d[1:]))


def next_version(root: str) -> str:
    """``v<N+1>`` where N is the largest version number ever used under ``root`` (complete or not)."""
    used = [int(m.group(1)) for d in fs.listdir(root) if (m := _VERSION.match(d))]
    return f"v{max(used, default=0) + 1}"


def read_current(root: str) -> tuple[str, str | None]:
    """``(version, sha256 of its manifest or None)`` from ``ROOT/CURRENT``.

    Raises:
        IndexLayoutError: no ``CURRENT``, or it is not UTF-8 / does not name a version (the message names it).
    """
    uri = fs.join(root, CURRENT)
    if not fs.is_file(uri):
        raise IndexLayoutError(
            f"{fs.display(root)} has no {CURRENT} file: not an attnpipe index root (build one with `attnpipe index`)"
        )
    try:
        words = fs.read_text(uri).split()
    except ValueError as exc:
        raise IndexLayoutError(f"{exc}; `attnpipe reindex` repairs it") from None
    version = words[0] if words else ""
    sha = next((w.removeprefix("sha256=") for w in words[1:] if w.startswith("sha256=")), None)
    if not _VERSION.match(version):
        raise IndexLayoutError(f"{fs.display(uri)} names {version!r}, not a version: damaged")
    return version, sha


def current_version(root: str) -> str:
    version, _ = read_current(root)
    if not fs.is_file(fs.join(root, version, MANIFEST)):
        raise IndexLayoutError(f"{fs.display(fs.join(root, CURRENT))} names {version}, which has no {MANIFEST}")
    return version


def staging(root: str, version: str) -> str:
    """A fresh local directory to build ``version`` in (inside a local root, so publishing is a rename)."""
    if fs.is_local(root):
        path = os.path.join(fs.resolve(root)[1], f".{version}.staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(path)
        return path
    return tempfile.mkdtemp(prefix=f"attnpipe-{version}-")


def clean_leftovers(root: str) -> list[str]:
    """Remove what builds that died left: local staging directories, versions without a manifest (partial uploads).

    Both are named by attnpipe's own patterns (``.v<N>.staging-*``, ``v<N>/``) inside an index root.
    """
    try:
        live = read_current(root)[0]
    except IndexLayoutError:  # missing or damaged: versions without a manifest are incomplete all the same
        live = None
    gone = []
    for d in fs.listdir(root):
        partial = _VERSION.match(d) and d != live and not fs.is_file(fs.join(root, d, MANIFEST))
        if (d.startswith(".v") and ".staging-" in d) or partial:
            fs.delete_dir(fs.join(root, d))
            gone.append(d)
    return gone


def prune(root: str, keep: int) -> list[str]:
    """Delete the oldest versions beyond the newest ``keep`` (``CURRENT``'s is always kept); returns them."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 version, got {keep}")
    live = current_version(root)
    old = [v for v in versions(root)[:-keep] if v != live]
    for v in old:
        if fs.is_local(root):  # a rename first: readers never see half a version
            path = fs.resolve(fs.join(root, v))[1]
            trash = os.path.join(os.path.dirname(path), f".{v}.staging-pruned")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            fs.delete_file(fs.join(root, v, MANIFEST))  # incomplete first, then gone
            fs.delete_dir(fs.join(root, v))
    return old


def checksum(path: str) -> str:
    """The layout's file checksum: sha256 of the whole file."""
    return fs.sha256_file(path)


def quick_digest(path: str, size: int) -> str:
    """sha256 of the size and 16 evenly spread 64 KiB windows: catches truncation and most damage cheaply."""
    h = hashlib.sha256(str(size).encode())
    window = 1 << 16
    with open(path, "rb") as f:
        for i in range(16):
            f.seek(max(0, (size - window) * i // 15))
            h.update(f.read(window))
    return h.hexdigest()


def file_checksums(directory: str) -> dict[str, dict]:
    """Relative path -> {sha256, size, quick} of every file under the local ``directory`` except the manifest."""
    out = {}
    for rel, size in fs.walk_files(directory):
        if rel != MANIFEST:
            path = os.path.join(directory, rel)
            out[rel] = {"sha256": checksum(path), "size": size, "quick": quick_digest(path, size)}
    return dict(sorted(out.items()))


def publish_version(root: str, stage: str, version: str, manifest: dict) -> str:
    """Checksum the local ``stage``, publish it as ``ROOT/<version>``, verify it, then move ``CURRENT``."""
    checks = file_checksums(stage)
    manifest = {
        **manifest,
        "version": version,
        "files": {k: v["sha256"] for k, v in checks.items()},
        "file_info": checks,
    }
    data = fs.write_json(os.path.join(stage, MANIFEST), manifest)
    target = fs.join(root, version)
    if fs.is_local(root):
        os.rename(stage, fs.resolve(target)[1])
    else:
        for rel in checks:
            with open(os.path.join(stage, rel), "rb") as f:
                fs.write_bytes(fs.join(target, rel), f.read())
        fs.write_bytes(fs.join(target, MANIFEST), data)  # the version is complete from here on
        shutil.rmtree(stage, ignore_errors=True)
    load_manifest(root, version, verify=True)
    set_current(root, version, fs.sha256_bytes(data))
    return target


def set_current(root: str, version: str, manifest_sha256: str | None = None) -> None:
    """Name ``version`` live: one atomic write of ``CURRENT`` (local: temp + fsync + rename)."""
    if manifest_sha256 is None:
        manifest_sha256 = fs.sha256_file(fs.join(root, version, MANIFEST))
    fs.write_bytes(fs.join(root, CURRENT), f"{version} sha256={manifest_sha256}\n".encode())
    if fs.is_local(root):
        fd = os.open(fs.resolve(root)[1], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def repair_current(root: str) -> str | None:
    """When ``CURRENT`` is damaged or names a broken version, point it at the newest version that verifies.

    Returns the version now named (None when nothing needed repair or no version verifies).
    """
    try:
        load_manifest(root, verify=True)
        return None
    except IndexLayoutError:
        pass
    for version in reversed(versions(root)):
        try:
            load_manifest(root, version, verify=True)
        except IndexLayoutError:
            continue
        set_current(root, version)
        return version
    return None


def load_manifest(root: str, version: str | None = None, verify: bool = True, full: bool = False) -> dict:
    """The manifest of ``version`` (default: ``CURRENT``), its files checked; ``manifest["path"]`` is a local
    directory holding them (the version itself, or its cached copy for an object-store root).

    Raises:
        IndexLayoutError: no such version, a missing/damaged manifest, or a missing/damaged file (named).
    """
    expected_sha = None
    if version is None:
        version, expected_sha = read_current(root)
    uri = fs.join(root, version, MANIFEST)
    if not fs.is_file(uri):
        raise IndexLayoutError(
            f"index version {version} under {fs.display(root)} has no {MANIFEST} (incomplete or not a version)"
        )
    data = fs.read_bytes(uri)
    if expected_sha and fs.sha256_bytes(data) != expected_sha:
        raise IndexLayoutError(f"{fs.display(uri)} is damaged: its sha256 does not match {CURRENT}")
    try:
        manifest = json.loads(data)
    except ValueError:
        raise IndexLayoutError(f"{fs.display(uri)} is damaged: not valid JSON") from None
    directory, fresh = _local_copy(root, version, manifest)
    if verify:
        _verify_files(directory, manifest, full or fresh, fs.display(uri))
    manifest["path"] = directory
    return manifest


def _local_copy(root: str, version: str, manifest: dict) -> tuple[str, bool]:
    """A local directory with the version's files; (dir, True) when files were just downloaded."""
    if fs.is_local(root):
        return fs.resolve(fs.join(root, version))[1], False
    directory = fs.cache_dir("index", f"{fs.display(root)}/{version}")
    fresh = False
    for rel in manifest.get("files", {}):
        local = os.path.join(directory, rel)
        size = manifest.get("file_info", {}).get(rel, {}).get("size")
        if not os.path.isfile(local) or (size is not None and os.path.getsize(local) != size):
            fs.download(fs.join(root, version, rel), local)
            fresh = True
    return directory, fresh


def _verify_files(directory: str, manifest: dict, full: bool, where: str) -> None:
    info = manifest.get("file_info", {})
    for rel, expected in manifest.get("files", {}).items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise IndexLayoutError(f"index file {path} is missing (listed in {where})")
        size = os.path.getsize(path)
        meta = info.get(rel, {})
        if meta.get("size") is not None and size != meta["size"]:
            raise IndexLayoutError(f"index file {path} is damaged: {size} bytes, {where} recorded {meta['size']}")
        if full or size <= FULL_HASH_MAX or "quick" not in meta:
            ok = checksum(path) == expected
        else:
            ok = quick_digest(path, size) == meta["quick"]
        if not ok:
            raise IndexLayoutError(
                f"index file {path} is damaged: its sha256 does not match {where}; rebuild the index"
            )
