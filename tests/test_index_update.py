"""Index refresh policy on synthetic vector datasets: incremental equals a rebuild, growth and drift retrain."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from attnpipe import store
from attnpipe.index.build import build_index
from attnpipe.index.search import SearchIndex
from attnpipe.index.update import plan_update, refresh_index
from tests.test_index import clustered

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
DIM = 32


def _dataset(path: str, parts: dict[str, np.ndarray]) -> None:
    """A dataset with one part per named shard (numbered in order)."""
    first, *rest = parts.items()
    store.write_vectors(path, [f"{first[0]}/{i:05d}" for i in range(len(first[1]))], first[1], model=first[0])
    for name, X in rest:
        _add_shard(path, name, X)


def _add_shard(path: str, name: str, X: np.ndarray) -> None:
    """Add a shard the way reindex does: its part written in, then the manifest replaced (next part number)."""
    tmp = f"{path}.{name}.tmp"
    store.write_vectors(tmp, [f"{name}/{i:05d}" for i in range(len(X))], X, model=name)
    (part,) = store.open_dataset(tmp).parts()
    table = store.read_part(tmp, part)
    shutil.rmtree(tmp)
    _publish(path, lambda entries, run: [*entries, run.add_table(part.shard, table)])


def _publish(path: str, change) -> None:
    """An in-place update: kept parts keep their numbers, new ones get the next numbers."""
    manifest = store.read_manifest(path)
    run = store.start_run(path, {"test": "update"}, resume=False, replace=True)
    entries = change(list(manifest["shards"]), run)
    listed = {p for e in entries for p in e["parts"]}
    keep = {f: n for f, n in store.part_numbers(manifest).items() if f in listed}
    run.publish(entries, {"model": manifest.get("model")}, keep=keep)


def _remove_shard(path: str, name: str) -> None:
    _publish(path, lambda entries, run: [e for e in entries if not e["name"].startswith(name)])


def test_flat_incremental_update_equals_a_rebuild(ray_session, tmp_path):
    X = clustered(4000, DIM, 20, seed=1)
    emb, root = str(tmp_path / "emb"), str(tmp_path / "root")
    _dataset(emb, {f"s{i}": X[i * 1000 : (i + 1) * 1000] for i in range(3)})
    build_index(emb, root, lsh="simhash")
    _remove_shard(emb, "s1")
    _add_shard(emb, "s3", X[3000:])
    assert plan_update(emb, root).mode == "incremental"
    manifest, plan = refresh_index(emb, root)
    assert plan.mode == "incremental" and manifest["version"] == "v2" and manifest["count"] == 3000
    full_root = str(tmp_path / "full")
    build_index(emb, full_root, lsh="simhash")
    inc, full = SearchIndex.load(root), SearchIndex.load(full_root)
    assert set(inc.id_map[1]) == set(full.id_map[1]) and not any(i.startswith("s1") for i in inc.id_map[1])
    Q = clustered(200, DIM, 20, seed=2)
    assert inc.search(Q, 10)[1] == full.search(Q, 10)[1]  # exact search over the same vectors: same answers
    assert refresh_index(emb, root)[0] is None  # nothing changed: no new version


def test_ivf_incremental_keeps_recall_then_growth_retrains(ray_session, tmp_path):
    X = clustered(9300, DIM, 40, seed=3)  # the last 300: held-out queries from the same distribution
    emb, root = str(tmp_path / "emb"), str(tmp_path / "root")
    _dataset(emb, {f"s{i}": X[i * 1000 : (i + 1) * 1000] for i in range(4)})
    build_index(emb, root, factory="IVF32,Flat", lsh="none")
    _add_shard(emb, "s4", X[4000:5000])  # +25%: incremental
    manifest, plan = refresh_index(emb, root, factory="IVF32,Flat", lsh="none")
    assert plan.mode == "incremental" and manifest["count"] == 5000
    assert manifest["faiss"]["added_since_training"] == 1000 and manifest["faiss"]["trained_count"] == 4000
    index = SearchIndex.load(root)
    Q = X[9000:]
    exact = np.argsort(-(Q @ X[:5000].T), axis=1)[:, :10]
    names = np.array([f"s{i // 1000}/{i % 1000:05d}" for i in range(5000)])
    got = index.search(Q, 10)[1]
    recall = np.mean([len(set(g) & set(names[e])) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.9, recall

    _add_shard(emb, "s5", X[5000:6000])  # 2,000 added since training on 4,000: > +50%
    plan = plan_update(emb, root, factory="IVF32,Flat", lsh="none")
    assert plan.mode == "full" and "added since" in plan.reason
    manifest, _ = refresh_index(emb, root)  # no choices given: the live factory and LSH are kept through a retrain
    assert manifest["update"]["mode"] == "full" and manifest["faiss"]["trained_count"] == 6000
    assert manifest["faiss"]["factory"] == "IVF32,Flat" and manifest["lsh"] == {}


def test_drift_falls_back_to_a_full_retrain(ray_session, tmp_path):
    """Most vectors replaced by data from elsewhere: recall at the old nprobe collapses, so the index is retrained."""
    X = clustered(4000, DIM, 40, seed=5)
    rng = np.random.default_rng(6)
    Y = rng.normal(size=(3000, DIM)).astype(np.float32)  # no cluster structure: neighbours span many cells
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    emb, root = str(tmp_path / "emb"), str(tmp_path / "root")
    _dataset(emb, {f"s{i}": X[i * 1000 : (i + 1) * 1000] for i in range(4)})
    v1 = build_index(emb, root, factory="IVF32,Flat", lsh="none")
    for i in range(3):
        _remove_shard(emb, f"s{i}")
        _add_shard(emb, f"n{i}", Y[i * 1000 : (i + 1) * 1000])
    manifest, plan = refresh_index(emb, root, factory="IVF32,Flat", lsh="none", max_growth=10)
    assert plan.mode == "full" and "drifted" in plan.reason
    assert manifest["update"]["mode"] == "full" and manifest["faiss"]["nprobe"] >= v1["faiss"]["nprobe"]
    assert manifest["faiss"]["recall@10"] >= 0.95
