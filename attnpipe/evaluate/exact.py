"""The gallery pass of the evaluation: every part read once, by Ray tasks or on the driver, merged as it arrives.

For a batch of queries, each part yields its exact top-k (faiss ids ``part << 32 | row`` with their scores and
relevance), the relevance and exact score of the (query, faiss id) pairs other rankings returned (ANN results, LSH
candidates) that fall in the part, its share of each query's relevant count, and mergeable attention-statistic sums.
The driver merges the part results one at a time, so it holds the queries, one part result and the merged top-k:
never the gallery.

Relevance is "same label" (both labels set) or a qrels judgment (``judged``: per query, the set of relevant ids).

Example::

    spec = Spec(Q, q_labels, self_fids, judged=None, k=101)
    out = scan(store.open_dataset("emb/"), spec, pairs, workers=2)
    out.exact_ids, out.exact_rel, out.num_rel, out.pair_rel, out.attention.summary()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from attnpipe import log, store
from attnpipe.evaluate import attention as attn_stats
from attnpipe.index import faiss_index as fx

ENTROPY_SAMPLE = 50_000  # per-image entropies kept for the report's histogram (a uniform sample beyond this)
ATTN_COLUMNS = ["attention", "attn_h", "attn_w", "box"]


@dataclass
class Spec:
    """What each part computes for the queries: ``k`` exact neighbours (self included), relevance, attention."""

    Q: np.ndarray  # (nq, D) float32
    labels: list  # (nq,) query labels (label relevance)
    self_fids: np.ndarray | None  # (nq,) faiss ids of gallery-sampled queries (leave-one-out), else None
    judged: list[set[str]] | None  # qrels: relevant ids per query, else None (label relevance)
    k: int
    attention: bool = True
    entropy_rate: float = 1.0  # share of images whose entropy is kept for the histogram
    self_ids: list[str] | None = None  # string ids of the queries (qrels leave-one-out)


@dataclass
class Scan:
    """The merged result of a gallery pass."""

    exact_scores: np.ndarray  # (nq, k) descending, -inf padding
    exact_ids: np.ndarray  # (nq, k) faiss ids, -1 padding
    exact_rel: np.ndarray  # (nq, k) bool
    num_rel: np.ndarray  # (nq,) relevant gallery items per query, self excluded
    pair_rel: np.ndarray  # (npairs,) bool, in the order of the pairs given
    pair_score: np.ndarray  # (npairs,) float32 exact score (NaN: faiss id not in the gallery)
    attention: attn_stats.Totals = field(default_factory=attn_stats.Totals)
    entropies: list[np.ndarray] = field(default_factory=list)
    label_counts: Counter = field(default_factory=Counter)
    gallery: int = 0


def part_fids(number: int, n: int) -> np.ndarray:
    return (np.int64(number) << 32) | np.arange(n, dtype=np.int64)


def scan_part(path: str, part: store.Part, spec: Spec, pair_q: np.ndarray, pair_fid: np.ndarray, seed: int) -> dict:
    """One part's contribution (see the module doc); plain arguments, so it runs as a Ray task."""
    cols = (
        ["label", "embedding"] + (["id"] if spec.judged is not None else []) + (ATTN_COLUMNS if spec.attention else [])
    )
    t = store.read_part(path, part, cols, ok_only=True)
    n = t.num_rows
    nq = len(spec.Q)
    fids = part_fids(part.number, n)
    X = store.embedding_matrix(t) if n else np.zeros((0, spec.Q.shape[1]), np.float32)
    D, I = fx.exact_topk(X, fids, spec.Q, spec.k)
    local = np.where(I >= 0, I & 0xFFFFFFFF, 0)
    rows = pair_fid & 0xFFFFFFFF
    label_col = t.column("label")
    labels: list | None = None  # Python label strings, only for attention statistics per label
    if spec.judged is None:
        # label codes in Arrow (no Python object per row): the query labels' positions, -1 for other/None labels
        q_labels = list(dict.fromkeys(x for x in spec.labels if x is not None))
        code_of = {lab: c for c, lab in enumerate(q_labels)}
        q_code = np.array([code_of[x] if x is not None else -2 for x in spec.labels], np.int64)  # -2: matches nothing
        idx = pc.index_in(label_col, value_set=pa.array(q_labels, pa.string()))
        g_code = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        rel = (I >= 0) & (g_code[local] == q_code[:, None]) if n else np.zeros(I.shape, bool)
        pair_rel = g_code[rows] == q_code[pair_q] if len(rows) else np.zeros(0, bool)
        vc = pc.value_counts(label_col.drop_null()) if n else None
        label_counts = Counter(
            dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())) if vc is not None else {}
        )
        num_rel = np.zeros(nq, np.int64)  # from label_counts on the driver
    else:
        ids = t.column("id").to_pylist()
        id_arr = np.array(ids, object)
        rel = np.stack([np.isin(id_arr[local[i]], list(spec.judged[i])) for i in range(nq)]) if n else I >= 0
        rel &= I >= 0
        pair_rel = np.array([id_arr[r] in spec.judged[q] for q, r in zip(pair_q, rows)], bool)
        present = set(ids)
        num_rel = np.array([len(j & present) for j in spec.judged], np.int64)
        if spec.self_ids is not None:  # leave-one-out: the query itself is not one of its relevant items
            num_rel -= np.array([s in j and s in present for s, j in zip(spec.self_ids, spec.judged)], np.int64)
        label_counts = Counter()
    pair_score = np.einsum("ij,ij->i", X[rows], spec.Q[pair_q]) if len(rows) else np.zeros(0, np.float32)
    out = {
        "D": D,
        "I": I,
        "rel": rel,
        "num_rel": num_rel,
        "pair_rel": pair_rel,
        "pair_score": pair_score.astype(np.float32),
        "label_counts": label_counts,
        "rows": n,
        "totals": None,
        "entropy": np.zeros(0),
    }
    if spec.attention and n:
        h, w = int(t.column("attn_h")[0].as_py()), int(t.column("attn_w")[0].as_py())
        att = t.column("attention").combine_chunks()
        A = att.flatten().to_numpy(zero_copy_only=False).reshape(n, h, w).astype(np.float32)  # (n, h*w) -> (n, h, w)
        box = t.column("box")
        valid = box.is_valid().to_numpy(zero_copy_only=False)
        B = np.full((n, 4), np.nan, np.float32)
        if valid.any():
            B[valid] = store.embedding_matrix(t.filter(pc.is_valid(box)), "box")
        stats = attn_stats.per_image_stats(A, B)
        totals = attn_stats.Totals()
        totals.add(stats, labels if labels is not None else label_col.to_pylist())
        keep = np.random.default_rng([seed, part.number]).random(n) < spec.entropy_rate
        out["totals"], out["entropy"] = totals, stats["entropy"][keep]
    return out


