"""Dedup quality on planted edited copies, and the semantic method's time and memory at scale.

Quality: ``make_planted`` originals + one edited copy of a fifth of them (JPEG q15, rescale, crop, brightness, blur,
rotation), encoded by the real pipeline (random-weight resnet18, several poolings), deduplicated with the default
settings; pair precision/recall per edit and method, at the chosen threshold and as a curve.

Scale: synthetic clustered 128-d vectors with 1% planted near-copies (``store.write_vectors``) through
``attnpipe dedup`` (semantic, defaults); wall time, peak RSS of the whole process tree, recall of the planted copies.

    python bench/dedup_quality.py quality --workdir /tmp/dq [--poolings max,gem,avg]
    python bench/dedup_quality.py scale --workdir /tmp/ds --n 250000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnpipe import store
from attnpipe.dedup import DedupConfig, dedup
from attnpipe.dedup.planted import make_planted, pair_quality

CURVE = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
MINHASH_CURVE = (0.5, 0.6, 0.7, 0.8, 0.9)


def _pairs(out: str) -> list[dict]:
    return pq.read_table(os.path.join(out, "pairs.parquet")).to_pylist()


def quality(workdir: str, poolings: list[str], size: int) -> dict:
    from attnpipe.encode import encode
    from tests.conftest import fast_config

    planted = make_planted(os.path.join(workdir, "data"), n=480, copied=96, image_size=128)
    results = {}
    for pooling in poolings:
        emb = os.path.join(workdir, f"emb-{pooling}")
        if not os.path.exists(emb):
            encode(
                [planted.orig, planted.copies], emb, fast_config(f"model.pooling={pooling}", f"data.image_size={size}")
            )
        row = {}
        for method in ("semantic", "minhash"):
            out = os.path.join(workdir, f"dedup-{pooling}-{method}")
            s = dedup(emb, out, cfg=DedupConfig(method=method), overwrite=True)
            q = pair_quality([(p["id_a"], p["id_b"]) for p in _pairs(out)], planted)
            row[method] = {"threshold": (s["threshold"] or {}).get("value", s["minhash_threshold"]), **q}
        # curves: all pairs over a low threshold once, then filtered
        low = os.path.join(workdir, f"dedup-{pooling}-low")
        dedup(emb, low, cfg=DedupConfig(threshold=min(CURVE)), overwrite=True)
        pairs = _pairs(low)
        row["semantic_curve"] = {
            t: _pr(pair_quality([(p["id_a"], p["id_b"]) for p in pairs if p["similarity"] >= t], planted))
            for t in CURVE
        }
        low = os.path.join(workdir, f"dedup-{pooling}-minhash-low")
        dedup(emb, low, cfg=DedupConfig(method="minhash", minhash_threshold=min(MINHASH_CURVE)), overwrite=True)
        pairs = _pairs(low)
        row["minhash_curve"] = {
            t: _pr(pair_quality([(p["id_a"], p["id_b"]) for p in pairs if p["similarity"] >= t], planted))
            for t in MINHASH_CURVE
        }
        results[pooling] = row
        _print_quality(pooling, row)
    return results


def _pr(q: dict) -> dict:
    return {"precision": round(q["precision"], 3), "recall": round(q["recall"], 3), "found": q["found"]}


def _print_quality(pooling: str, row: dict) -> None:
    for method in ("semantic", "minhash"):
        q = row[method]
        edits = " ".join(f"{e}={v['recall']:.2f}" for e, v in q["per_edit"].items())
        print(
            f"{pooling:5s} {method:8s} t={q['threshold']:.3f} P={q['precision']:.3f} R={q['recall']:.3f} | {edits}",
            flush=True,
        )
    for name in ("semantic_curve", "minhash_curve"):
        print(f"      {name}: " + " ".join(f"{t}:{v['precision']:.2f}/{v['recall']:.2f}" for t, v in row[name].items()))


class _TreeRss(threading.Thread):
    """Peak summed RSS of this process and all its descendants (Ray's raylet, workers, object store), sampled."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            parent, rss = {}, {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/statm") as f:
                        rss[int(pid)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, IndexError, ValueError):
                    continue
            total = 0
            for pid, size in rss.items():
                p = pid
                while p in parent and p != me and p > 1:
                    p = parent[p]
                if p == me:
                    total += size
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)


def scale(workdir: str, n: int, dim: int = 128, seed: int = 0) -> dict:
    from attnpipe.runtime import init_ray

    emb = os.path.join(workdir, f"emb-{n}")
    copies = n // 100
    if not os.path.exists(emb):
        rng = np.random.default_rng(seed)
        base = n - copies
        C = rng.normal(size=(max(16, n // 500), dim)).astype(np.float32)
        X = C[rng.integers(0, len(C), base)] + 0.6 * rng.normal(size=(base, dim)).astype(np.float32)
        src = rng.choice(base, copies, replace=False)
        X = np.concatenate([X, X[src] + 0.03 * rng.normal(size=(copies, dim)).astype(np.float32)])
        np.save(os.path.join(workdir, f"src-{n}.npy"), src)
        t = time.perf_counter()
        store.write_vectors(emb, [f"syn/{i:08d}" for i in range(n)], X, num_shards=max(1, n // 50_000))
        print(f"wrote {n} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        del X
    src = np.load(os.path.join(workdir, f"src-{n}.npy"))
    init_ray()
    sampler = _TreeRss()
    sampler.start()
    t = time.perf_counter()
    summary = dedup(emb, os.path.join(workdir, f"dedup-{n}"), overwrite=True)
    seconds = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    pairs = _pairs(os.path.join(workdir, f"dedup-{n}"))
    found = {(p["id_a"], p["id_b"]) for p in pairs}
    base = n - copies
    planted = {(f"syn/{int(s):08d}", f"syn/{base + j:08d}") for j, s in enumerate(src)}
    result = {
        "n": n,
        "seconds": round(seconds, 1),
        "peak_rss_tree_gib": round(sampler.peak / 2**30, 2),
        "driver_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "clusters": summary["plan"]["clusters"],
        "buckets": summary["plan"]["buckets"],
        "threshold": round(summary["threshold"]["value"], 4),
        "pairs": summary["pairs"],
        "planted_recall": round(len(planted & found) / len(planted), 4),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("quality", "scale"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--poolings", default="max,gem,avg")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--n", type=int, default=250_000)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.what == "quality":
        res = quality(args.workdir, args.poolings.split(","), args.image_size)
    else:
        res = scale(args.workdir, args.n)
    with open(os.path.join(args.workdir, f"{args.what}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
