"""Faults on the paths a cluster run takes, each followed by the exact-rows check (tests/_rows.py).

- the driver SIGKILLed mid-encode (``attnpipe encode`` with its own local Ray, to ``s3://``), then the same command
  again: it resumes the committed shards and every input row is in the dataset exactly once;
- an encoder actor's process SIGKILLed mid-batch: Ray restarts the actor and retries its batch, no row is lost or
  written twice;
- the S3 server restarted while an encode writes: transient errors are retried with backoff, or the run fails
  cleanly and the rerun resumes; exact rows either way.

A worker node removed mid-run is in tests/test_cluster.py (it needs the three-node cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attnpipe import fs, store
from attnpipe.encode import HOLD_ENV
from tests._ray_head import session_pids
from tests._rows import assert_exact, committed_shards, sample_to
from tests.conftest import FAST, fast_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _published(out: str) -> bool:
    return fs.is_file(fs.join(out, store.MANIFEST))


def _wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _encode_cli(data: str, out: str, *extra: str) -> list[str]:
    sets = [a for kv in (*FAST, "encode.rows_per_file=8") for a in ("--set", kv)]
    return [str(Path(sys.executable).with_name("attnpipe")), "encode", "--input", data, "--out", out, *sets,
            "--json", *extra]  # fmt: skip


def _driver_env() -> dict[str, str]:
    # Its own local Ray (no RAY_ADDRESS), the S3 server's AWS variables (set by the s3_server fixture).
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_driver_sigkill_then_same_command_resumes(s3_server, ray_session, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("fault-driver")
    data, out = f"{bucket}/data", f"{bucket}/emb"
    ids = sample_to(data, n=96, shards=6)
    cmd = _encode_cli(data, out)
    held = {**_driver_env(), HOLD_ENV: "2"}  # the driver stops after 2 shard commits, to be killed there
    with open(tmp_path / "first.log", "wb") as log:
        # A session of its own: the driver, the local Ray it starts and every worker that Ray forks.
        proc = subprocess.Popen(cmd, env=held, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(committed_shards(out)) >= 2 or proc.poll() is not None, 240, "2 shard commit records")
        assert proc.poll() is None, f"the driver exited {proc.returncode}:\n{(tmp_path / 'first.log').read_text()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for pid in session_pids(proc.pid):  # Ray workers run in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert not _published(out), "the killed run published"
    assert len(committed_shards(out)) == 2, committed_shards(out)

    # The same command again, joining the test session's Ray this time (a driver of its own, no Ray start-up)
    joined = {**_driver_env(), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    rerun = subprocess.run(cmd, env=joined, capture_output=True, text=True, timeout=240, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed_shards"] == 2, summary
    assert summary["rows"] == len(ids) and summary["encoded"] < len(ids), summary
    assert_exact(out, ids)


class _Background(threading.Thread):
    """``encode`` in a thread of the test process (on the session's local Ray), so the test can strike mid-run."""

    def __init__(self, *args, **kwargs):
        super().__init__(daemon=True)
        self.args, self.kwargs = args, kwargs
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from attnpipe.encode import encode

        try:
            self.summary = encode(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc


def _descends_from_me(pid: int) -> bool:
    me = os.getpid()
    for _ in range(16):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


def _encoder_pids() -> list[int]:
    """Encoder actors of this session's Ray (the test process's descendants) inside a batch: Ray retitles an actor's
    process ``ray::MapWorker(...EncodeActor...)`` and appends ``.submit`` while it runs one."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if b"EncodeActor" in cmdline and b".submit" in cmdline and _descends_from_me(int(name)):
            found.append(int(name))
    return found


def test_encoder_actor_killed_mid_batch(ray_session, s3_server) -> None:
    bucket = s3_server.make_bucket("fault-actor")
    data, out = f"{bucket}/data", f"{bucket}/emb"
    ids = sample_to(data, n=192, shards=12)
    run = _Background([data], out, fast_config("encode.rows_per_file=8"))
    run.start()
    victims: list[int] = []

    def busy() -> bool:
        victims[:] = _encoder_pids()
        return bool(victims) or not run.is_alive()

    _wait_for(busy, 180, "an encoder actor inside a batch", poll_s=0.1)
    assert victims and run.is_alive(), f"no encoder actor to kill (error: {run.error!r}, pids {victims})"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    published = _published(out)
    run.join(240)
    assert not run.is_alive(), "encode did not finish after the actor was killed"
    assert run.error is None, repr(run.error)
    assert not published, "the run published before the kill: make it longer"
    assert run.summary is not None and run.summary["rows"] == len(ids), run.summary
    assert_exact(out, ids)


def test_s3_server_restart_mid_write(ray_session, s3_server, monkeypatch) -> None:
    bucket = s3_server.make_bucket("fault-s3")
    data, out = f"{bucket}/data", f"{bucket}/emb"
    ids = sample_to(data, n=192, shards=12)
    cfg = fast_config("encode.rows_per_file=8")
    # The driver pauses 5 s after its first commit, so the restart starts before the publish on any machine; the
    # rest of the run (commits, the manifest, writes still in flight) meets the server down or coming back.
    monkeypatch.setenv(HOLD_ENV, "1:5")
    run = _Background([data], out, cfg)
    run.start()
    _wait_for(lambda: committed_shards(out) or not run.is_alive(), 180, "a shard commit record")
    assert run.is_alive(), f"encode ended before the restart (error: {run.error!r})"
    s3_server.restart()  # a few seconds without S3: reads, part writes and commit records fail meanwhile
    run.join(240)
    assert not run.is_alive(), "encode did not finish after the S3 restart"
    if run.error is not None:
        # Failed cleanly: nothing published, and the same call resumes the committed shards.
        assert not _published(out), repr(run.error)
        from attnpipe.encode import encode

        monkeypatch.delenv(HOLD_ENV)
        summary = encode([data], out, cfg)
        assert summary["resumed_shards"] >= 1, summary
        print(f"S3 restart: the run failed ({type(run.error).__name__}); the rerun resumed {summary['resumed_shards']}")
    else:
        summary = run.summary
        print("S3 restart: the run finished (transient errors retried)")
    assert summary is not None and summary["rows"] == len(ids), summary
    assert_exact(out, ids)


def test_s3_lease_of_a_dead_owner_on_this_host_is_taken_over(s3_server) -> None:
    # What lets the rerun above start at once: the lease of a SIGKILLed driver (fresh heartbeat, dead pid on this
    # host) is stale, as a lock file's is; a fresh lease of another host is still refused.
    import socket

    from attnpipe.lock import LockHeld, exclusive, read_owner

    lock = f"{s3_server.make_bucket('fault-lease')}/emb/.reindex.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    fs.write_json(lock, {"host": socket.gethostname(), "pid": dead.pid, "token": "t", "heartbeat_unix": now})
    with exclusive(lock, command="rerun") as owner:
        assert read_owner(lock)["token"] == owner["token"]
    assert not fs.exists(lock)
    fs.write_json(lock, {"host": "elsewhere", "pid": 1, "token": "t", "heartbeat_unix": now})
    with pytest.raises(LockHeld, match="pid 1 on elsewhere"), exclusive(lock):
        pass
