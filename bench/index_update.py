"""Index update: attnpipe's incremental refresh (scheduled re-indexing) vs a full rebuild of the same data, one run.

    python bench/index_update.py [--n 200000] [--dim 128] [--shards 20] [--churn 2] [--factory IVF1024,Flat]
                                 [--lsh simhash] [--flat-n 40000] [--cpus N]

Builds v1 of ``n`` clustered vectors in ``shards`` parts, then removes ``churn`` shards and adds ``churn`` new ones
(same distribution, held back from the start) the way reindex does (part moved in, manifest committed). Times
``refresh_index`` (asserted incremental) and ``build_index`` of the updated dataset into another root (Ray start-up
excluded, Parquet reading, tuning and writing included), and prints seconds, the speed-up full / incremental, each
version's tuned nprobe and its own recall@10 (manifest: leave-one-out on 1000 indexed vectors), recall@10 of 1000
held-out queries vs exact brute force at the stored nprobe, and whether both versions index the same ids and
return the same top-10 ids. ``--flat-n`` repeats the scenario with a ``Flat`` index (0 skips it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np
import ray

from attnpipe import store
from attnpipe.index.build import build_index
from attnpipe.index.search import SearchIndex
from attnpipe.index.update import plan_update, refresh_index
from attnpipe.runtime import init_ray

K = 10


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """As ``tests/test_index.py``: Gaussian clusters, unit norm. One call per scenario, sliced: one distribution."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    X = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def add_shard(path: str, name: str, X: np.ndarray) -> None:
    """Add a shard the way reindex does: its part moved in, then the manifest replaced (next part number)."""
    tmp = f"{path}.{name}.tmp"
    store.write_vectors(tmp, [f"{name}/{i:05d}" for i in range(len(X))], X, model=name)
    entry = store.read_manifest(tmp)["shards"][0]
    manifest = store.read_manifest(path)
    shutil.move(os.path.join(tmp, entry["parts"][0]), os.path.join(path, entry["parts"][0]))
    shutil.rmtree(tmp)
    manifest["shards"].append(entry)
    manifest["part_numbers"][entry["parts"][0]] = manifest["next_part_number"]
    manifest["next_part_number"] += 1
    store.commit(path, None, manifest)


def remove_shard(path: str, name: str) -> None:
    manifest = store.read_manifest(path)
    (entry,) = [s for s in manifest["shards"] if s["name"].startswith(name)]
    manifest["shards"].remove(entry)
    del manifest["part_numbers"][entry["parts"][0]]
    store.commit(path, None, manifest)


def dataset(path: str, parts: dict[str, np.ndarray]) -> None:
    """A dataset with one part per named shard (numbered in order)."""
    first, *rest = parts.items()
    store.write_vectors(path, [f"{first[0]}/{i:05d}" for i in range(len(first[1]))], first[1], model=first[0])
    for name, X in rest:
        add_shard(path, name, X)


def held_out_recall(index: SearchIndex, Q: np.ndarray, truth: list[set[str]]) -> tuple[float, list[list[str]]]:
    got = index.search(Q, K)[1]
    return float(np.mean([len(set(g) & t) / K for g, t in zip(got, truth)])), got


