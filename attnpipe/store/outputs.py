"""Publishing a small output directory (eval, dedup): built locally, then made visible at once, marked as ours.

Every such output holds ``_attnpipe.json`` (its kind and the files it published), written last: on an object
store it is the commit point; on a local disk the whole directory appears by one rename. An existing ``--out`` is
replaced only when it is a complete attnpipe output of the same kind, and then only the files its marker lists
are deleted: a user's own file in it is kept, and a directory that is not ours is refused.

Example::

    stage = staging_dir("s3://bucket/eval")      # a local temporary directory
    ...write metrics.json, report.html into stage...
    publish(stage, "s3://bucket/eval", kind="eval", overwrite=True)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from attnpipe import fs

MARKER = "_attnpipe.json"


class NotOurs(FileExistsError):
    """``--out`` exists and is not an attnpipe output of this kind: refused, nothing deleted."""


def staging_dir(out: str) -> str:
    """A fresh local directory to build an output in (beside ``out`` when local, so publishing is a rename)."""
    if fs.is_local(out):
        _, path = fs.resolve(out)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        stage = os.path.join(parent, f".{os.path.basename(path)}.staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(stage)
        return stage
    return tempfile.mkdtemp(prefix="attnpipe-stage-")


def check_replaceable(out: str, kind: str, overwrite: bool) -> dict | None:
    """The marker of an existing ``out`` that may be replaced (None when ``out`` does not exist).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        NotOurs: ``out`` exists and is not a complete attnpipe ``kind`` output.
    """
    if not fs.exists(out) and not fs.listdir(out):
        return None
    names = fs.listdir(out)
    if not names:
        return {"files": []}  # an empty directory: nothing to lose
    marker_uri = fs.join(out, MARKER)
    try:
        marker = fs.read_json(marker_uri) if MARKER in names else None
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or marker.get("kind") != kind:
        what = f"an attnpipe {marker.get('kind')} output" if isinstance(marker, dict) else "not an attnpipe output"
        raise NotOurs(
            f"--out {fs.display(out)} exists and is {what} (no {MARKER} of kind {kind!r}); refusing to replace it. "
            "Choose a new or empty directory"
        )
    if not overwrite:
        raise FileExistsError(f"--out {fs.display(out)} already exists; pass --overwrite to replace it")
    return marker


def publish(stage: str, out: str, kind: str, overwrite: bool = False) -> None:
    """Make the local directory ``stage`` visible at ``out`` (see module doc); ``stage`` is consumed."""
    try:
        old = check_replaceable(out, kind, overwrite)
        files = sorted(rel for rel, _ in fs.walk_files(f"{stage}"))
        fs.write_json(os.path.join(stage, MARKER), {"kind": kind, "files": files})
        if fs.is_local(out) and (old is None or _only_listed(out, old)):
            _swap_local(stage, fs.resolve(out)[1])
            return
        for rel in files:
            if os.path.isfile(os.path.join(stage, rel)):
                with open(os.path.join(stage, rel), "rb") as f:
                    fs.write_bytes(fs.join(out, rel), f.read())
        fs.write_json(fs.join(out, MARKER), {"kind": kind, "files": files})  # the commit point
        for rel in sorted(set((old or {}).get("files", [])) - set(files)):
            fs.delete_file(fs.join(out, rel))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _only_listed(out: str, marker: dict) -> bool:
    listed = set(marker.get("files", [])) | {MARKER}
    return all(rel in listed for rel, _ in fs.walk_files(out))


def _swap_local(stage: str, out: str) -> None:
    old = None
    if os.path.exists(out):
        old = f"{os.path.dirname(out)}/.{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(stage, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)  # held only files our marker listed (checked before)
