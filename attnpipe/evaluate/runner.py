"""The offline evaluation job: embeddings + index -> ``metrics.json`` + ``report.html``, streaming the gallery.

Queries are a second encoded dataset (``--queries``) or a seeded sample of the gallery searched leave-one-out (the
query's own row removed from every result list). Relevance is "same label" or a TREC qrels file. The driver holds
the index, the queries and their rankings (to depth ``min(gallery, depth)``, default 10,000); the gallery is read
part by part, once (:mod:`attnpipe.evaluate.exact`: exact top-k, relevance of every ranked result, relevant counts
and attention statistics, merged as parts finish), so memory does not grow with the gallery. The index is loaded
for the ANN rankings, released for the gallery pass, and loaded again for speed and the nprobe sweep: the driver
peak is the larger of (index) and (one part), plus the queries' rankings.

Sections of ``metrics.json``: ``meta``, ``exact``, ``faiss`` (at the index's tuned nprobe/efSearch, plus
``recall_vs_exact@k``, ``qps``, latency), ``lsh`` (SimHash candidates re-ranked exactly), ``attention`` (per head),
and ``heads`` when other encodings of the same images are compared (``--compare``).

Example::

    metrics = evaluate("out/emb", "out/index", "out/eval")
    metrics["exact"]["map@r"], metrics["faiss"]["recall_vs_exact@10"]
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from attnpipe import fs, store
from attnpipe.evaluate import cards as card_mod
from attnpipe.evaluate import exact
from attnpipe.evaluate.metrics import DEFAULT_KS, ranking_metrics, read_qrels
from attnpipe.index import faiss_index as fx
from attnpipe.index import layout
from attnpipe.index.build import ok_counts

QUERY_BATCH = 512
TUNE_K = 10


@dataclass
class Queries:
    """The evaluation queries, in memory: ids, vectors, labels, faiss ids in their own dataset, and the dataset."""

    ids: list[str]
    Q: np.ndarray
    labels: list
    fids: np.ndarray
    dataset: store.Dataset
    leave_one_out: bool

    @property
    def self_fids(self) -> np.ndarray | None:
        return self.fids if self.leave_one_out else None


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
    workers: int = 0,
) -> dict:
    """Run the whole evaluation and publish ``out/{metrics.json, report.html}`` atomically; returns the metrics.

    Raises:
        layout.IndexLayoutError: the index was built from another state of the embeddings (or is damaged).
        ValueError: no ok rows, no labels and no qrels, or ``--compare`` with ``--queries``.
    """
    if queries and compare:
        raise ValueError("--compare evaluates gallery-sampled queries (leave-one-out); drop --queries to use it")
    ks = tuple(dict.fromkeys(int(k) for k in ks))
    start = time.perf_counter()
    gallery = store.open_dataset(embeddings)
    manifest = layout.load_manifest(index_root, version, verify=True)
    check_source(manifest, gallery)
    indexes = fx.load_version(manifest)
    workers = workers or _default_workers()
    counts = ok_counts(gallery)
    n = sum(counts)
    if n == 0:
        raise ValueError(f"{embeddings} has no ok rows to evaluate")
    judged = read_qrels(qrels) if qrels else None
    q = _queries(gallery, counts, queries, num_queries, seed, judged)
    if judged is None and all(x is None for x in q.labels):
        raise ValueError("relevance needs labels on queries and gallery, or a TREC qrels file (--qrels)")
    depth = min(n, max(depth, max(ks)))
    _log(
        f"eval: {len(q.ids)} queries vs {n} gallery vectors, depth {depth}"
        f"{', leave-one-out' if q.leave_one_out else ''}"
    )
    # ANN rankings and LSH candidates first (driver, index only); the gallery pass resolves their relevance.
    faiss_ids = _faiss_ids(indexes, q.Q, depth, q.self_fids)
    del indexes  # not held during the gallery pass: the driver holds the index or one part, never both
    lsh_cands = _lsh_candidates(manifest, q)
    extra = lsh_cands or []
    pair_q = np.concatenate([np.repeat(np.arange(len(q.ids)), depth), *(np.full(len(c), i) for i, c in extra)])
    pair_f = np.concatenate([faiss_ids.ravel(), *(c for _, c in extra)])
    valid = pair_f >= 0
    sel = np.flatnonzero(valid)
    spec = _spec(q, judged, depth, n)
    scan = exact.scan(gallery, spec, pair_q[sel], pair_f[sel], workers, seed)
    if judged is None and not scan.label_counts:
        raise ValueError("relevance needs labels on queries and gallery, or a TREC qrels file (--qrels)")
    rel_all = np.zeros(len(pair_f), bool)
    rel_all[sel] = scan.pair_rel
    score_all = np.full(len(pair_f), np.nan, np.float32)
    score_all[sel] = scan.pair_score
    exact_ids, exact_rel = exact.drop_self(scan.exact_ids, scan.exact_rel, q.self_fids, depth)
    exact_scores = _scores_after_drop(scan, q.self_fids, depth)

    metrics: dict = {"exact": ranking_metrics(exact_rel, scan.num_rel, ks)}
    nf = len(q.ids) * depth
    faiss_rel = rel_all[:nf].reshape(len(q.ids), depth)
    indexes = fx.load_version(manifest)  # again, for speed and the nprobe sweep against the exact rankings
    metrics["faiss"], sweep = _faiss_section(manifest, indexes, q, faiss_ids, faiss_rel, exact_ids, scan, ks)
    del indexes
    if lsh_cands is not None:
        metrics["lsh"] = _lsh_section(lsh_cands, rel_all[nf:], score_all[nf:], exact_ids, scan.num_rel, ks)
    pooling = gallery.metadata().get("attnpipe.pooling", "?")
    heads = {pooling: _head_summary(scan)}
    entropies = {pooling: np.concatenate(scan.entropies) if scan.entropies else np.zeros(0)}
    for path in compare:
        other, ometrics, oscan = _compare(path, q, judged, depth, ks, workers, seed)
        name = other.metadata().get("attnpipe.pooling", "?")
        heads[name] = _head_summary(oscan)
        entropies[name] = np.concatenate(oscan.entropies) if oscan.entropies else np.zeros(0)
        metrics.setdefault("heads", {pooling: metrics["exact"]})[name] = ometrics
    metrics["attention"] = {"heads": heads}
    metrics["meta"] = {
        "embeddings": fs.display(embeddings),
        "index": fs.display(index_root),
        "version": manifest["version"],
        "queries": len(q.ids),
        "gallery": n,
        "depth": depth,
        "leave_one_out": q.leave_one_out,
        "relevance": "qrels" if qrels else "label",
        "model": gallery.metadata().get("attnpipe.model"),
        "pooling": pooling,
        "factory": manifest["faiss"]["factory"],
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    picks = card_mod.pick_queries(q.ids)
    cards = card_mod.build_cards(gallery, q.dataset, picks, q.ids, q.fids, exact_ids, exact_scores, exact_rel)
    from attnpipe.evaluate.report import write_report  # matplotlib: loaded after the gallery pass, not during it

    stage = store.staging_dir(out)
    store.write_json(os.path.join(stage, "metrics.json"), metrics)
    write_report(os.path.join(stage, "report.html"), metrics, {"sweep": sweep, "entropy": entropies}, cards)
    store.publish(stage, out, kind="eval", overwrite=True)
    _log(f"eval: wrote {fs.join(out, 'metrics.json')} and {fs.join(out, 'report.html')}")
    return metrics


def check_source(manifest: dict, gallery: store.Dataset) -> None:
    """Refuse an index built from another state of the embeddings: its faiss ids would name other rows.

    Raises:
        layout.IndexLayoutError: the version records another embeddings manifest checksum.
    """
    recorded = manifest.get("source", {}).get("manifest_sha256")
    if recorded is not None and recorded != gallery.manifest_sha256:
        raise layout.IndexLayoutError(
            f"index version {manifest['version']} under {fs.display(os.path.dirname(manifest['path']))} was built "
            f"from another state of the embeddings than {fs.display(gallery.path)} (manifest checksum differs); "
            "run `attnpipe reindex` (or `attnpipe index`) to bring the index up to date, then evaluate again"
        )


def _default_workers() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


def _spec(q: Queries, judged: dict | None, depth: int, n: int) -> exact.Spec:
    return exact.Spec(
        Q=q.Q,
        labels=list(q.labels),
        self_fids=q.self_fids,
        judged=None if judged is None else [judged.get(i, set()) for i in q.ids],
        k=min(n, depth + q.leave_one_out),
        entropy_rate=min(1.0, exact.ENTROPY_SAMPLE / max(n, 1)),
        self_ids=list(q.ids) if q.leave_one_out else None,
    )


def _scores_after_drop(scan: exact.Scan, self_fids, depth: int) -> np.ndarray:
    if self_fids is None:
        return scan.exact_scores[:, :depth]
    drop = scan.exact_ids == self_fids[:, None]
    order = np.argsort(drop, axis=1, kind="stable")
    out = np.take_along_axis(np.where(drop, -np.inf, scan.exact_scores), order, 1)[:, :depth]
    return np.pad(out, ((0, 0), (0, depth - out.shape[1])), constant_values=-np.inf)


def _queries(gallery: store.Dataset, counts: list[int], queries: str | None, n: int, seed: int, judged) -> Queries:
    """Read the queries: the whole ``queries`` dataset, or a seeded sample of gallery rows (part by part).

    Gallery-sampled queries are drawn from the rows that can have relevant items: all ok rows for label relevance,
    the qrels' query ids for ``--qrels``; row ``r`` is the ``r``-th ok row in part-number order.
    """
    if queries:
        qds = store.open_dataset(queries)
        ids, X, labels, fids = _read_rows(qds, None)
        if not ids:
            raise ValueError(f"{queries} has no ok rows to evaluate")
        return Queries(ids, X, labels, fids, qds, False)
    offsets = np.cumsum([0, *counts])
    if judged is None:
        pool = np.arange(offsets[-1])
    else:
        found: list[int] = []
        for p, off in zip(gallery.parts(), offsets):
            ids = store.read_part(gallery.path, p, ["id"], ok_only=True).column("id").to_pylist()
            found.extend(off + r for r, i in enumerate(ids) if i in judged)
        pool = np.array(found, np.int64)
    if len(pool) == 0:
        raise ValueError("no query id of the qrels file is in the gallery")
    rows = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    ids, X, labels, fids = _read_rows(gallery, (rows, offsets))
    return Queries(ids, X, labels, fids, gallery, True)


def _read_rows(ds: store.Dataset, picked) -> tuple[list[str], np.ndarray, list, np.ndarray]:
    """Ids, vectors, labels and faiss ids of all ok rows (``picked`` None) or of the given global rows."""
    ids, Xs, labels, fids = [], [], [], []
    for i, p in enumerate(ds.parts()):
        if picked is not None:
            rows, offsets = picked
            local = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
            if not len(local):
                continue
        t = store.read_part(ds.path, p, ["id", "label", "embedding"], ok_only=True)
        if picked is None:
            local = np.arange(t.num_rows)
        t = t.take(local)
        ids += t.column("id").to_pylist()
        labels += t.column("label").to_pylist()
        if t.num_rows:
            Xs.append(store.embedding_matrix(t))
        fids.append((np.int64(p.number) << 32) | local.astype(np.int64))
    X = np.concatenate(Xs) if Xs else np.zeros((0, 0), np.float32)
    return ids, np.ascontiguousarray(X, np.float32), labels, np.concatenate(fids) if fids else np.zeros(0, np.int64)


def _faiss_ids(indexes, Q: np.ndarray, depth: int, self_fids) -> np.ndarray:
    """ANN faiss ids to ``depth`` per query (self dropped), in query batches."""
    extra = self_fids is not None
    out = []
    for s in range(0, len(Q), QUERY_BATCH):
        _, I = fx.search(indexes, Q[s : s + QUERY_BATCH], depth + extra)
        sf = self_fids[s : s + QUERY_BATCH] if extra else None
        out.append(exact.drop_self(I, np.zeros(I.shape, bool), sf, depth)[0])
    return np.concatenate(out)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |a[:k] ∩ b[:k]| / k over queries (faiss ids, -1 = none)."""
    hits = [len(set(x[:k][x[:k] >= 0]) & set(y[:k][y[:k] >= 0])) for x, y in zip(a, b)]
    return float(np.mean(hits) / k)