def route_pairs(pair_fid: np.ndarray, numbers: list[int]) -> dict[int, np.ndarray]:
    """Indices of the pairs whose faiss id falls in each part number (ids of unknown parts are left out)."""
    part = pair_fid >> 32
    order = np.argsort(part, kind="stable")
    sorted_part = part[order]
    out = {}
    for number in numbers:
        lo, hi = np.searchsorted(sorted_part, [number, number + 1])
        out[number] = order[lo:hi]
    return out


def scan(
    ds: store.Dataset,
    spec: Spec,
    pair_q: np.ndarray | None = None,
    pair_fid: np.ndarray | None = None,
    workers: int = 1,
    seed: int = 0,
) -> Scan:
    """Run :func:`scan_part` over every part of ``ds`` and merge (Ray tasks when ``workers > 1`` and Ray is up)."""
    pair_q = np.zeros(0, np.int64) if pair_q is None else np.asarray(pair_q, np.int64)
    pair_fid = np.zeros(0, np.int64) if pair_fid is None else np.asarray(pair_fid, np.int64)
    parts = ds.parts()
    routed = route_pairs(pair_fid, [p.number for p in parts])
    nq = len(spec.Q)
    empty = fx.exact_topk(np.zeros((0, spec.Q.shape[1]), np.float32), np.zeros(0, np.int64), spec.Q, spec.k)
    result = Scan(
        *empty,
        np.zeros((nq, spec.k), bool),
        np.zeros(nq, np.int64),
        np.zeros(len(pair_fid), bool),
        np.full(len(pair_fid), np.nan, np.float32),
    )
    jobs = [(p, routed[p.number]) for p in parts]
    results = log.progress(
        _run(ds.path, spec, jobs, pair_q, pair_fid, workers, seed), "eval: gallery", len(jobs), "part"
    )
    for r, (_, sel) in zip(results, jobs):  # results first: its progress line logs when it is exhausted
        result.exact_scores, result.exact_ids, result.exact_rel = merge_topk(
            (result.exact_scores, result.exact_ids, result.exact_rel), (r["D"], r["I"], r["rel"]), spec.k
        )
        result.num_rel += r["num_rel"]
        result.pair_rel[sel] = r["pair_rel"]
        result.pair_score[sel] = r["pair_score"]
        result.label_counts.update(r["label_counts"])
        result.gallery += r["rows"]
        if r["totals"] is not None:
            result.attention.merge(r["totals"])
            result.entropies.append(r["entropy"])
    if spec.judged is None:
        counts = result.label_counts
        result.num_rel = np.array([counts.get(x, 0) if x is not None else 0 for x in spec.labels], np.int64)
        if spec.self_fids is not None:
            result.num_rel = np.maximum(result.num_rel - 1, 0)
    return result


