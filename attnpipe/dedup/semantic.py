"""Semantic near-duplicate pairs at scale: k-means buckets, exact cosine inside each cluster, on Ray tasks.

Cost is linear in the dataset, not quadratic: every vector is compared only with the vectors that share one of its
``probes`` nearest centroids (so a pair straddling a cluster border is still found), in a map-reduce over Ray:

1. **Scatter** (one task per part): read the part, centre/whiten (:class:`~attnpipe.dedup.calibrate.Transform`),
   assign each vector to its ``probes`` nearest centroids, and return one block per *bucket* (a group of clusters
   balanced by expected work) — a shuffle through the object store.
2. **Compare** (one task per bucket): exact cosine within each cluster in row blocks of bounded memory; a pair is
   emitted only by the smallest cluster both vectors share, so no pair comes out twice. Vectors of ``--against``
   datasets (side > 0) ride along and are compared with side 0 only.

Ids stay global integers ``part number << 32 | row`` (as FAISS ids) until the few that end up in pairs are named.

Example::

    plan = Plan.fit(sample, whiten=True, probes=2)
    buckets = scatter(plan, [(path, part, 0) for part in ds.parts()])
    pairs, cross = compare(buckets, threshold=0.4)
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import ray

from attnpipe import store
from attnpipe.dedup.calibrate import Transform, fit_transform

BLOCK_FLOATS = 1 << 24  # similarity block per compare step: 64 MiB of float32 whatever the cluster size
CLUSTER_SIZE = 1000  # target vectors per k-means cluster: work per vector ~ probes x this


@dataclass(frozen=True)
class Plan:
    transform: Transform
    centroids: np.ndarray  # (k, D) float32, unit rows, in the transformed space
    bucket_of: np.ndarray  # (k,) int32: cluster -> bucket
    probes: int

    @property
    def buckets(self) -> int:
        return int(self.bucket_of.max()) + 1

    @classmethod
    def fit(
        cls,
        sample: np.ndarray,
        n: int,
        whiten: bool = True,
        probes: int = 2,
        clusters: int = 0,
        buckets: int = 0,
        seed: int = 0,
    ) -> Plan:
        """Transform, k-means centroids and cluster -> bucket map from a sample ``(s, D)`` of ``n`` vectors."""
        transform = fit_transform(sample, whiten)
        Z = transform.apply(sample)
        k = clusters or int(np.clip(round(n / CLUSTER_SIZE), 1, max(1, len(Z) // 39)))
        if k <= 1:
            c = Z.mean(0, keepdims=True)
            centroids = c / max(float(np.linalg.norm(c)), 1e-12)
        else:
            km = faiss.Kmeans(Z.shape[1], k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
            km.train(Z)
            centroids = km.centroids
        probes = int(min(probes, len(centroids)))
        _, top = _nearest(centroids, Z, probes)
        expected = np.bincount(top.ravel(), minlength=len(centroids)) * (n / max(len(Z), 1))
        nb = buckets or int(min(len(centroids), max(4 * _cpus(), round(n * probes / 50_000))))
        return cls(transform, centroids.astype(np.float32), _balance(expected, nb), probes)


def _cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def _nearest(centroids: np.ndarray, Z: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    return index.search(np.ascontiguousarray(Z, np.float32), probes)


def _balance(expected: np.ndarray, buckets: int) -> np.ndarray:
    """Clusters -> buckets, largest expected work (size²) first onto the least loaded bucket."""
    load = np.zeros(max(buckets, 1))
    out = np.zeros(len(expected), np.int32)
    for c in np.argsort(-expected, kind="stable"):
        b = int(np.argmin(load))
        out[c] = b
        load[b] += expected[c] ** 2
    return out


# A bucket block: (side, gid (r,) int64, cluster (r,) int32, assigned clusters (r, probes) int32, Z (r, D) float32)
Block = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@ray.remote
def sample_part(path: str, part: store.Part, k: int, seed: int) -> np.ndarray:
    """Up to ``k`` random ok vectors of one part."""
    _, X = store.part_vectors(path, part)
    rng = np.random.default_rng([seed, part.number])
    return X[np.sort(rng.choice(len(X), min(k, len(X)), replace=False))] if len(X) else X


@ray.remote
def scatter_part(path: str, part: store.Part, side: int, plan: Plan) -> list[Block] | Block:
    """Read, transform and assign one part; one block per bucket (empty blocks included)."""
    _, X = store.part_vectors(path, part)
    D = plan.centroids.shape[1]
    Z = plan.transform.apply(X) if len(X) else np.zeros((0, D), np.float32)
    _, top = _nearest(plan.centroids, Z, plan.probes) if len(Z) else (None, np.zeros((0, plan.probes), np.int64))
    top = top.astype(np.int32)
    gid = (np.int64(part.number) << 32) | np.arange(len(Z), dtype=np.int64)
    rows = np.repeat(np.arange(len(Z)), plan.probes)  # every (vector, assigned cluster) entry
    cl = top.ravel()
    bucket = plan.bucket_of[cl]
    out = []
    for b in range(plan.buckets):
        sel = bucket == b
        r = rows[sel]
        out.append((side, gid[r], cl[sel], top[r], Z[r]))
    return out if len(out) > 1 else out[0]  # num_returns=1 takes the value itself


@ray.remote
def gather_part(path: str, part: store.Part, rows: np.ndarray, transform: Transform) -> tuple[list[str], np.ndarray]:
    """Ids and transformed vectors of some ok rows of one part."""
    ids, X = store.part_vectors(path, part)
    return [ids[r] for r in rows], transform.apply(X[rows])


def _blocks(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, BLOCK_FLOATS // max(n_cols, 1)))


def _first_shared(c: int, ai: np.ndarray, aj: np.ndarray) -> np.ndarray:
    """True where ``c`` is the smallest cluster that both rows were assigned to: the one cluster emitting a pair."""
    eq = ai[:, :, None] == aj[:, None, :]  # (p, probes, probes)
    shared = np.where(eq.any(2), ai, np.iinfo(np.int32).max).min(1)
    return shared == c


def _by_cluster(blocks: list[Block], side: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    mine = [b for b in blocks if b[0] == side and len(b[1])]
    if not mine:
        return {}
    gid = np.concatenate([b[1] for b in mine])
    cl = np.concatenate([b[2] for b in mine])
    assign = np.concatenate([b[3] for b in mine])
    Z = np.concatenate([b[4] for b in mine])
    order = np.argsort(cl, kind="stable")
    cl, gid, assign, Z = cl[order], gid[order], assign[order], Z[order]
    starts = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1]])
    ends = np.r_[starts[1:], len(cl)]
    return {int(cl[s]): (gid[s:e], assign[s:e], Z[s:e]) for s, e in zip(starts, ends)}


@ray.remote
def nn_bucket(*blocks: Block) -> tuple[np.ndarray, np.ndarray]:
    """Each side-0 vector's most similar other vector within its clusters of this bucket: (gid, similarity)."""
    gids, sims = [], []
    for gid, _, Z in _by_cluster(list(blocks), 0).values():
        best = np.full(len(Z), -np.inf, np.float32)
        step = _blocks(len(Z), len(Z))
        for i in range(0, len(Z), step):
            S = Z[i : i + step] @ Z.T  # (step, m)
            S[np.arange(S.shape[0]), np.arange(i, i + S.shape[0])] = -np.inf  # not itself
            best[i : i + step] = S.max(1) if S.shape[1] else -np.inf
        gids.append(gid)
        sims.append(best)
    if not gids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(gids), np.concatenate(sims)