def _faiss_section(manifest, indexes, q: Queries, ids, rel, exact_ids, scan: exact.Scan, ks) -> tuple[dict, list]:
    section = ranking_metrics(rel, scan.num_rel, ks)
    for k in ks:
        section[f"recall_vs_exact@{k}"] = _overlap(ids, exact_ids, k)
    section["qps"], section["latency_ms_p50"], section["latency_ms_p99"] = _speed(indexes, q.Q, max(ks))
    param = next((p for p in ("nprobe", "efSearch") if p in manifest["faiss"]), None)
    sweep = []
    if param:
        tuned = manifest["faiss"][param]
        section[param] = tuned
        _, values = fx.tune_param(indexes[0])
        for v in [v for v in values if v <= max(tuned * 8, 16)][:10]:
            fx.set_search_param(indexes, param, v)
            found = _faiss_ids(indexes, q.Q, TUNE_K, q.self_fids)
            sweep.append(
                {
                    param: v,
                    f"recall_vs_exact@{TUNE_K}": _overlap(found, exact_ids, TUNE_K),
                    "qps": _speed(indexes, q.Q, TUNE_K, latency=False)[0],
                }
            )
        fx.set_search_param(indexes, param, tuned)
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
    for v in Q[:200]:
        t = time.perf_counter()
        fx.search(indexes, v[None], k)
        lat.append((time.perf_counter() - t) * 1000)
    return len(Q) / best, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def _lsh_candidates(manifest: dict, q: Queries) -> list[tuple[int, np.ndarray]] | None:
    """SimHash candidate faiss ids per query (self removed), or None without SimHash tables."""
    if "simhash" not in manifest.get("lsh", {}):
        return None
    from attnpipe.index.lsh import SimHashLSH

    table = SimHashLSH.load(os.path.join(manifest["path"], "lsh", "simhash"))
    out = []
    for i, fids in enumerate(table.candidates(q.Q)):
        c = np.asarray(fids, np.int64)
        if q.leave_one_out:
            c = c[c != q.fids[i]]
        out.append((i, c[c >= 0]))
    return out


