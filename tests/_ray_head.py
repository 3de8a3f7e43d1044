"""A private, token-authenticated Ray head for tests that drive the real ``ray`` CLI (``ray job submit``).

``ray_head()`` runs ``ray start --head`` (dashboard on loopback) with free ports, its own ``--temp-dir`` and token,
waits until the dashboard's job API answers, and on exit stops exactly the processes that head started. It never
runs ``ray stop`` (which kills every Ray process on the machine, including the ``ray.init()`` instances other tests
hold) and never reads or writes ``~/.ray/auth_token`` or ``/tmp/ray/ray_current_cluster``.

    with ray_head() as head:
        subprocess.run([ray_exe(), "job", "submit", "--address", head.address, "--", "python", "-c", "..."],
                       env=head.env, check=True)

``ray_cluster(workers=2)`` adds worker nodes: each a ``ray start --address=<gcs> --node-ip-address=127.0.0.1`` in a
session and temp dir of its own, with the head's token and marker, so a test can remove one node mid-run
(``kill_node``: SIGKILL of every process of that node, raylet first, as when a machine disappears) while the head
and the other workers go on.

    with ray_cluster(workers=2) as cluster:
        ...  # ray job submit --address cluster.head.address ...
        kill_node(cluster.workers[0])

Authentication (Ray 2.60, read from ``ray/_private/authentication`` and ``ray/dashboard/modules/dashboard_sdk.py``):
the head enforces tokens when ``RAY_AUTH_MODE=token`` is in its environment; every node and client then reads the
token from ``RAY_AUTH_TOKEN`` (the value), else ``RAY_AUTH_TOKEN_PATH`` (a file), else ``~/.ray/auth_token``. A job
client only sends ``Authorization: Bearer <token>`` when ``RAY_AUTH_MODE=token`` is set in *its* environment too;
a token file alone is not enough for ``ray job``. Here both sides get ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH=<temp dir>/auth_token``, a fresh random token per head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Every process the head starts inherits this variable (raylet → workers → job supervisor → job driver); teardown
# finds the head's processes by it or by the session `ray start` ran in (see _head_pids). Process groups are not
# enough: Ray puts each worker in its own group and each job driver in its own session.
MARKER_ENV = "ATTNPIPE_TEST_RAY_HEAD"

# Variables that would point a client or the head somewhere else, or override our token (RAY_AUTH_TOKEN beats
# RAY_AUTH_TOKEN_PATH), or make `--working-dir` upload gitignored files (the 8 GB .venv).
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")


def ray_exe() -> str:
    """The ``ray`` CLI of the interpreter running the tests (the venv's), not whatever ``ray`` is on PATH."""
    return str(Path(sys.executable).with_name("ray"))


@dataclasses.dataclass(frozen=True)
class RayHead:
    address: str  # http://127.0.0.1:<dashboard port>, for `ray job ... --address`
    env: dict[str, str]  # environment for `ray job` clients: auth variables, venv first on PATH
    gcs_address: str  # <node ip>:<gcs port>, what drivers get as RAY_ADDRESS
    temp_dir: Path
    token: str
    marker: str = ""  # MARKER_ENV value every process of this head (and of its worker nodes) carries
    session_id: int | None = None  # the session `ray start --head` ran in
    node_env: dict[str, str] = dataclasses.field(default_factory=dict)  # environment for `ray start` on more nodes

    @property
    def session_dir(self) -> Path:
        return (self.temp_dir / "session_latest").resolve()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _api_ready(address: str, token: str) -> bool:
    for path in ("/api/version", "/api/jobs/"):
        req = urllib.request.Request(address + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
    return True


def _head_pids(marker: str, session_id: int | None) -> list[int]:
    # /proc rather than psutil: the venv has psutil only as Ray's vendored copy. Two nets, because each misses some:
    # processes that retitle themselves (ray::IDLE workers, dashboard modules) overwrite their /proc environ, and job
    # drivers run in a session of their own.
    entry = f"{MARKER_ENV}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            in_session = session_id is not None and _stat_fields(int(name))[3] == str(session_id)
            if in_session or entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                found.append(int(name))
        except (OSError, ValueError, IndexError):  # gone, or another user's process
            continue
    return found


def _stat_fields(pid: int) -> list[str]:
    # /proc/<pid>/stat after the parenthesised command name: state, ppid, pgrp, session, ...
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != "Z"  # a zombie has exited; reaping it is its parent's (or init's) business
    except (OSError, IndexError):
        return False


def _kill_order(pid: int) -> int:
    # As `ray stop` does: raylet first (so its agents do not report failures), gcs_server last.
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return 1
    return 0 if name == "raylet" else 2 if name == "gcs_server" else 1


def _signal_and_wait(pids: list[int], sig: int, timeout_s: float) -> list[int]:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def stop_head_processes(marker: str, session_id: int | None = None, grace_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after the grace period, every process of one head; returns how many.

    A process belongs to the head when it carries ``MARKER_ENV=marker`` in its environment or runs in ``session_id``
    (the session ``ray start`` was started in).
    """
    stopped: set[int] = set()
    for _ in range(3):  # a dying raylet may still have forked a worker; sweep until nothing is left
        pids = [p for p in _head_pids(marker, session_id) if _alive(p)]
        if not pids:
            break
        stopped.update(pids)
        for group in (0, 1, 2):
            members = [p for p in pids if _kill_order(p) == group]
            alive = _signal_and_wait(members, signal.SIGTERM, grace_s / 3)
            _signal_and_wait(alive, signal.SIGKILL, 5.0)
    return len(stopped)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, start_timeout_s: float = 120.0) -> Iterator[RayHead]:
    """Start a private Ray head with the dashboard (job server) on loopback; stop exactly its processes on exit.

    Raises:
        RuntimeError: ``ray start`` failed or the job API did not answer within ``start_timeout_s``; the message
            carries the ``ray start`` output.
    """
    # Short path under /tmp: Ray puts Unix sockets in <temp dir>/session_*/sockets/, limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="attnpipe-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    marker = secrets.token_hex(8)
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)

    # Every listening port is chosen here: Ray's defaults (10001 client server, 52365 agent, ...) are fixed and
    # would collide with other Ray instances on the machine.
    (gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr) = _free_ports(9)

    base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    # Job entrypoints are shell commands: `python` must be the venv's even when the venv is not activated.
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    head_env = {**base, **auth, MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"http://127.0.0.1:{dash}"
    # RAY_API_SERVER_ADDRESS too: a `ray job submit` that forgets --address must not start a fresh local cluster.
    client_env = {**base, **auth, "RAY_API_SERVER_ADDRESS": address}

    cmd = [
        ray_exe(), "start", "--head",
        # Ray rewrites a loopback --node-ip-address to the machine's routable IP (services.resolve_ip_for_localhost);
        # what we talk to, the dashboard, is bound to 127.0.0.1 by --dashboard-host.
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr),
        "--num-cpus", str(num_cpus),
        "--num-gpus", "0",
        "--temp-dir", str(temp_dir),  # also where `ray start` writes ray_current_cluster, not /tmp/ray
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    session_id = None
    try:
        with open(log_path, "wb") as log:
            # Output to a file, not a pipe: a daemon that kept the pipe open would hang the read. A new session, so
            # that every daemon `ray start` leaves behind (and every worker the raylet forks) is findable by its sid.
            starter = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            session_id = starter.pid
            try:
                rc = starter.wait(timeout=start_timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            raise RuntimeError(f"ray start {'timed out' if rc is None else f'exited {rc}'}:\n{_read(log_path)}")
        gcs_address = (temp_dir / "ray_current_cluster").read_text().strip()
        deadline = time.monotonic() + start_timeout_s
        while not _api_ready(address, token):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job API at {address} not ready after {start_timeout_s:.0f}s:\n{_read(log_path)}")
            time.sleep(0.5)
        yield RayHead(
            address=address,
            env=client_env,
            gcs_address=gcs_address,
            temp_dir=temp_dir,
            token=token,
            marker=marker,
            session_id=session_id,
            node_env=head_env,
        )
    finally:
        stop_head_processes(marker, session_id)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class RayWorker:
    """One worker node: ``ray start --address`` in a session (``session_id``) and temp dir of its own."""

    name: str
    session_id: int
    temp_dir: Path

    def pids(self) -> list[int]:
        """Live processes of this node: its raylet, agents and every worker the raylet forked."""
        return [p for p in session_pids(self.session_id) if _alive(p)]


@dataclasses.dataclass(frozen=True)
class RayCluster:
    head: RayHead
    workers: list[RayWorker]


def session_pids(session_id: int) -> list[int]:
    """Every process in a session (what a ``start_new_session=True`` child and all it spawned run in)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _stat_fields(int(name))[3] == str(session_id):
                    found.append(int(name))
            except (OSError, IndexError):
                continue
    return found


def start_worker(head: RayHead, name: str, num_cpus: int = 1, start_timeout_s: float = 120.0) -> RayWorker:
    """Join one worker node to ``head`` (loopback, free ports, the head's token and marker); returns once it runs.

    Raises:
        RuntimeError: ``ray start`` failed; the message carries its output.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix=f"attnpipe-{name}-", dir="/tmp" if os.path.isdir("/tmp") else None))
    # Every fixed default port (52365 agent, ...) would collide with the head's on the same machine: choose them all.
    node_mgr, obj_mgr, metrics, agent_http, agent_grpc, runtime_env = _free_ports(6)
    cmd = [
        ray_exe(), "start",
        "--address", head.gcs_address,
        "--node-ip-address", "127.0.0.1",
        "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr),
        "--metrics-export-port", str(metrics),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env),
        "--num-cpus", str(num_cpus),
        "--num-gpus", "0",
        "--object-store-memory", str(300 * 2**20),  # small: several nodes share this machine's /dev/shm
        "--resources", json.dumps({name: 1}),  # names the node in the state API (resources_total)
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        starter = subprocess.Popen(cmd, env=head.node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = starter.wait(timeout=start_timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    worker = RayWorker(name=name, session_id=starter.pid, temp_dir=temp_dir)
    if rc != 0:
        kill_node(worker)
        raise RuntimeError(f"ray start (worker {name}) {'timed out' if rc is None else f'exited {rc}'}:\n"
                           f"{_read(log_path)}")  # fmt: skip
    return worker


def kill_node(worker: RayWorker) -> int:
    """SIGKILL every process of one worker node, raylet first: the node is gone, as if its machine died.

    Returns how many processes were killed. The head notices through missed health checks (seconds), and Ray
    reschedules the node's tasks and restarts its actors elsewhere.
    """
    killed: set[int] = set()
    for _ in range(3):  # the raylet may have forked a worker while dying
        pids = sorted(worker.pids(), key=_kill_order)
        if not pids:
            break
        killed.update(pids)
        _signal_and_wait(pids, signal.SIGKILL, 5.0)
    return len(killed)


def alive_nodes(head: RayHead) -> list[dict]:
    """The cluster's ALIVE nodes from the head's state API (``/api/v0/nodes``)."""
    req = urllib.request.Request(head.address + "/api/v0/nodes?limit=100", headers=head.auth_headers())
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.loads(resp.read())
    return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]


@contextlib.contextmanager
def ray_cluster(
    workers: int = 2, head_cpus: int = 1, worker_cpus: int = 1, start_timeout_s: float = 180.0
) -> Iterator[RayCluster]:
    """A head (``ray_head``) plus ``workers`` worker nodes on loopback; every process stopped on exit.

    Raises:
        RuntimeError: a node did not start, or the head did not see all nodes alive within ``start_timeout_s``.
    """
    with ray_head(num_cpus=head_cpus, start_timeout_s=start_timeout_s) as head:
        nodes: list[RayWorker] = []
        try:
            for i in range(workers):
                nodes.append(start_worker(head, f"worker{i + 1}", worker_cpus, start_timeout_s))
            deadline = time.monotonic() + start_timeout_s
            while len(alive_nodes(head)) < workers + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(alive_nodes(head))} of {workers + 1} nodes alive")
                time.sleep(0.5)
            yield RayCluster(head=head, workers=nodes)
        finally:
            for node in nodes:
                kill_node(node)
                shutil.rmtree(node.temp_dir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"
