"""Scale: attnpipe index build and eval vs plain single-process faiss, time and peak RSS, in-memory vs on-disk lists.

    python bench/scale.py [--sizes 1000000 2000000] [--dims 128] [--factory IVF1024,Flat] [--nprobe 16]

Per (n, dim): synthetic clustered vectors are written once as an embeddings dataset (16 parts) and as ``.npy``.
Each variant then runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own:

- ``plain``: ``np.load`` the vectors, train on a 256·nlist sample, ``add``, write the index (faiss alone);
- ``attnpipe``: ``build_index(..., lsh="none", workers=1)`` (reads the Parquet parts, tunes, publishes);
- ``ondisk``: the same with on-disk inverted lists (``faiss.ivfdata``, memory-mapped at search);
- ``eval``: ``evaluate`` of 1000 gallery queries (leave-one-out, depth 100) against the attnpipe index.

Search rows: QPS (1000 held-out queries, one batch, best of 3) and recall@10 vs exact of the in-memory and the
on-disk index at the same nprobe. Prints a Markdown table and one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np


def clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(size=(clusters, dim)).astype(np.float32)
    y = rng.integers(0, clusters, n)
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, 200_000):  # in chunks: no float64 copy of the whole matrix
        e = min(n, s + 200_000)
        X[s:e] = centers[y[s:e]] + rng.normal(size=(e - s, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def peak_rss() -> int:
    """This process's peak RSS: VmHWM (per address space; ru_maxrss would carry the parent's over fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def search_rows(index: faiss.Index, Q: np.ndarray, truth: np.ndarray, nprobe: int, emb: str | None = None) -> dict:
    """QPS and recall@10 vs exact; attnpipe's faiss ids (``part << 32 | row``) are mapped back to global rows."""
    faiss.extract_index_ivf(index).nprobe = nprobe
    index.search(Q[:50], 10)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        _, I = index.search(Q, 10)
        best = min(best, time.perf_counter() - t)
    if emb is not None:
        from attnpipe import store

        parts = store.open_dataset(emb).parts()
        offset = dict(zip((p.number for p in parts), np.cumsum([0, *(p.ok for p in parts)])))
        I = np.vectorize(lambda f: offset[f >> 32] + (f & 0xFFFFFFFF) if f >= 0 else -1, otypes=[np.int64])(I)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, truth)])
    return {"qps": len(Q) / best, "recall@10": float(recall)}


def variant(args: argparse.Namespace) -> dict:
    """One measured variant, in this (fresh) process."""
    work, name = args.work, args.variant
    Q = np.load(os.path.join(work, "queries.npy"))
    truth = np.load(os.path.join(work, "truth.npy"))
    t = time.perf_counter()
    out: dict = {"variant": name}
    if name == "plain":
        X = np.load(os.path.join(work, "vectors.npy"))
        index = faiss.index_factory(X.shape[1], args.factory, faiss.METRIC_INNER_PRODUCT)
        nlist = faiss.extract_index_ivf(index).nlist
        index.train(X[np.random.default_rng(0).choice(len(X), min(len(X), 256 * nlist), replace=False)])
        index.add(X)
        faiss.write_index(index, os.path.join(work, "plain.index"))
        out["seconds"] = time.perf_counter() - t
        out.update(search_rows(index, Q, truth, args.nprobe))
    elif name in ("attnpipe", "ondisk"):
        from attnpipe.index.build import build_index
        from attnpipe.index.faiss_index import load_version

        root = os.path.join(work, f"index-{name}")
        m = build_index(
            os.path.join(work, "emb"), root, factory=args.factory, lsh="none", workers=1, ondisk=name == "ondisk"
        )
        out["seconds"] = time.perf_counter() - t
        out["tuned_nprobe"] = m["faiss"].get("nprobe")
        out.update(search_rows(load_version(m)[0], Q, truth, args.nprobe, os.path.join(work, "emb")))
    elif name == "eval":
        from attnpipe.evaluate.runner import evaluate

        m = evaluate(
            os.path.join(work, "emb"),
            os.path.join(work, "index-attnpipe"),
            os.path.join(work, "eval"),
            num_queries=1000,
            ks=(1, 10, 100),
            depth=100,
            workers=1,
        )
        out["seconds"] = time.perf_counter() - t
        out["map@r"] = m["exact"]["map@r"]
    out["peak_rss"] = peak_rss()
    return out


def run_variant(work: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        name,
        "--work",
        work,
        "--factory",
        args.factory,
        "--nprobe",
        str(args.nprobe),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[128])
    p.add_argument("--factory", default="IVF1024,Flat")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=["plain", "attnpipe", "ondisk", "eval"])
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; seconds = best round (noisy machines)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(variant(args)))
        return
    from attnpipe import store

    print(
        f"scale: {os.cpu_count()} cores, faiss {faiss.__version__}, {args.factory}, nprobe {args.nprobe}",
        file=sys.stderr,
    )
    rows = []
    for dim in args.dims:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
                X, y = clustered(n, dim, 1000, 0)
                Q, _ = clustered(1000, dim, 1000, 1)
                truth = faiss.knn(Q, X, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
                np.save(os.path.join(work, "vectors.npy"), X)
                np.save(os.path.join(work, "queries.npy"), Q)
                np.save(os.path.join(work, "truth.npy"), truth)
                store.write_vectors(
                    os.path.join(work, "emb"), [f"s/{i}" for i in range(n)], X, [f"c{c}" for c in y], num_shards=16
                )
                del X, y
                best: dict[str, dict] = {}
                for round_ in range(args.repeat):  # interleaved: load changes hit every variant alike
                    for name in args.variants:
                        if name == "eval" and round_:
                            continue  # memory is what eval is measured for: one round
                        r = {"n": n, "dim": dim, "round": round_, **run_variant(work, name, args)}
                        print(json.dumps(r), flush=True)
                        if name not in best or r["seconds"] < best[name]["seconds"]:
                            best[name] = r
                rows.extend(best.values())
    print("\n| n | dim | variant | seconds | peak RSS GiB | QPS | recall@10 |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        q = f"{r['qps']:,.0f}" if "qps" in r else ""
        rc = f"{r['recall@10']:.3f}" if "recall@10" in r else ""
        print(
            f"| {r['n']:,} | {r['dim']} | {r['variant']} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {q} | {rc} |"
        )


if __name__ == "__main__":
    main()
