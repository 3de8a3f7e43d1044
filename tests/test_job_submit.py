"""``ray job submit`` against a real, token-authenticated ``ray start --head``: the path users take to a cluster.

One private head per module (tests/_ray_head.py); the tests run in file order, cheapest first, so a broken mechanism
fails on the trivial job before the encode job spends a minute.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._ray_head import RayHead, ray_exe, ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
SUBMIT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as h:
        yield h


def _run(args: list[str], env: dict[str, str], timeout: float = SUBMIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        # Keep what the job logged so far for the assertion message; the head's teardown kills the job.
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        return subprocess.CompletedProcess(args, -1, out + f"\n<timed out after {timeout:.0f}s>")


def _submit(head: RayHead, *entrypoint: str, working_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``ray job submit`` and wait; stdout holds the CLI's messages and the job's whole log."""
    args = [ray_exe(), "job", "submit", "--address", head.address]
    if working_dir is not None:
        args += ["--working-dir", str(working_dir)]
    return _run([*args, "--", *entrypoint], head.env)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"$ {shlex.join(proc.args)}\nexit {proc.returncode}\n{proc.stdout}"


def _assert_succeeded(proc: subprocess.CompletedProcess) -> None:
    # The CLI exits 1 for FAILED but 0 for STOPPED: check the final status line as well.
    assert proc.returncode == 0, _explain(proc)
    assert "succeeded" in proc.stdout, _explain(proc)


def test_trivial_job(head: RayHead) -> None:
    proc = _submit(head, "python", "-c", "import ray; ray.init(); print(ray.cluster_resources())")
    _assert_succeeded(proc)
    assert "'CPU': 2.0" in proc.stdout, _explain(proc)
    # The head registered itself in its own temp dir, never in the machine-wide /tmp/ray/ray_current_cluster
    # that a bare ray.init() elsewhere would then try to join.
    assert (head.temp_dir / "ray_current_cluster").read_text().strip() == head.gcs_address
    default_file = Path("/tmp/ray/ray_current_cluster")
    assert not default_file.exists() or default_file.read_text().strip() != head.gcs_address


def test_client_without_token_is_rejected(head: RayHead) -> None:
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH_")}
    env["RAY_AUTH_MODE"] = "disabled"  # explicit: a client sends its token only when RAY_AUTH_MODE=token
    proc = _run([ray_exe(), "job", "list", "--address", head.address], env, timeout=60)
    assert proc.returncode != 0, _explain(proc)
    assert "Unauthorized" in proc.stdout, _explain(proc)


def test_working_dir_upload_leaves_out_gitignored_files(head: RayHead) -> None:
    # Ray's packaging honours the .gitignore at the top of --working-dir (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1,
    # which _ray_head scrubs): without that, the 8 GB .venv would be zipped and hit the 512 MiB upload limit.
    script = "import json, os; print('LISTING=' + json.dumps(sorted(os.listdir('.'))))"
    proc = _submit(head, "python", "-c", script, working_dir=REPO)
    _assert_succeeded(proc)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTING=")), None)
    assert line is not None, _explain(proc)
    listing = json.loads(line.removeprefix("LISTING="))
    assert "jobs" in listing and "attnpipe" in listing, listing
    assert ".venv" not in listing, listing


def test_pipeline_job_then_reindex_job(head: RayHead, tmp_path: Path) -> None:
    """``jobs/pipeline.py`` (encode -> index -> eval in one job) and then ``jobs/reindex.py`` on the same head, over
    what the first job wrote. The other thin wrappers in jobs/ are covered by tests/test_cli.py (``--help`` of each)
    and jobs/encode.py by ``ray job submit`` in tests/test_cluster.py."""
    from attnpipe.data.sample import make_sample
    from attnpipe.index.layout import current_version
    from attnpipe.index.search import SearchIndex

    data, work = tmp_path / "data", tmp_path / "work"
    make_sample(str(data), fmt="tar", n=40, num_shards=2, image_size=64)
    sets = ["--set", "model.backbone=resnet18", "--set", "data.image_size=64"]
    proc = _submit(
        head,
        "python", "jobs/pipeline.py",
        "--input", str(data),
        "--workdir", str(work),
        "--no-train",
        *sets,
        "--set", "encode.batch_size=16",
        working_dir=REPO,
    )  # fmt: skip
    _assert_succeeded(proc)
    line = next((s for s in reversed(proc.stdout.splitlines()) if s.startswith('{"embeddings"')), None)
    assert line is not None, _explain(proc)
    result = json.loads(line)  # the job's --json summary ends its log
    assert (result["embeddings"]["rows"], result["embeddings"]["ok"]) == (40, 40), result
    assert (result["index"]["version"], result["index"]["count"]) == ("v1", 40), result
    assert {"exact", "faiss", "lsh"} <= set(result["eval"]), result

    emb, root, report = work / "embeddings", work / "index", work / "eval"
    assert (emb / "_manifest.json").is_file(), _explain(proc)

    import pyarrow.dataset as pads

    assert pads.dataset(str(emb), format="parquet").count_rows() == 40, _explain(proc)
    assert current_version(str(root)) == "v1", _explain(proc)
    index = SearchIndex.load(str(root))
    assert index.count == 40 and "simhash" in index.manifest["lsh"] and "minhash" in index.manifest["lsh"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["meta"]["queries"] == 40 and (report / "report.html").is_file(), _explain(proc)

    # Scheduled re-indexing as a second job: a shard disappeared, so it re-encodes nothing and updates the index.
    (data / "shard-00001.tar").unlink()
    proc = _submit(
        head,
        "python", "jobs/reindex.py",
        "--input", str(data),
        "--embeddings", str(emb),
        "--index", str(root),
        "--lsh", "both",
        *sets,
        working_dir=REPO,
    )  # fmt: skip
    _assert_succeeded(proc)
    line = next(s for s in reversed(proc.stdout.splitlines()) if s.startswith('{"added"'))
    summary = json.loads(line)
    assert summary["removed"] == ["shard-00001"] and summary["encoded_images"] == 0, _explain(proc)
    assert summary["version"] == "v2" and summary["vectors"] == 20 and summary["index_update"] == "incremental"
    assert SearchIndex.load(str(root)).count == 20
