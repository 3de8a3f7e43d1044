"""The offline evaluation job: embeddings + index -> ``metrics.json`` + ``report.html``.

Queries are a second encoded dataset (``--queries``) or a seeded sample of the gallery searched leave-one-out (the
query's own row removed from every result list). Relevance is "same label" or a TREC qrels file. Every ranking is
computed in query batches (faiss brute-force kernels for exact search), so no queries x gallery matrix is held at
once; rankings go to depth ``min(gallery, depth)`` (default 10,000: the full ranking for galleries up to that size).

Sections of ``metrics.json``: ``meta``, ``exact``, ``faiss`` (at the index's tuned nprobe/efSearch, plus
``recall_vs_exact@k``, ``qps``, latency), ``lsh`` (SimHash candidates re-ranked exactly), ``attention`` (per head),
and ``heads`` when other encodings of the same images are compared (``--compare``).

Example::

    metrics = evaluate("out/emb", "out/index", "out/eval")
    metrics["exact"]["map@r"], metrics["faiss"]["recall_vs_exact@10"]
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.compute as pc

from attnpipe import store
from attnpipe.evaluate import attention as attn_stats
from attnpipe.evaluate.metrics import DEFAULT_KS, ranking_metrics, read_qrels
from attnpipe.index import faiss_index as fx
from attnpipe.index.search import SearchIndex

QUERY_BATCH = 512
CARDS = 6


@dataclass
class Dataset:
    """The ok rows of an embeddings dataset, in memory (ids, vectors, labels, attention maps, boxes)."""

    path: str
    ids: np.ndarray
    X: np.ndarray
    labels: np.ndarray
    attention: np.ndarray
    boxes: np.ndarray
    pooling: str

    @classmethod
    def load(cls, path: str) -> Dataset:
        cols = ["id", "label", "embedding", "attention", "attn_h", "attn_w", "box"]
        t = store.read_embeddings(path, cols, filter=pc.field("status") == "ok")
        if t.num_rows == 0:
            raise ValueError(f"{path} has no ok rows to evaluate")
        emb, att = t.column("embedding").combine_chunks(), t.column("attention").combine_chunks()
        h, w = int(t.column("attn_h")[0].as_py()), int(t.column("attn_w")[0].as_py())
        X = emb.flatten().to_numpy().reshape(len(t), emb.type.list_size).astype(np.float32)
        A = att.flatten().to_numpy(zero_copy_only=False).reshape(len(t), h, w).astype(np.float32)
        box = t.column("box").to_pylist()
        boxes = np.array([b if b is not None else [np.nan] * 4 for b in box], np.float32).reshape(len(t), 4)
        pooling = store.dataset_metadata(path).get("attnpipe.pooling", "?")
        return cls(
            path,
            np.array(t.column("id").to_pylist(), object),
            X,
            np.array(t.column("label").to_pylist(), object),
            A,
            boxes,
            pooling,
        )


def evaluate(
    embeddings: str,
    index_root: str,
    out: str,
    queries: str | None = None,
    qrels: str | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    num_queries: int = 1000,
    depth: int = 10_000,
    seed: int = 0,
    compare: tuple[str, ...] = (),
    version: str | None = None,
) -> dict:
    """Run the whole evaluation and publish ``out/{metrics.json, report.html}`` atomically; returns the metrics."""
    from attnpipe.evaluate.report import write_report

    if queries and compare:
        raise ValueError("--compare evaluates gallery-sampled queries (leave-one-out); drop --queries to use it")
    start = time.perf_counter()
    gallery = Dataset.load(embeddings)
    index = SearchIndex.load(index_root, version)
    judged = read_qrels(qrels) if qrels else None
    q_ids, Q, q_labels, self_rows = _queries(gallery, queries, num_queries, seed, judged)
    is_rel, num_rel = _relevance(gallery, q_ids, q_labels, self_rows, judged)
    depth = min(len(gallery.ids), max(depth, max(ks)))
    _log(
        f"eval: {len(q_ids)} queries vs {len(gallery.ids)} gallery vectors, depth {depth}"
        f"{', leave-one-out' if self_rows is not None else ''}"
    )

    exact_rows = _exact_rankings(gallery.X, Q, depth, self_rows)
    metrics: dict = {"exact": ranking_metrics(is_rel(exact_rows), num_rel, ks)}
    to_rows = _rows_of_fids(index, gallery)  # faiss ids -> gallery rows, built once
    faiss_section, sweep = _faiss_section(index, to_rows, Q, self_rows, exact_rows, is_rel, num_rel, ks, depth)
    metrics["faiss"] = faiss_section
    lsh = _lsh_section(index, to_rows, gallery.X, Q, self_rows, exact_rows, is_rel, num_rel, ks)
    if lsh:
        metrics["lsh"] = lsh
    heads, entropies = {}, {}
    for ds in [gallery, *(Dataset.load(p) for p in compare)]:
        stats = attn_stats.per_image_stats(ds.attention, ds.boxes)
        heads[ds.pooling] = attn_stats.summarize(stats, list(ds.labels))
        entropies[ds.pooling] = stats["entropy"]
        if ds is not gallery:
            metrics.setdefault("heads", {gallery.pooling: metrics["exact"]})[ds.pooling] = _compare_exact(
                ds, q_ids, queries is None, depth, ks, qrels
            )
    metrics["attention"] = {"heads": heads}
    metrics["meta"] = {
        "embeddings": os.path.abspath(embeddings),
        "index": os.path.abspath(index_root),
        "version": index.manifest["version"],
        "queries": len(q_ids),
        "gallery": len(gallery.ids),
        "depth": depth,
        "leave_one_out": self_rows is not None,
        "relevance": "qrels" if qrels else "label",
        "model": store.dataset_metadata(embeddings).get("attnpipe.model"),
        "pooling": gallery.pooling,
        "factory": index.manifest["faiss"]["factory"],
        "seconds": round(time.perf_counter() - start, 2),
    }
    cards = _cards(gallery, q_ids, Q, exact_rows, is_rel, self_rows)
    stage = store.staging_dir(out)
    try:
        store.write_json(os.path.join(stage, "metrics.json"), metrics)
        write_report(os.path.join(stage, "report.html"), metrics, {"sweep": sweep, "entropy": entropies}, cards)
        store.publish(stage, out, overwrite=True)
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        raise
    _log(f"eval: wrote {os.path.join(out, 'metrics.json')} and {os.path.join(out, 'report.html')}")
    return metrics


def _queries(gallery: Dataset, queries: str | None, n: int, seed: int, judged: dict | None):
    """Query ids, vectors, labels, and each query's gallery row (None when the queries are another dataset).

    Gallery-sampled queries are drawn from the rows that can have relevant items: all rows for label relevance,
    the qrels' query ids for ``--qrels``.
    """
    if queries:
        q = Dataset.load(queries)
        return q.ids, q.X, q.labels, None
    pool = np.arange(len(gallery.ids)) if judged is None else np.flatnonzero([i in judged for i in gallery.ids])
    if len(pool) == 0:
        raise ValueError("no query id of the qrels file is in the gallery")
    rows = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    return gallery.ids[rows], gallery.X[rows], gallery.labels[rows], rows


def _relevance(gallery: Dataset, q_ids, q_labels, self_rows, judged: dict | None):
    """A function (rows (nq, depth), query subset) -> bool relevance, and R per query (self excluded in LOO)."""
    if judged is not None:
        row_of = {i: r for r, i in enumerate(gallery.ids)}
        rel_rows = [np.array(sorted(row_of[d] for d in judged.get(q, ()) if d in row_of), np.int64) for q in q_ids]
        if self_rows is not None:
            rel_rows = [r[r != s] for r, s in zip(rel_rows, self_rows)]
        num_rel = np.array([len(r) for r in rel_rows])

        def is_rel_judged(rows: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
            sets = rel_rows if q is None else [rel_rows[i] for i in q]
            return np.stack([np.isin(row, r) & (row >= 0) for row, r in zip(rows, sets)])

        return is_rel_judged, num_rel
    if all(lab is None for lab in q_labels) or all(lab is None for lab in gallery.labels):
        raise ValueError("relevance needs labels on queries and gallery, or a TREC qrels file (--qrels)")
    codes = {lab: c for c, lab in enumerate(sorted({x for x in gallery.labels if x is not None}))}
    g_code = np.array([codes.get(x, -1) for x in gallery.labels])
    q_code = np.array([codes.get(x, -2) if x is not None else -2 for x in q_labels])  # -2: matches nothing
    counts = np.bincount(g_code[g_code >= 0], minlength=len(codes))
    num_rel = np.where(q_code >= 0, counts[np.clip(q_code, 0, None)], 0) - (self_rows is not None)
    num_rel = np.maximum(num_rel, 0)

    def is_rel(rows: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
        """rows (nq, depth) of gallery rows (-1 = none) -> relevance; ``q`` selects a subset of the queries."""
        codes_q = q_code if q is None else q_code[q]
        return (rows >= 0) & (g_code[np.clip(rows, 0, None)] == codes_q[:, None])

    return is_rel, num_rel


def _drop_self(rows: np.ndarray, self_rows, depth: int) -> np.ndarray:
    if self_rows is None:
        return rows[:, :depth]
    drop = rows == self_rows[:, None]
    order = np.argsort(drop, axis=1, kind="stable")  # kept entries first, in rank order; self (if any) last
    out = np.take_along_axis(np.where(drop, -1, rows), order, 1)[:, :depth]
    if out.shape[1] < depth:
        out = np.pad(out, ((0, 0), (0, depth - out.shape[1])), constant_values=-1)
    return out


def _exact_rankings(X: np.ndarray, Q: np.ndarray, depth: int, self_rows) -> np.ndarray:
    """Gallery rows of the exact top-``depth`` per query, in batches of queries (faiss brute-force kernel)."""
    extra = self_rows is not None
    k = min(len(X), depth + extra)
    out = []
    for s in range(0, len(Q), QUERY_BATCH):
        _, I = faiss.knn(Q[s : s + QUERY_BATCH], X, k, metric=faiss.METRIC_INNER_PRODUCT)
        out.append(_drop_self(I, self_rows[s : s + QUERY_BATCH] if extra else None, depth))
    return np.concatenate(out)


def _rows_of_fids(index: SearchIndex, gallery: Dataset):
    """A vectorized map faiss ids -> gallery rows (-1 when unknown)."""
    row_of = {i: r for r, i in enumerate(gallery.ids)}
    fids, ids = index.id_map
    fid_rows = np.array([row_of.get(i, -1) for i in ids], np.int64)  # aligned with fids (sorted)

    def rows(I: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(fids, I), 0, len(fids) - 1)
        return np.where((I >= 0) & (fids[pos] == I), fid_rows[pos], -1)

    return rows


def _faiss_rows(index: SearchIndex, to_rows, Q: np.ndarray, k: int, self_rows) -> np.ndarray:
    extra = self_rows is not None
    out = []
    for s in range(0, len(Q), QUERY_BATCH):
        _, I = fx.search(index.indexes, Q[s : s + QUERY_BATCH], k + extra)
        out.append(_drop_self(to_rows(I), self_rows[s : s + QUERY_BATCH] if extra else None, k))
    return np.concatenate(out)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |a[:k] ∩ b[:k]| / k over queries (rows are gallery rows, -1 = none)."""
    hits = [len(set(x[:k][x[:k] >= 0]) & set(y[:k][y[:k] >= 0])) for x, y in zip(a, b)]
    return float(np.mean(hits) / k)