def _pairs(c: int, A: tuple, B: tuple, threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ga, aa, Za = A
    gb, ab, Zb = B
    out_a, out_b, out_s = [], [], []
    step = _blocks(len(Za), len(Zb))
    for i in range(0, len(Za), step):
        S = Za[i : i + step] @ Zb.T  # (step, |B|)
        if same:  # each unordered pair once: column after row
            S[np.arange(len(Zb))[None, :] <= np.arange(i, i + S.shape[0])[:, None]] = -np.inf
        r, k = np.nonzero(S >= threshold)
        r += i
        if len(r):
            keep = _first_shared(c, aa[r], ab[k])
            out_a.append(ga[r[keep]])
            out_b.append(gb[k[keep]])
            out_s.append(S[r[keep] - i, k[keep]])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s).astype(np.float32)


@ray.remote
def pairs_bucket(threshold: float, *blocks: Block) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs with cosine >= ``threshold`` in this bucket: side -> (gid in side 0, gid in that side, similarity).

    Side 0 holds pairs inside the dataset (``gid_a < gid_b``); side s > 0 pairs with the s-th ``--against`` dataset.
    """
    block_list = list(blocks)
    sides = sorted({b[0] for b in block_list})
    base = _by_cluster(block_list, 0)
    out: dict[int, list] = {s: [] for s in sides}
    for s in sides:
        other = base if s == 0 else _by_cluster(block_list, s)
        for c, A in base.items():
            if c in other:
                out[s].append(_pairs(c, A, other[c], threshold, same=s == 0))
    result = {}
    for s, parts in out.items():
        if parts:
            a, b, sim = (np.concatenate(x) for x in zip(*parts))
            if s == 0:
                a, b = np.minimum(a, b), np.maximum(a, b)
            result[s] = (a, b, sim)
    return result


def scatter(plan: Plan, parts: list[tuple[str, store.Part, int]]) -> list[list[ray.ObjectRef]]:
    """Start the scatter tasks; returns ``refs[bucket]`` = the blocks of that bucket from every part."""
    nb = plan.buckets
    plan_ref = ray.put(plan)
    per_part: list[list[ray.ObjectRef]] = []
    for path, part, side in parts:
        refs = scatter_part.options(num_returns=nb).remote(path, part, side, plan_ref)
        per_part.append(refs if isinstance(refs, list) else [refs])  # a list exactly when nb > 1
    return [[refs[b] for refs in per_part] for b in range(nb)]


def nearest_similarities(buckets: list[list[ray.ObjectRef]]) -> tuple[np.ndarray, np.ndarray]:
    """(gid, nearest-neighbour similarity) of every side-0 vector in ``buckets`` (max over its clusters)."""
    results = ray.get([nn_bucket.remote(*refs) for refs in buckets])
    gid = np.concatenate([g for g, _ in results]) if results else np.zeros(0, np.int64)
    sim = np.concatenate([s for _, s in results]) if results else np.zeros(0, np.float32)
    if not len(gid):
        return gid, sim
    order = np.lexsort((-sim, gid))  # per gid, best first
    gid, sim = gid[order], sim[order]
    first = np.r_[True, gid[1:] != gid[:-1]]
    return gid[first], sim[first]


def compare(buckets: list[list[ray.ObjectRef]], threshold: float) -> dict[int, tuple]:
    """All pairs with cosine >= ``threshold``: side -> (gid_a, gid_b, similarity), sorted by similarity desc."""
    merged: dict[int, list] = {}
    for res in ray.get([pairs_bucket.remote(threshold, *refs) for refs in buckets]):
        for s, trip in res.items():
            merged.setdefault(s, []).append(trip)
    out = {}
    for s, trips in merged.items():
        a, b, sim = (np.concatenate(x) for x in zip(*trips))
        order = np.lexsort((b, a, -sim))
        out[s] = (a[order], b[order], sim[order])
    return out
