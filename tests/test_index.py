"""Distributed FAISS build on a real local Ray: recall vs exact, worker-count invariance, layout, damage, search."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attnpipe import store
from attnpipe.cli import main
from attnpipe.index import faiss_index as fx
from attnpipe.index.build import build_index
from attnpipe.index.layout import IndexLayoutError, current_version, versions
from attnpipe.index.search import SearchIndex

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    X = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    X = clustered(10_000 + 1_000, 64, 50)
    X, held_out = X[:10_000], X[10_000:]  # queries from the same distribution, never indexed
    ids = [f"syn/{i:06d}" for i in range(len(X))]
    path = str(tmp_path_factory.mktemp("vec") / "emb")
    store.write_vectors(path, ids, X, num_shards=8)
    return path, ids, X, held_out


@pytest.fixture(scope="module")
def ivf_two_workers(ray_session, vectors, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("idx") / "root")
    manifest = build_index(vectors[0], root, factory="IVF64,Flat", lsh="simhash", workers=2)
    return root, manifest


def _exact(X, Q, k=10):
    return np.argsort(-(Q @ X.T), axis=1)[:, :k]


def test_ivf_recall_at_stored_nprobe(ivf_two_workers, vectors):
    root, manifest = ivf_two_workers
    _, ids, X, held_out = vectors
    assert manifest["count"] == 10_000 and manifest["dim"] == 64 and manifest["workers"] == 2
    assert manifest["faiss"]["factory"] == "IVF64,Flat" and manifest["faiss"]["files"] == ["faiss.index"]
    index = SearchIndex.load(root)
    assert index.indexes[0].ntotal == 10_000
    fids, _ = index.id_map  # (part number << 32) | row, part numbers from the embeddings manifest
    numbers = set(store.read_manifest(vectors[0])["part_numbers"].values())
    assert set(np.unique(fids >> 32).tolist()) == numbers
    Q = held_out[:500]  # fresh queries, not the tuning sample
    _, got = index.search(Q, 10)
    exact = [[ids[j] for j in row] for row in _exact(X, Q)]
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.95, (recall, manifest["faiss"])
    assert manifest["faiss"]["recall@10"] >= 0.95
    nprobe = manifest["faiss"]["nprobe"]
    sweep = manifest["faiss"]["tuning"]
    assert sweep[-1]["nprobe"] == nprobe and all(s["recall@10"] < 0.95 for s in sweep[:-1])


def test_one_worker_build_agrees_with_two(ivf_two_workers, vectors, tmp_path):
    root2, _ = ivf_two_workers
    root1 = str(tmp_path / "one")
    build_index(vectors[0], root1, factory="IVF64,Flat", lsh="none", workers=1)
    Q = vectors[3][500:]
    a, b = SearchIndex.load(root1), SearchIndex.load(root2)
    b_nprobe = b.manifest["faiss"]["nprobe"]
    fx.set_search_param(a.indexes, "nprobe", b_nprobe)
    _, ra = a.search(Q, 10)
    _, rb = b.search(Q, 10)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ra, rb)])
    assert overlap >= 0.99, overlap


def test_search_by_id_returns_itself_first(ivf_two_workers, vectors, capsys):
    root, _ = ivf_two_workers
    assert main(["search", "--index", root, "--id", "syn/000123", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == "syn/000123" and abs(hits[0]["score"] - 1) < 1e-4 and len(hits) == 5
    assert main(["search", "--index", root, "--id", "nope/1"]) == 2


def test_flat_and_hnsw_builds(ray_session, vectors, tmp_path):
    path = vectors[0]
    flat = build_index(path, str(tmp_path / "flat"), factory="Flat", lsh="none", workers=3)
    assert flat["faiss"]["kind"] == "flat" and flat["faiss"]["files"] == ["faiss.index"]
    assert flat["faiss"]["recall@10"] == 1.0
    hnsw = build_index(path, str(tmp_path / "hnsw"), factory="HNSW16", lsh="none", workers=2, target_recall=0.9)
    assert hnsw["faiss"]["kind"] == "graph" and hnsw["faiss"]["files"] == ["faiss-0.index", "faiss-1.index"]
    index = SearchIndex.load(str(tmp_path / "hnsw"))
    assert sum(i.ntotal for i in index.indexes) == 10_000
    assert index.search_id("syn/000007", 3)[0][0] == "syn/000007"
    assert hnsw["faiss"]["recall@10"] >= 0.9 and "efSearch" in hnsw["faiss"]


def test_versions_current_and_failed_build(ray_session, vectors, tmp_path):
    root = str(tmp_path / "root")
    build_index(vectors[0], root, factory="Flat", lsh="none", workers=1)
    with pytest.raises(RuntimeError, match="injected"):
        build_index(vectors[0], root, factory="Flat", lsh="none", workers=1, _crash_before_publish=True)
    assert current_version(root) == "v1" and versions(root) == ["v1"]
    assert not [d for d in os.listdir(root) if "staging" in d]
    build_index(vectors[0], root, factory="Flat", lsh="none", workers=1)
    assert current_version(root) == "v2" and versions(root) == ["v1", "v2"]


def test_damaged_index_file_is_named(ray_session, vectors, tmp_path):
    root = str(tmp_path / "root")
    build_index(vectors[0], root, factory="Flat", lsh="none", workers=1)
    path = os.path.join(root, "v1", "faiss.index")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(IndexLayoutError, match=r"v1/faiss.index is damaged"):
        SearchIndex.load(root)
    assert main(["search", "--index", root, "--id", "syn/000001"]) == 2


def test_bad_arguments_fail_fast(ray_session, vectors, tmp_path):
    with pytest.raises(ValueError, match="not a valid faiss index_factory"):
        build_index(vectors[0], str(tmp_path / "r"), factory="IVFxx,Nope", lsh="none")
    with pytest.raises(ValueError, match="allowed"):
        build_index(vectors[0], str(tmp_path / "r"), lsh="bloom")
    with pytest.raises(FileNotFoundError, match="not an attnpipe embeddings dataset"):
        build_index(str(tmp_path), str(tmp_path / "r"))
    with pytest.raises(IndexLayoutError, match="no CURRENT"):
        SearchIndex.load(str(tmp_path))


def test_default_factory_rule():
    assert fx.default_factory(10_000, 512) == "Flat"
    assert fx.default_factory(1_000_000, 512) == "IVF4096,Flat"
    assert fx.default_factory(10_000_000, 512).startswith("IVF16384,PQ")


@pytest.mark.slow
def test_sigkill_mid_build_keeps_current(ray_session, vectors, tmp_path):
    """kill -9 of a build (its whole process group, its own Ray included) halfway: CURRENT stays whole."""
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "root")
    build_index(vectors[0], root, factory="Flat", lsh="none", workers=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "attnpipe.cli",
        "index",
        "--embeddings",
        vectors[0],
        "--out",
        root,
        "--faiss",
        "IVF64,Flat",
        "--lsh",
        "none",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "index: adding" in line:  # trained, Ray tasks in flight: halfway
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert any("index: adding" in s for s in seen), "".join(seen)
    assert current_version(root) == "v1"
    index = SearchIndex.load(root)
    assert index.search_id("syn/000042", 1)[0][0] == "syn/000042"
    build_index(vectors[0], root, factory="IVF64,Flat", lsh="none", workers=2)
    assert current_version(root) == "v2" and not [d for d in os.listdir(root) if "staging" in d]
    assert SearchIndex.load(root).manifest["faiss"]["factory"] == "IVF64,Flat"


def test_damaged_part_fails_the_build_by_name_before_publishing(tmp_path):
    """The training sample is read without sha256 (size only); the add pass verifies every part, so a part damaged
    inside its vectors still stops the build, named, and no version is published."""
    path = str(tmp_path / "emb")
    store.write_vectors(path, [f"s/{i}" for i in range(2_000)], clustered(2_000, 16, 8), num_shards=4)
    victim = store.open_dataset(path).parts()[2]
    raw = bytearray((tmp_path / "emb" / victim.file).read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one bit inside the plain float column: Parquet still parses it
    (tmp_path / "emb" / victim.file).write_bytes(bytes(raw))
    root = str(tmp_path / "index")
    with pytest.raises(store.DamagedData, match=victim.file):
        build_index(path, root, factory="IVF8,Flat", workers=1, lsh="none")
    assert not (tmp_path / "index" / "CURRENT").exists() and versions(root) == []
