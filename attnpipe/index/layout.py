"""Versioned index layout: ``ROOT/v<N>/{manifest.json, faiss*.index, ids.parquet, lsh/}`` and ``ROOT/CURRENT``.

A version is built in ``ROOT/.v<N>.staging-*``, checksummed, renamed to ``ROOT/v<N>``, verified, and only then named
in ``CURRENT`` (write to a temporary file, fsync, rename). Readers resolve ``CURRENT`` and check every file against
the manifest's checksums, so a damaged file is reported by name instead of crashing faiss.

Example::

    root = "indexes/"
    version = current_version(root)        # 'v3'
    manifest = load_manifest(root, version, verify=True)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

from attnpipe.store import sha256_file, write_json

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
_VERSION = re.compile(r"^v(\d+)$")


class IndexLayoutError(RuntimeError):
    """An index root or version is missing, incomplete or damaged; the message names the file."""


def versions(root: str) -> list[str]:
    """Complete versions under ``root`` (directories ``v<N>`` with a manifest), oldest first."""
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if _VERSION.match(d) and os.path.isfile(os.path.join(root, d, MANIFEST))]
    return sorted(found, key=lambda d: int(d[1:]))


def next_version(root: str) -> str:
    """``v<N+1>`` where N is the largest version number ever used under ``root`` (complete or not)."""
    used = [int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else []) if (m := _VERSION.match(d))]
    return f"v{max(used, default=0) + 1}"


def current_version(root: str) -> str:
    path = os.path.join(root, CURRENT)
    if not os.path.isfile(path):
        raise IndexLayoutError(
            f"{root} has no {CURRENT} file: not an attnpipe index root (build one with `attnpipe index`)"
        )
    with open(path) as f:
        version = f.read().strip()
    if not _VERSION.match(version) or not os.path.isdir(os.path.join(root, version)):
        raise IndexLayoutError(f"{path} names {version!r}, which is not a version directory under {root}")
    return version


def staging(root: str, version: str) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f".{version}.staging-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def clean_leftovers(root: str) -> list[str]:
    """Remove staging directories of builds that died; returns what was removed."""
    if not os.path.isdir(root):
        return []
    gone = [d for d in os.listdir(root) if d.startswith(".v") and ".staging-" in d]
    for d in gone:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return gone


def prune(root: str, keep: int) -> list[str]:
    """Delete the oldest versions beyond the newest ``keep`` (``CURRENT``'s is always kept); returns them."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 version, got {keep}")
    live = current_version(root)
    old = [v for v in versions(root)[:-keep] if v != live]
    for v in old:
        trash = os.path.join(root, f".{v}.staging-pruned")  # a rename first: readers never see half a version
        os.rename(os.path.join(root, v), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return old


checksum = sha256_file  # the layout's file checksum (manifest "files")


def file_checksums(directory: str) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the manifest, keyed by relative path."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out[rel] = checksum(os.path.join(base, name))
    return dict(sorted(out.items()))


def publish_version(root: str, stage: str, version: str, manifest: dict) -> str:
    """Checksum, write the manifest, rename into ``ROOT/<version>``, verify, then move ``CURRENT``."""
    manifest = {**manifest, "version": version, "files": file_checksums(stage)}
    write_json(os.path.join(stage, MANIFEST), manifest)
    final = os.path.join(root, version)
    os.rename(stage, final)
    load_manifest(root, version, verify=True)
    set_current(root, version)
    return final


def set_current(root: str, version: str) -> None:
    tmp = os.path.join(root, f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, CURRENT))
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_manifest(root: str, version: str | None = None, verify: bool = True) -> dict:
    """The manifest of ``version`` (default: ``CURRENT``), with every file checked against its checksum.

    Raises:
        IndexLayoutError: no such version, a missing manifest, or a missing/damaged file (named in the message).
    """
    version = version or current_version(root)
    directory = os.path.join(root, version)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise IndexLayoutError(f"index version {version} under {root} has no {MANIFEST} (incomplete or not a version)")
    with open(path) as f:
        manifest = json.load(f)
    if verify:
        for rel, expected in manifest.get("files", {}).items():
            file = os.path.join(directory, rel)
            if not os.path.isfile(file):
                raise IndexLayoutError(f"index file {file} is missing (listed in {path})")
            if checksum(file) != expected:
                raise IndexLayoutError(
                    f"index file {file} is damaged: its sha256 does not match {path}; rebuild the index"
                )
    manifest["path"] = directory
    return manifest
