"""A real three-node Ray cluster on loopback with object storage: the path a user takes to a cluster.

Head + two worker nodes (``ray start``, token auth, tests/_ray_head.py) and a real S3 server (SeaweedFS, the
``s3_server`` fixture). The encode job goes in through ``ray job submit --working-dir . --runtime-env-json
'{"env_vars": {AWS_...}}'`` as README "Running on a cluster" documents, reads and writes only ``s3://`` URIs, and
runs its two encoder actors on two nodes. The last test removes a worker node mid-run (every process of it
SIGKILLed) and the job still finishes on the others with every row exactly once.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attnpipe import fs, store
from attnpipe.encode import HOLD_ENV
from tests._ray_head import RayCluster, RayWorker, alive_nodes, kill_node, ray_cluster, ray_exe
from tests._rows import assert_exact, committed_shards, sample_to

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
FAST = ("model.backbone=resnet18", "data.image_size=64", "encode.batch_size=16", "encode.decode_batch_size=16")


@pytest.fixture(scope="module")
def cluster(s3_server) -> Iterator[RayCluster]:
    # No CPU on the head, as on a real cluster whose head only runs drivers: every task and encoder actor lands on a
    # worker node (so removing one always takes work with it). 2 CPUs per worker: an encoder (1 CPU) and write tasks
    # fit beside each other, and an encoder restarted after a node loss still finds a CPU.
    with ray_cluster(workers=2, head_cpus=0, worker_cpus=2) as c:
        yield c


class Job:
    """A ``ray job submit`` running in the background; its output (CLI messages + the job's log) goes to a file."""

    def __init__(self, cluster: RayCluster, entrypoint: list[str], env_vars: dict[str, str], log: Path):
        self.log = open(log, "wb")  # noqa: SIM115 - closed by wait()
        self.args = [
            ray_exe(), "job", "submit", "--address", cluster.head.address, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint,
        ]  # fmt: skip
        self.proc = subprocess.Popen(self.args, env=cluster.head.env, stdout=self.log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the client only; the cluster's teardown stops the job
            self.proc.wait()
        self.log.close()
        return self.output()

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def explain(self) -> str:
        return f"$ {shlex.join(self.args)}\nexit {self.proc.returncode}\n{self.output()}"

    def summary(self) -> dict:
        line = next((s for s in reversed(self.output().splitlines()) if s.startswith('{"out"')), None)
        assert line is not None, self.explain()
        return json.loads(line)


def _encode_job(
    cluster: RayCluster, s3_server, log: Path, data: str, out: str, *overrides: str, env: dict | None = None
) -> Job:
    sets = [a for kv in (*FAST, *overrides) for a in ("--set", kv)]
    entrypoint = ["python", "jobs/encode.py", "--input", data, "--out", out, *sets]
    return Job(cluster, entrypoint, {**s3_server.env(), **(env or {})}, log)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def encoder_nodes(cluster: RayCluster, busy: bool = False) -> set[str]:
    """Names of the nodes ("head", "worker1", ...) running an encoder actor process right now.

    Ray retitles an actor's worker process after its class (``ray::MapWorker(MapBatches(EncodeActor))``), with
    ``.submit`` appended while it runs a batch (``busy``); every process a node's raylet forks stays in the session
    its ``ray start`` ran in.
    """
    sessions = {cluster.head.session_id: "head", **{w.session_id: w.name for w in cluster.workers}}
    found = set()
    for name in os.listdir("/proc"):
        cmdline = _cmdline(int(name)) if name.isdigit() else ""
        if "EncodeActor" in cmdline and (not busy or ".submit" in cmdline):
            node = sessions.get(_session_of(int(name)))
            if node is not None:
                found.add(node)
    return found


def _assert_no_local_writes(cluster: RayCluster) -> None:
    """Nothing meant for S3 landed on a local disk: no ``s3:`` directory (what a URI used as a local path makes)
    in the repository, the cwd or a node's temp dir, and no part or manifest in any node's temp dir (where the
    job's working dir is unpacked and its tasks run)."""
    for d in {REPO, Path.cwd()}:
        assert not [n for n in os.listdir(d) if n.startswith("s3:")], os.listdir(d)
    for temp in [cluster.head.temp_dir, *(w.temp_dir for w in cluster.workers)]:
        for base, dirs, files in os.walk(temp):
            assert not [d for d in dirs if d.startswith("s3:")], (base, dirs)
            written = [f for f in files if f.startswith("part-") and ".parquet" in f or f == "_manifest.json"]
            assert not written, (base, written)


def test_encode_job_on_three_nodes_to_s3(cluster: RayCluster, s3_server, tmp_path: Path) -> None:
    assert len(alive_nodes(cluster.head)) == 3
    bucket = s3_server.make_bucket("cluster-encode")
    ids = sample_to(f"{bucket}/data", n=64, shards=4)
    job = _encode_job(
        cluster,
        s3_server,
        tmp_path / "job.log",
        f"{bucket}/data",
        f"{bucket}/emb",
        "encode.num_encoders=2",
        "encode.rows_per_file=16",
    )
    seen: set[str] = set()
    while job.running():
        seen |= encoder_nodes(cluster)
        time.sleep(0.5)
    job.wait()
    assert job.proc.returncode == 0 and "succeeded" in job.output(), job.explain()
    summary = job.summary()
    assert summary["rows"] == 64 and summary["ok"] == 64 and summary["shards"] == 4, summary
    assert_exact(f"{bucket}/emb", ids)
    # Two encoder actors, on two different nodes of the three.
    assert len(seen) >= 2, f"encoder actors ran on {seen} only\n{job.explain()}"
    _assert_no_local_writes(cluster)


def test_worker_node_removed_mid_run(cluster: RayCluster, s3_server, tmp_path: Path) -> None:
    # Last in the module: the cluster keeps one worker node fewer afterwards.
    bucket = s3_server.make_bucket("cluster-node-loss")
    data, out = f"{bucket}/data", f"{bucket}/emb"
    ids = sample_to(data, n=192, shards=12)
    # The driver pauses 10 s after its first shard commit, so the kill below lands before the publish everywhere.
    hold = {HOLD_ENV: "1:10"}
    job = _encode_job(
        cluster, s3_server, tmp_path / "job.log", data, out, "encode.num_encoders=2", "encode.rows_per_file=8", env=hold
    )
    victim: RayWorker | None = None
    while job.running() and victim is None:
        # Mid-run: an encoder on a worker node is inside a batch, or (batches are short) it exists and the first
        # shard is committed, so the node holds encoded blocks the writers still need.
        busy = encoder_nodes(cluster, busy=True)
        if not busy and committed_shards(out):
            busy = encoder_nodes(cluster)
        victim = next((w for w in cluster.workers if w.name in busy), None)
        time.sleep(0.05)
    assert victim is not None, f"the job ended before an encoder ran on a worker node\n{job.explain()}"
    published = fs.is_file(fs.join(out, store.MANIFEST))
    assert kill_node(victim) > 0
    assert not published, "the job had already published when the node was killed"
    job.wait()
    assert job.proc.returncode == 0 and "succeeded" in job.output(), job.explain()
    assert len(alive_nodes(cluster.head)) == 2
    assert_exact(out, ids)