def scenario(
    tmp: str,
    n: int,
    dim: int,
    shards: int,
    churn: int,
    factory: str,
    lsh: str,
    clusters: int,
    queries: int,
    workers: int,
) -> dict:
    """v1 full build, -churn/+churn shards, then the timed incremental refresh and full rebuild; the numbers."""
    size = n // shards
    X = clustered(n + churn * size + queries, dim, clusters, seed=0)
    names = [f"s{i:02d}" for i in range(shards + churn)]  # zero-padded: remove_shard matches by prefix
    data = {name: X[i * size : (i + 1) * size] for i, name in enumerate(names)}
    Q = X[(shards + churn) * size :]  # held-out queries, never indexed
    emb, inc_root, full_root = (os.path.join(tmp, d) for d in ("emb", "inc", "full"))
    dataset(emb, {name: data[name] for name in names[:shards]})
    v1 = build_index(emb, inc_root, factory=factory, lsh=lsh, workers=workers)

    gone = names[:: shards // churn][:churn]  # spread over the part numbers
    for name in gone:
        remove_shard(emb, name)
    for name in names[shards:]:
        add_shard(emb, name, data[name])
    kept = [name for name in names if name not in gone]

    plan = plan_update(emb, inc_root, factory=factory, lsh=lsh)
    assert plan.mode == "incremental", plan
    start = time.perf_counter()
    inc, plan = refresh_index(emb, inc_root, factory=factory, lsh=lsh, workers=workers)
    inc_s = time.perf_counter() - start
    assert plan.mode == "incremental" and inc is not None and inc["update"]["mode"] == "incremental", plan
    start = time.perf_counter()
    full = build_index(emb, full_root, factory=factory, lsh=lsh, workers=workers)
    full_s = time.perf_counter() - start

    # Exact top-10 of the held-out queries over the updated dataset's vectors, by string id.
    cur = np.concatenate([data[name] for name in kept])
    cur_ids = np.array([f"{name}/{i:05d}" for name in kept for i in range(size)], dtype=object)
    _, I = faiss.knn(Q, cur, K, metric=faiss.METRIC_INNER_PRODUCT)
    truth = [set(row) for row in cur_ids[I]]
    a, b = SearchIndex.load(inc_root), SearchIndex.load(full_root)
    a_recall, a_got = held_out_recall(a, Q, truth)
    b_recall, b_got = held_out_recall(b, Q, truth)
    assert not any(i.split("/")[0] in gone for i in a.id_map[1])
    return {
        "v1": v1,
        "inc": inc,
        "full": full,
        "inc_s": inc_s,
        "full_s": full_s,
        "size": size,
        "gone": gone,
        "inc_heldout": a_recall,
        "full_heldout": b_recall,
        "same_ids": set(a.id_map[1]) == set(b.id_map[1]) == set(cur_ids),
        "same_top": float(np.mean([set(x) == set(y) for x, y in zip(a_got, b_got)])),
    }


def report(r: dict, n: int, churn: int, factory: str) -> None:
    f1 = r["v1"]["faiss"]
    print(
        f"{factory}: {n} vectors in {n // r['size']} shards; v1 full build {r['v1']['build_seconds']:.2f} s "
        f"(nprobe={f1.get('nprobe')}, recall@10 {f1['recall@10']:.3f}); then -{churn}/+{churn} shards "
        f"({churn * r['size']} vectors each way, removed {', '.join(r['gone'])})"
    )
    print(f"{'version':<28}{'seconds':>9}{'build_s':>9}{'nprobe':>8}{'recall@10 manifest':>20}{'held-out':>10}")
    for label, key in (("incremental (refresh_index)", "inc"), ("full rebuild (build_index)", "full")):
        m = r[key]
        print(
            f"{label:<28}{r[f'{key}_s']:9.2f}{m['build_seconds']:9.2f}{m['faiss'].get('nprobe')!s:>8}"
            f"{m['faiss']['recall@10']:20.3f}{r[f'{key}_heldout']:10.3f}"
        )
    at_prev = r["inc"]["faiss"].get("recall@10_at_previous_nprobe")
    extra = f"; incremental recall@10 at v1's nprobe {at_prev:.3f}" if at_prev is not None else ""
    print(
        f"speed-up full / incremental: {r['full_s'] / r['inc_s']:.2f}x (wall), "
        f"{r['full']['build_seconds'] / r['inc']['build_seconds']:.2f}x (build_seconds){extra}"
    )
    print(
        f"indexed id sets identical: {'yes' if r['same_ids'] else 'NO'}; "
        f"held-out queries with identical top-10 id sets: {r['same_top']:.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--churn", type=int, default=2, help="shards removed, and as many added")
    p.add_argument("--factory", default="IVF1024,Flat")
    p.add_argument("--lsh", default="simhash")
    p.add_argument("--clusters", type=int, default=500)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries")
    p.add_argument("--flat-n", type=int, default=40_000, help="vectors for the Flat scenario; 0 skips it")
    p.add_argument("--workers", type=int, default=0, help="Ray tasks (0: one per CPU)")
    p.add_argument("--cpus", type=int, default=None, help="Ray num_cpus (default: all cores)")
    args = p.parse_args()
    init_ray(num_cpus=args.cpus)
    print(
        f"index update: dim {args.dim}, lsh {args.lsh}, {os.cpu_count()} cores, faiss {faiss.__version__}",
        file=sys.stderr,
    )
    runs = [(args.n, args.factory)] + ([(args.flat_n, "Flat")] if args.flat_n else [])
    for i, (n, factory) in enumerate(runs):
        with tempfile.TemporaryDirectory() as tmp:
            r = scenario(
                tmp, n, args.dim, args.shards, args.churn, factory, args.lsh, args.clusters, args.queries, args.workers
            )
        if i:
            print()
        report(r, n, args.churn, factory)
    ray.shutdown()


if __name__ == "__main__":
    main()
