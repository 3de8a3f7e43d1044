"""An exclusive, stale-aware lock file: one re-indexing job per embeddings dataset and index root.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on POSIX filesystems, NFS v3+ included) holding its
owner (host, pid), start time and command. While held, a heartbeat thread touches it every ``HEARTBEAT_S``. A lock
is *stale* — its owner died without releasing it (``kill -9``, a lost node) — when its owner is a dead process on
this host, or when its heartbeat is older than ``stale_after_s`` (owners on other hosts). A stale lock is taken
over (renamed aside first, so two contenders cannot both win); a live one is refused with :class:`LockHeld`.

On an object store (no ``O_EXCL``, and pyarrow cannot send a conditional PUT) the lock is a *lease object*: a
contender that finds no lock (or a stale one) writes its owner record, waits ``SETTLE_S`` for any concurrent PUT to
land, and reads the object back: the one whose token is there holds the lock, the others get :class:`LockHeld`.
The holder rewrites the object with a fresh ``heartbeat_unix`` every ``HEARTBEAT_S``; a lease without a heartbeat
for ``stale_after_s`` is stale (clocks of the contenders must agree within a few seconds).

Example::

    with exclusive("indexes/.reindex.lock", command="reindex"):
        ...  # the only reindex on this root
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from attnpipe import fs

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
SETTLE_S = 1.0
log = logging.getLogger("attnpipe.lock")


class LockHeld(RuntimeError):
    """Another live job holds the lock; the message names it and says what to do."""


@contextlib.contextmanager
def exclusive(path: str, command: str = "", stale_after_s: float = STALE_AFTER_S) -> Iterator[dict]:
    """Hold the lock at ``path`` for the ``with`` block; yields the owner record written into it.

    Raises:
        LockHeld: a live owner holds it.
    """
    if not fs.is_local(path):
        with _lease(path, command, stale_after_s) as owner:
            yield owner
        return
    path = fs.resolve(path)[1]
    owner = _acquire(path, command, stale_after_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="lock-heartbeat")
    beat.start()
    try:
        yield owner
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            if read_owner(path).get("token") == owner["token"]:
                os.remove(path)


def read_owner(path: str) -> dict:
    """The owner record of a lock file or lease object ({} if unreadable: a half-written lock is stale once old)."""
    try:
        owner = fs.read_json(path)
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner(command: str) -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "token": uuid.uuid4().hex,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "started_unix": now,
        "heartbeat_unix": now,
    }


@contextlib.contextmanager
def _lease(uri: str, command: str, stale_after_s: float) -> Iterator[dict]:
    """The object-store lock (see the module doc)."""
    owner = _owner(command)
    for _ in range(3):
        holder = read_owner(uri) if fs.exists(uri) else None
        if holder is not None:
            age = time.time() - float(holder.get("heartbeat_unix") or 0)
            local = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            if age <= stale_after_s and not (local and not _alive(holder["pid"])):  # a dead owner here: stale now
                raise LockHeld(_held_message(fs.display(uri), holder, stale_after_s))
            log.warning("lock: taking over %s: no heartbeat for %.0f s", fs.display(uri), age)
        fs.write_json(uri, owner)
        time.sleep(SETTLE_S)
        if read_owner(uri).get("token") == owner["token"]:
            break
    else:
        raise LockHeld(f"could not take the lock {fs.display(uri)}: other jobs keep taking it")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            if read_owner(uri).get("token") != owner["token"]:
                return  # taken over (we looked dead): stop renewing
            with contextlib.suppress(OSError):
                fs.write_json(uri, {**owner, "heartbeat_unix": time.time()})

    thread = threading.Thread(target=beat, daemon=True, name="lease-heartbeat")
    thread.start()
    try:
        yield owner
    finally:
        stop.set()
        thread.join()
        if read_owner(uri).get("token") == owner["token"]:
            fs.delete_file(uri)


def _acquire(path: str, command: str, stale_after_s: float) -> dict:
    owner = _owner(command)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_owner(path)
            reason = _stale(path, holder, stale_after_s)
            if reason is None:
                raise LockHeld(_held_message(path, holder, stale_after_s)) from None
            log.warning("lock: taking over %s: %s", path, reason)
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")  # only one contender's rename succeeds
                _remove_stale_copies(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
        return owner
    raise LockHeld(f"could not take the lock {path}: other jobs keep taking it")


def _stale(path: str, holder: dict, stale_after_s: float) -> str | None:
    """Why the lock at ``path`` is stale, or None if its owner may be alive."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it was just released"
    local = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
    if local and not _alive(holder["pid"]):
        return f"its owner pid {holder['pid']} on this host is gone"
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (> {stale_after_s:.0f} s)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_message(path: str, holder: dict, stale_after_s: float) -> str:
    who = f"{holder.get('command') or 'a job'} (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
    return (
        f"another job holds {path}: {who}, started {holder.get('started', '?')}. Wait for it to finish; "
        f"if it is gone, its lock turns stale after {stale_after_s:.0f} s without heartbeat, or remove {path}"
    )


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def _remove_stale_copies(path: str) -> None:
    directory, name = os.path.split(path)
    for other in os.listdir(directory or "."):
        if other.startswith(f"{name}.stale-"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, other))