def _lsh_section(cands, rel: np.ndarray, score: np.ndarray, exact_ids, num_rel, ks) -> dict:
    """Candidates re-ranked by their exact cosine (``SimHashLSH.search`` order); candidate recall of the exact
    top-10. ``rel``/``score`` hold every candidate of every query, concatenated in query order."""
    depth = max(ks)
    nq = len(cands)
    rows = np.zeros((nq, depth), bool)
    found, sizes = [], []
    pos = 0
    for i, c in cands:
        s, r = score[pos : pos + len(c)], rel[pos : pos + len(c)]
        pos += len(c)
        known = ~np.isnan(s)  # a candidate id not in the gallery is dropped
        c, s, r = c[known], s[known], r[known]
        top = np.argsort(-s, kind="stable")[:depth]
        rows[i, : len(top)] = r[top]
        truth = exact_ids[i, :TUNE_K][exact_ids[i, :TUNE_K] >= 0]
        found.append(np.isin(truth, c).mean() if len(truth) else 1.0)
        sizes.append(len(c))
    section = ranking_metrics(rows, num_rel, ks)
    section[f"candidate_recall@{TUNE_K}"] = float(np.mean(found))
    section["mean_candidates"] = float(np.mean(sizes))
    return section


def _head_summary(scan: exact.Scan) -> dict:
    out = scan.attention.summary()
    edges = np.linspace(0.0, 1.0, len(scan.attention.entropy_counts) + 1)
    out["entropy_histogram"] = {"edges": edges.tolist(), "counts": scan.attention.entropy_counts.tolist()}
    return out


