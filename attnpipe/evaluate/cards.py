"""Query cards of the evaluation report: a few queries from across shards, their attention, top hits, images.

Only the rows shown are read: the parts holding the picked queries and their hits (by faiss id
``part << 32 | row``), and the source shards holding their images (:func:`attnpipe.data.fetch.fetch_images`).

Example::

    picks = pick_queries(q_ids)                                   # query positions, spread over shards
    cards = build_cards(gallery, queries, picks, q_ids, q_fids, exact_ids, exact_scores, exact_rel)
"""

from __future__ import annotations

import numpy as np

from attnpipe import store

CARDS = 6
CARD_COLUMNS = ["id", "label", "attention", "attn_h", "attn_w", "box", "attn_entropy", "attn_peak"]


def pick_queries(q_ids: list[str], n: int = CARDS) -> list[int]:
    """Up to ``n`` query positions, round-robin over the shards the queries come from (first query of each first)."""
    by_shard: dict[str, list[int]] = {}
    for i, q in enumerate(q_ids):
        by_shard.setdefault(str(q).split("/", 1)[0], []).append(i)
    queues = [list(v) for _, v in sorted(by_shard.items())]
    picks: list[int] = []
    while len(picks) < min(n, len(q_ids)):
        for queue in queues:
            if queue and len(picks) < n:
                picks.append(queue.pop(0))
    return sorted(picks)


def read_rows(ds: store.Dataset, fids: list[int], columns: list[str] = CARD_COLUMNS) -> dict[int, dict]:
    """The ok rows with faiss ids ``fids`` as dicts, reading only the parts that hold them."""
    wanted: dict[int, list[int]] = {}
    for f in {int(f) for f in fids if f >= 0}:
        wanted.setdefault(f >> 32, []).append(f & 0xFFFFFFFF)
    out = {}
    for part in ds.parts():
        if part.number in wanted:
            rows = sorted(wanted[part.number])
            t = store.read_part(ds.path, part, columns, ok_only=True).take(rows)
            for r, rec in zip(rows, t.to_pylist()):
                out[(part.number << 32) | r] = rec
    return out


def _attention(rec: dict | None):
    if not rec or rec.get("attention") is None or not rec.get("attn_h"):
        return None
    return np.asarray(rec["attention"], np.float32).reshape(rec["attn_h"], rec["attn_w"])


def _f(x) -> float | None:
    return None if x is None else float(x)


def build_cards(
    gallery: store.Dataset,
    queries: store.Dataset,
    picks: list[int],
    q_ids: list[str],
    q_fids: np.ndarray,
    exact_ids: np.ndarray,
    exact_scores: np.ndarray,
    exact_rel: np.ndarray,
    k: int = 5,
) -> list[dict]:
    """Cards for ``write_report``: query id, label, image, attention, box, entropy/peak, and the top-k exact hits."""
    qrows = read_rows(queries, [int(q_fids[i]) for i in picks])
    hits = read_rows(gallery, [int(f) for i in picks for f in exact_ids[i, :k]])
    wanted = {q_ids[i] for i in picks} | {h["id"] for h in hits.values()}
    images = fetch_images(gallery, wanted | ({q_ids[i] for i in picks} if queries is not gallery else set()), queries)
    cards = []
    for i in picks:
        q = qrows.get(int(q_fids[i]))
        box = q.get("box") if q else None
        results = []
        for c, f in enumerate(exact_ids[i, :k]):
            h = hits.get(int(f))
            if h is None:
                continue
            results.append(
                {
                    "id": h["id"],
                    "score": float(exact_scores[i, c]),
                    "relevant": bool(exact_rel[i, c]),
                    "image": images.get(h["id"]),
                    "label": h.get("label"),
                    "attn_entropy": _f(h.get("attn_entropy")),
                    "attn_peak": _f(h.get("attn_peak")),
                }
            )
        cards.append(
            {
                "query_id": q_ids[i],
                "label": q.get("label") if q else None,
                "image": images.get(q_ids[i]),
                "attention": _attention(q),
                "box": list(box) if box is not None else None,
                "attn_entropy": _f(q.get("attn_entropy")) if q else None,
                "attn_peak": _f(q.get("attn_peak")) if q else None,
                "results": results,
            }
        )
    return cards


def fetch_images(gallery: store.Dataset, ids: set[str], queries: store.Dataset | None = None) -> dict[str, bytes]:
    """Original image bytes for ``ids`` from the source shards that hold them (best effort: missing ones left out)."""
    from attnpipe.data.fetch import fetch_images as fetch

    out: dict[str, bytes] = {}
    for ds in [gallery] if queries is None or queries is gallery else [gallery, queries]:
        out.update(fetch(ds.manifest, ids))
    return out
