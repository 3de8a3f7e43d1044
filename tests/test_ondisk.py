"""On-disk IVF lists and the memory-budget planner: same answers as in memory, versions that move, factory choice."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from attnpipe import store
from attnpipe.index import faiss_index as fx
from attnpipe.index.build import build_index
from attnpipe.index.config import IndexConfig, parse_bytes, plan
from attnpipe.index.layout import load_manifest
from tests.test_index import clustered


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    X = clustered(6_000, 32, 40, seed=3)
    path = str(tmp_path_factory.mktemp("od") / "emb")
    store.write_vectors(path, [f"s/{i:05d}" for i in range(len(X))], X, num_shards=5)
    return path, X


def test_ondisk_merge_answers_exactly_like_in_memory_and_moves(emb, tmp_path):
    path, X = emb
    cfg = IndexConfig(factory="IVF32,Flat", lsh="none", workers=1, memory_budget=parse_bytes("64KB"))
    mem = build_index(path, str(tmp_path / "mem"), cfg, ondisk=False)
    disk = build_index(path, str(tmp_path / "disk"), cfg, ondisk=True)
    assert disk["faiss"]["ivfdata"] == "faiss.ivfdata" and disk["memory"]["ondisk"] and not mem["memory"]["ondisk"]
    assert "faiss.ivfdata" in disk["files"] and not [f for f in disk["files"] if "shard" in f]
    assert disk["memory"]["estimated_bytes"] > 0 and disk["memory"]["build_peak_rss_bytes"] > 0
    shutil.copytree(tmp_path / "disk", tmp_path / "moved")  # another place: the stored .ivfdata path is stale
    shutil.rmtree(tmp_path / "disk")
    a = fx.load_version(load_manifest(str(tmp_path / "mem")))
    b = fx.load_version(load_manifest(str(tmp_path / "moved")))
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(b[0]).invlists), faiss.OnDiskInvertedLists)
    Q = clustered(200, 32, 40, seed=4)
    for nprobe in (1, 4, 32):
        fx.set_search_param(a, "nprobe", nprobe)
        fx.set_search_param(b, "nprobe", nprobe)
        Da, Ia = fx.search(a, Q, 10)
        Db, Ib = fx.search(b, Q, 10)
        np.testing.assert_array_equal(Ia, Ib)
        np.testing.assert_array_equal(Da, Db)
    assert a[0].ntotal == b[0].ntotal == len(X)


def test_budget_planner_picks_by_size():
    small = plan(10_000, 128, IndexConfig())
    assert small["factory"] == "Flat" and not small["ondisk"]
    big = IndexConfig(memory_budget=parse_bytes("8GB"))
    assert plan(1_000_000, 128, big)["factory"].endswith(",Flat")  # 0.5 GB of vectors: uncompressed fits
    pq = plan(100_000_000, 128, big)  # 51 GB of vectors: 32-byte codes fit in 6.4 GB
    assert "PQ" in pq["factory"] and not pq["ondisk"] and pq["estimated_bytes"] <= 0.8 * big.memory_budget
    huge = plan(1_000_000_000, 512, big)  # even 8-byte codes do not fit: on-disk lists
    assert huge["ondisk"] and huge["resident_bytes"] < big.memory_budget
    for n in (1_000, 200_000, 5_000_000):  # without a budget: the documented default rule
        assert plan(n, 64, IndexConfig())["factory"] == fx.default_factory(n, 64)


def test_config_and_sizes_are_checked():
    assert parse_bytes("8GB") == 8 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("1.5g") == 3 << 29
    for bad in ("", "lots", "-1GB", "0"):
        with pytest.raises(ValueError, match="memory-budget"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="--lsh"):
        IndexConfig(lsh="bloom")
    with pytest.raises(ValueError, match="target recall"):
        IndexConfig(target_recall=0)
    with pytest.raises(ValueError, match="keep"):
        IndexConfig(keep=0)


def test_search_index_loads_an_ondisk_version(emb, tmp_path):
    """The published on-disk version answers through SearchIndex (the CLI's search path), not only load_version."""
    from attnpipe.index.search import SearchIndex

    path, _ = emb
    cfg = IndexConfig(factory="IVF32,Flat", lsh="none", workers=1)
    build_index(path, str(tmp_path / "disk"), cfg, ondisk=True)
    index = SearchIndex.load(str(tmp_path / "disk"))
    hits = index.search_id("s/00042", 5)
    assert hits[0][0] == "s/00042" and len(hits) == 5