def _run(path: str, spec: Spec, jobs, pair_q, pair_fid, workers: int, seed: int) -> Iterator[dict]:
    """Part results in part order: Ray tasks (at most ``2 * workers`` in flight) or in this process."""
    import ray

    def args(job):
        part, sel = job
        return path, part, spec, pair_q[sel], pair_fid[sel], seed

    if workers <= 1 or len(jobs) <= 1 or not ray.is_initialized():
        for job in jobs:
            yield scan_part(*args(job))
        return
    task: Any = ray.remote(scan_part)
    spec_ref = ray.put(spec)
    pending: list = []
    for job in jobs:
        a = args(job)
        pending.append(task.remote(a[0], a[1], spec_ref, *a[3:]))
        if len(pending) >= 2 * workers:
            yield ray.get(pending.pop(0))
    while pending:
        yield ray.get(pending.pop(0))


def merge_topk(a: tuple, b: tuple, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two (scores, faiss ids, payload) top lists per query (higher score first, ``a`` first on ties)."""
    D = np.concatenate([a[0], b[0]], axis=1)
    I = np.concatenate([a[1], b[1]], axis=1)
    P = np.concatenate([a[2], b[2]], axis=1)
    D = np.where(I < 0, -np.inf, D)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1), np.take_along_axis(P, order, 1)


def drop_self(I: np.ndarray, payload: np.ndarray, self_fids: np.ndarray | None, depth: int):
    """Leave-one-out: remove each query's own faiss id from its row (kept order), pad with -1 / False to ``depth``."""
    if self_fids is None:
        return I[:, :depth], payload[:, :depth]
    drop = I == self_fids[:, None]
    order = np.argsort(drop, axis=1, kind="stable")  # kept entries first, in rank order; self (if any) last
    I = np.take_along_axis(np.where(drop, -1, I), order, 1)[:, :depth]
    P = np.take_along_axis(np.where(drop, False, payload), order, 1)[:, :depth]
    if I.shape[1] < depth:
        pad = depth - I.shape[1]
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        P = np.pad(P, ((0, 0), (0, pad)), constant_values=False)
    return I, P