def _compare(path: str, q: Queries, judged, depth: int, ks, workers: int, seed: int):
    """Exact metrics and attention statistics of another encoding of the same images, for the same query ids."""
    other = store.open_dataset(path)
    want = set(q.ids)
    ids: list[str] = []
    X: list[np.ndarray] = []
    labels: list = []
    fids: list[np.ndarray] = []
    for p in other.parts():
        t = store.read_part(other.path, p, ["id", "label", "embedding"], ok_only=True)
        rows = np.flatnonzero([i in want for i in t.column("id").to_pylist()])
        if len(rows):
            t = t.take(rows)
            ids += t.column("id").to_pylist()
            labels += t.column("label").to_pylist()
            X.append(store.embedding_matrix(t))
            fids.append((np.int64(p.number) << 32) | rows.astype(np.int64))
    order = {i: j for j, i in enumerate(ids)}  # the gallery's query order
    perm = [order[i] for i in q.ids if i in order]
    oq = Queries(
        [ids[j] for j in perm],
        np.ascontiguousarray(np.concatenate(X)[perm], np.float32),
        [labels[j] for j in perm],
        np.concatenate(fids)[perm],
        other,
        True,
    )
    n = sum(ok_counts(other))
    d = min(depth, n)
    scan = exact.scan(other, _spec(oq, judged, d, n), workers=workers, seed=seed)
    _, rel = exact.drop_self(scan.exact_ids, scan.exact_rel, oq.self_fids, d)
    return other, ranking_metrics(rel, scan.num_rel, ks), scan


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def headline(metrics: dict) -> str:
    """One line of the numbers people look at first (the cut-offs the evaluation used, 10 when present)."""
    e, f = metrics["exact"], metrics.get("faiss", {})
    ks = sorted(int(k.split("@")[1]) for k in e if k.startswith("ndcg@"))
    k = 10 if 10 in ks else ks[-1] if ks else 10
    parts = [f"exact map@r {e['map@r']:.3f}", f"precision@{ks[0] if ks else 1} {e.get(f'precision@{ks[0]}', 0):.3f}"]
    parts.append(f"ndcg@{k} {e.get(f'ndcg@{k}', 0):.3f}")
    if f:
        parts.append(f"faiss recall_vs_exact@{k} {f.get(f'recall_vs_exact@{k}', 0):.3f} at {f.get('qps', 0):,.0f} QPS")
    if "lsh" in metrics:
        parts.append(f"lsh candidate_recall@10 {metrics['lsh']['candidate_recall@10']:.3f}")
    return ", ".join(parts)
