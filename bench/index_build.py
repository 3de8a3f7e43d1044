"""Index build: attnpipe's Ray build vs workers, next to plain single-process faiss on the same data, one run.

    python bench/index_build.py [--n 200000] [--dim 128] [--factory IVF1024,Flat] [--workers 1 2]

Prints build seconds per worker count (Ray start-up excluded, Parquet reading included), plain faiss
train+add seconds (vectors already in memory), the tuned nprobe and recall@10, and search QPS at that nprobe for
both (same 5000 queries in one batch, best of 3).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import faiss
import numpy as np
import ray

from attnpipe import store
from attnpipe.index.build import build_index
from attnpipe.index.search import SearchIndex


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """Overlapping Gaussian clusters (noise comparable to the centre spread), so nprobe has work to do."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(size=(clusters, dim)).astype(np.float32)
    X = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def qps(index: faiss.Index, Q: np.ndarray, k: int = 10) -> float:
    index.search(Q[:100], k)
    best = float("inf")
    for _ in range(3):  # best of 3: less noise from the other processes on the machine
        start = time.perf_counter()
        index.search(Q, k)
        best = min(best, time.perf_counter() - start)
    return len(Q) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factory", default="IVF1024,Flat")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shards", type=int, default=16)
    args = p.parse_args()
    X = clustered(args.n, args.dim, 500, 0)
    Q = clustered(5000, args.dim, 500, 1)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    print(
        f"index build: {args.n} x {args.dim}, {args.factory}, {os.cpu_count()} cores, faiss {faiss.__version__}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        emb = os.path.join(tmp, "emb")
        store.write_vectors(emb, [f"b/{i}" for i in range(args.n)], X, num_shards=args.shards)
        rows = []
        for w in args.workers:
            m = build_index(emb, os.path.join(tmp, f"idx{w}"), factory=args.factory, lsh="none", workers=w)
            rows.append((w, m))
        index = SearchIndex.load(os.path.join(tmp, f"idx{args.workers[0]}"))
        nprobe = index.manifest["faiss"].get("nprobe")
        attn_qps = qps(index.indexes[0], Q)

    start = time.perf_counter()
    plain = faiss.index_factory(args.dim, args.factory, faiss.METRIC_INNER_PRODUCT)
    plain.train(X[np.random.default_rng(0).choice(args.n, min(args.n, 256 * 1024), replace=False)])
    plain.add(X)
    plain_s = time.perf_counter() - start
    if nprobe:
        faiss.ParameterSpace().set_index_parameter(plain, "nprobe", nprobe)
    plain_qps = qps(plain, Q)

    print(f"{'build':<34}{'seconds':>9}{'vs plain':>10}")
    print(f"{'plain faiss, 1 process, in memory':<34}{plain_s:9.2f}{1:10.2f}")
    for w, m in rows:
        print(f"{f'attnpipe, {w} Ray worker(s)':<34}{m['build_seconds']:9.2f}{m['build_seconds'] / plain_s:10.2f}")
    r = rows[0][1]["faiss"]
    print(f"tuned nprobe={nprobe} recall@10={r['recall@10']:.3f} (target {r['target_recall']})")
    print(
        f"search QPS at nprobe={nprobe}: attnpipe index {attn_qps:,.0f}, plain faiss {plain_qps:,.0f}, "
        f"ratio {attn_qps / plain_qps:.2f}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