def _faiss_section(index, to_rows, Q, self_rows, exact_rows, is_rel, num_rel, ks, depth):
    rows = _faiss_rows(index, to_rows, Q, depth, self_rows)
    section = ranking_metrics(is_rel(rows), num_rel, ks)
    for k in ks:
        section[f"recall_vs_exact@{k}"] = _overlap(rows, exact_rows, k)
    k = max(ks)
    section["qps"], section["latency_ms_p50"], section["latency_ms_p99"] = _speed(index.indexes, Q, k)
    param = next((p for p in ("nprobe", "efSearch") if p in index.manifest["faiss"]), None)
    sweep = []
    if param:
        tuned = index.manifest["faiss"][param]
        section[param] = tuned
        _, values = fx.tune_param(index.indexes[0])
        for v in [v for v in values if v <= max(tuned * 8, 16)][:10]:
            fx.set_search_param(index.indexes, param, v)
            r = _faiss_rows(index, to_rows, Q, 10, self_rows)
            sweep.append(
                {
                    param: v,
                    "recall_vs_exact@10": _overlap(r, exact_rows, 10),
                    "qps": _speed(index.indexes, Q, 10, latency=False)[0],
                }
            )
        fx.set_search_param(index.indexes, param, tuned)
    return section, sweep


def _speed(indexes, Q: np.ndarray, k: int, latency: bool = True) -> tuple[float, float, float]:
    """Batch QPS (best of 3), and single-query latency p50/p99 in ms over up to 200 queries."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fx.search(indexes, Q, k)
        best = min(best, time.perf_counter() - t)
    if not latency:
        return len(Q) / best, 0.0, 0.0
    lat = []
    for q in Q[:200]:
        t = time.perf_counter()
        fx.search(indexes, q[None], k)
        lat.append((time.perf_counter() - t) * 1000)
    return len(Q) / best, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def _lsh_section(index, to_rows, X, Q, self_rows, exact_rows, is_rel, num_rel, ks) -> dict | None:
    """SimHash candidates (self removed) re-ranked by exact cosine; candidate recall of the exact top-10."""
    path = os.path.join(index.manifest["path"], "lsh", "simhash")
    if not os.path.isdir(path):
        return None
    from attnpipe.index.lsh import SimHashLSH

    depth = max(ks)
    rows = np.full((len(Q), depth), -1, np.int64)
    found, sizes = [], []
    for i, fids in enumerate(SimHashLSH.load(path).candidates(Q)):
        cand = to_rows(np.asarray(fids, np.int64))
        cand = cand[(cand >= 0) & (cand != (self_rows[i] if self_rows is not None else -2))]
        top = cand[np.argsort(-(X[cand] @ Q[i]), kind="stable")[:depth]]
        rows[i, : len(top)] = top
        truth = exact_rows[i, :10][exact_rows[i, :10] >= 0]
        found.append(np.isin(truth, cand).mean() if len(truth) else 1.0)
        sizes.append(len(cand))
    section = ranking_metrics(is_rel(rows), num_rel, ks)
    section["candidate_recall@10"] = float(np.mean(found))
    section["mean_candidates"] = float(np.mean(sizes))
    return section


def _compare_exact(ds: Dataset, q_ids, leave_one_out: bool, depth: int, ks, qrels) -> dict:
    """Exact metrics of another encoding of the same images, for the same query ids."""
    row_of = {i: r for r, i in enumerate(ds.ids)}
    rows = np.array([row_of[q] for q in q_ids if q in row_of], np.int64)
    self_rows = rows if leave_one_out else None
    is_rel, num_rel = _relevance(ds, ds.ids[rows], ds.labels[rows], self_rows, read_qrels(qrels) if qrels else None)
    return ranking_metrics(is_rel(_exact_rankings(ds.X, ds.X[rows], min(depth, len(ds.ids)), self_rows)), num_rel, ks)


def _cards(gallery: Dataset, q_ids, Q, exact_rows, is_rel, self_rows, k: int = 5) -> list[dict]:
    """A few queries with their attention map and top-k exact results, with the original image bytes."""
    picks = np.arange(min(CARDS, len(q_ids)))
    rel = is_rel(exact_rows[picks, :k], picks)
    wanted = {q_ids[i] for i in picks} | {gallery.ids[r] for i in picks for r in exact_rows[i, :k] if r >= 0}
    images = _fetch_images(gallery.path, wanted)
    cards = []
    for j, i in enumerate(picks):
        qrow = self_rows[i] if self_rows is not None else None
        cards.append(
            {
                "query_id": q_ids[i],
                "label": gallery.labels[qrow] if qrow is not None else None,
                "image": images.get(q_ids[i]),
                "attention": gallery.attention[qrow] if qrow is not None else None,
                "box": None if qrow is None or np.isnan(gallery.boxes[qrow]).any() else gallery.boxes[qrow].tolist(),
                "results": [
                    {
                        "id": gallery.ids[r],
                        "score": float(gallery.X[r] @ Q[i]),
                        "relevant": bool(rel[j, c]),
                        "image": images.get(gallery.ids[r]),
                    }
                    for c, r in enumerate(exact_rows[i, :k])
                    if r >= 0
                ],
            }
        )
    return cards


def _fetch_images(embeddings: str, ids: set[str]) -> dict[str, bytes]:
    """Original image bytes for ``ids``, re-read from the source shards named in the manifest (best effort)."""
    from attnpipe.data.readers import read_unit
    from attnpipe.data.shards import discover, read_units

    manifest = store.read_manifest(embeddings)
    shards = {i.split("/", 1)[0] for i in ids}
    uris = [s["uri"] for s in manifest["shards"] if s["name"] in shards and s.get("format") != "synthetic"]
    out: dict[str, bytes] = {}
    try:
        found = [s for s in discover(uris) if s.name in shards] if uris else []
    except (ValueError, OSError):  # sources moved or gone: the report shows placeholders
        return out
    for unit in read_units(found):
        table = read_unit(unit, 64 << 20)
        for rid, data in zip(table.column("id").to_pylist(), table.column("data").to_pylist()):
            if rid in ids and data:
                out[rid] = data
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def headline(metrics: dict) -> str:
    """One line of the numbers people look at first."""
    e, f = metrics["exact"], metrics.get("faiss", {})
    parts = [f"exact map@r {e['map@r']:.3f}", f"precision@1 {e['precision@1']:.3f}", f"ndcg@10 {e['ndcg@10']:.3f}"]
    if f:
        parts.append(f"faiss recall_vs_exact@10 {f['recall_vs_exact@10']:.3f} at {f.get('qps', 0):,.0f} QPS")
    if "lsh" in metrics:
        parts.append(f"lsh candidate_recall@10 {metrics['lsh']['candidate_recall@10']:.3f}")
    return ", ".join(parts)


def dumps(metrics: dict) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True)
