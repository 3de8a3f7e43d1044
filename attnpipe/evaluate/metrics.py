"""Retrieval metrics for the evaluate stage: binary relevance of ranked results -> trec_eval/ranx numbers.

Rankings arrive as a ``(queries, depth)`` relevance matrix (rank 1 first, padding = 0) plus ``R``, the number of
relevant gallery items per query, which may exceed the depth: relevant items that were not retrieved count as misses,
as in trec_eval. Cut-off metrics use running sums over the first ``max(ks)`` ranks; whole-ranking metrics (``map``,
``map@r``, ``r_precision``, ``mrr``) use only the hit positions (``np.nonzero`` + segment sums), so there is no
Python loop over queries and no float matrix of the full depth. Definitions match ranx 0.3 (``ranx/metrics/*.py``)
and are checked against it in ``tests/test_metrics.py``; MAP@R (ranx has none) follows Musgrave et al. 2020, "A
Metric Learning Reality Check".

Example::

    rel = relevance_from_labels(q_labels, gallery_labels[rows], rows >= 0)      # (nq, depth) bool
    m = ranking_metrics(rel, count_relevant(q_labels, gallery_labels, is_self))
    m["map@r"], m["recall@10"], m["queries"]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 100)

_CUTOFF_METRICS = ("precision", "recall", "hit_rate", "map", "ndcg")
_RANK_METRICS = ("map", "map@r", "r_precision", "mrr")


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The metric keys of :func:`ranking_metrics` for ``ks``, in output order."""
    return [f"{m}@{k}" for m in _CUTOFF_METRICS for k in _check_ks(ks)] + list(_RANK_METRICS)


def per_query_metrics(
    rel: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Every metric for every query, binary relevance.

    With ``hits@k`` the relevant results among the first ``k`` ranks, ``R = num_relevant`` and ``P@i = hits@i / i``:

    - ``precision@k = hits@k / k`` (``k``, not ``min(k, depth)``), ``recall@k = hits@k / R``,
      ``hit_rate@k = [hits@k > 0]``;
    - ``map@k = sum_{i<=k} P@i * rel_i / R`` (ranx ``map@k``, trec_eval ``map_cut_k``: divided by ``R``, not
      ``min(R, k)``); ``map`` is the same over the whole given ranking;
    - ``ndcg@k = sum_{i<=k} rel_i / log2(i + 1)`` over the same sum for ``min(R, k)`` hits at the top (Järvelin's
      gain, ranx's default ``ndcg``; for 0/1 gains it equals the Burges ``2^rel - 1`` variant);
    - ``map@r = sum_{i<=R} P@i * rel_i / R`` (MAP@R), ``r_precision = hits@R / R``;
    - ``mrr``: 1 / rank of the first hit anywhere in the given ranking, 0 without one.

    Ranks past the given depth (``k > depth`` or ``R > depth``) count as non-relevant, so ``precision@k`` still
    divides by ``k`` and ``map@r`` / ``r_precision`` still divide by ``R``.

    Args:
        rel: ``(nq, depth)`` bool or 0/1: relevance of each query's results, rank 1 first; padding is 0.
        num_relevant: ``(nq,)`` ints: relevant items in the whole gallery per query (``R``), may exceed ``depth``.
        ks: cut-offs, positive ints.

    Returns:
        ``{metric: (nq,) float64}`` with the keys of :func:`metric_names`; NaN for queries with ``R == 0``, which
        have no defined score (ranx and trec_eval only evaluate queries with relevant documents).

    Raises:
        ValueError: on shape mismatches, negative ``R``, bad cut-offs, or a query with more relevant results in its
            ranking than ``R`` (a relevance / leave-one-out bug upstream: recall would exceed 1).
    """
    rel, R = _check_inputs(rel, num_relevant)
    ks = _check_ks(ks)
    nq, depth = rel.shape
    n_hits = np.count_nonzero(rel, axis=1)
    bad = np.flatnonzero(n_hits > R)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{len(bad)} queries have more relevant results than num_relevant, e.g. query {i}: "
            f"{int(n_hits[i])} relevant in its ranking, num_relevant {int(R[i])}"
        )
    evaluated = R > 0
    Rf = np.where(evaluated, R, 1).astype(np.float64)  # R == 0 rows are set to NaN at the end
    out: dict[str, np.ndarray] = {}

    # Cut-off metrics: dense running sums over the first K ranks only, K = min(max k, depth).
    K = min(max(ks), depth)
    relk = rel[:, :K].astype(np.float64)  # (nq, K)
    ranks = np.arange(1, K + 1, dtype=np.float64)
    gain = 1.0 / np.log2(ranks + 1.0)  # DCG discount of each rank
    hits_cum = np.cumsum(relk, axis=1)  # hits@i
    ap_cum = np.cumsum(hits_cum / ranks * relk, axis=1)  # sum_{j<=i} P@j * rel_j
    dcg_cum = np.cumsum(relk * gain, axis=1)
    idcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, max(ks) + 2)))])  # idcg[n]: n hits on top
    zero = np.zeros(nq)
    for k in ks:
        c = min(k, K) - 1  # ranks past the depth are misses: the sums stop growing there
        hits, ap, dcg = (hits_cum[:, c], ap_cum[:, c], dcg_cum[:, c]) if c >= 0 else (zero, zero, zero)
        out[f"precision@{k}"] = hits / k
        out[f"recall@{k}"] = hits / Rf
        out[f"hit_rate@{k}"] = (hits > 0).astype(np.float64)
        out[f"map@{k}"] = ap / Rf
        out[f"ndcg@{k}"] = dcg / np.where(evaluated, idcg[np.minimum(R, k)], 1.0)

    # Whole-ranking metrics: from the hit positions only, O(hits); rows of nonzero() come out grouped by query.
    pos = np.nonzero(rel)[1]
    rank = pos + 1.0
    first = np.cumsum(n_hits) - n_hits  # index in pos of each query's first hit
    has = n_hits > 0
    prec_at_hit = np.arange(1.0, len(pos) + 1.0)  # in place: hit ordinal within its query (1, 2, ...) / rank
    prec_at_hit -= np.repeat(first, n_hits)
    prec_at_hit /= rank  # P@rank at every hit
    within_r = rank <= np.repeat(R, n_hits)

    def per_query(weights: np.ndarray) -> np.ndarray:
        total = np.zeros(nq)
        if len(weights):
            total[has] = np.add.reduceat(weights, first[has])  # segment sums; queries without hits stay 0
        return total

    out["map"] = per_query(prec_at_hit) / Rf
    out["map@r"] = per_query(prec_at_hit * within_r) / Rf
    out["r_precision"] = per_query(within_r.astype(np.float64)) / Rf
    mrr = np.zeros(nq)
    mrr[has] = 1.0 / rank[first[has]]
    out["mrr"] = mrr
    out = {name: out[name] for name in metric_names(ks)}
    for v in out.values():
        v[~evaluated] = np.nan
    return out


def ranking_metrics(rel: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean of :func:`per_query_metrics` over the queries with ``R > 0``, JSON-ready.

    Queries without any relevant item in the gallery are skipped, as ranx and trec_eval evaluate only queries with
    relevant documents; ``queries`` and ``queries_without_relevant`` say how many were evaluated and skipped.

    Raises:
        ValueError: as :func:`per_query_metrics`, and when no query has a relevant item (nothing to average).
    """
    per_q = per_query_metrics(rel, num_relevant, ks)
    R = np.asarray(num_relevant)
    evaluated = R > 0
    n = int(evaluated.sum())
    if n == 0:
        raise ValueError(
            f"no query has a relevant item in the gallery ({len(R)} queries, all num_relevant == 0): "
            "nothing to evaluate; check the labels or the qrels"
        )
    out: dict = {name: float(v[evaluated].mean()) for name, v in per_q.items()}
    out["queries"] = n
    out["queries_without_relevant"] = len(R) - n
    return out


def relevance_from_labels(query_labels: np.ndarray, result_labels: np.ndarray, result_valid: np.ndarray) -> np.ndarray:
    """``(nq, depth)`` bool: the result is valid and has the query's label; a ``None`` label matches nothing.

    Args:
        query_labels: ``(nq,)`` object array of labels (str or None).
        result_labels: ``(nq, depth)`` object array: the label of each ranked result (anything where invalid).
        result_valid: ``(nq, depth)`` bool: False for padding (no result at that rank).
    """
    q = np.asarray(query_labels, dtype=object)
    res = np.asarray(result_labels, dtype=object)
    valid = np.asarray(result_valid, dtype=bool)
    if q.ndim != 1 or res.ndim != 2 or res.shape[0] != len(q) or valid.shape != res.shape:
        raise ValueError(
            f"expected query_labels (nq,), result_labels and result_valid (nq, depth); got {q.shape}, "
            f"{res.shape}, {valid.shape}"
        )
    labeled = np.fromiter((x is not None for x in q), bool, len(q))
    same = np.equal(res, q[:, None]).astype(bool)  # elementwise Python == on object arrays
    return same & valid & labeled[:, None]


def count_relevant(
    query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: np.ndarray | None = None
) -> np.ndarray:
    """``(nq,)`` int64: gallery items with each query's label (``None`` matches nothing).

    ``exclude_self[i]`` True means query ``i`` is itself a gallery item, searched leave-one-out: its own row is
    dropped from its ranking, so it is not counted either.

    Raises:
        ValueError: when ``exclude_self`` marks a query whose label no gallery item has (it cannot be in the gallery).
    """
    q = np.asarray(query_labels, dtype=object)
    counts = Counter(x for x in np.asarray(gallery_labels, dtype=object).ravel() if x is not None)
    R = np.fromiter((counts.get(x, 0) if x is not None else 0 for x in q), np.int64, len(q))
    if exclude_self is None:
        return R
    ex = np.asarray(exclude_self, dtype=bool)
    if ex.shape != q.shape:
        raise ValueError(f"exclude_self has shape {ex.shape}, expected {q.shape}")
    labeled = np.fromiter((x is not None for x in q), bool, len(q))
    ex = ex & labeled  # an unlabeled query was never counted
    bad = np.flatnonzero(ex & (R == 0))
    if len(bad):
        raise ValueError(
            f"query {int(bad[0])} (label {q[bad[0]]!r}) is marked as in the gallery, but no gallery item has its label"
        )
    return R - ex


def read_qrels(path: str) -> dict[str, set[str]]:
    """A TREC qrels file (``qid iter docid rel`` per line, whitespace-separated) -> ``{qid: {relevant docids}}``.

    ``rel > 0`` is relevant; a query judged only non-relevant maps to an empty set. Blank lines are skipped; a
    repeated ``(qid, docid)`` takes its last judgment.

    Raises:
        ValueError: on a line without exactly four fields or with a non-integer relevance (with its line number).
        OSError: when the file cannot be read.
    """
    from attnpipe import fs  # a local path or an object-store URI

    out: dict[str, set[str]] = {}
    for n, line in enumerate(fs.read_text(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise ValueError(f"{path}:{n}: expected 'qid 0 docid rel' (4 fields), got {len(fields)}: {line.strip()!r}")
        qid, _, doc, rel = fields
        try:
            grade = int(rel)
        except ValueError:
            raise ValueError(f"{path}:{n}: relevance must be an integer, got {rel!r}") from None
        docs = out.setdefault(qid, set())
        if grade > 0:
            docs.add(doc)
        else:
            docs.discard(doc)
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    try:
        ok = len(ks) > 0 and all(int(k) == k and k >= 1 for k in ks)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(dict.fromkeys(int(k) for k in ks))  # deduplicated, order kept


def _check_inputs(rel: np.ndarray, num_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rel = np.asarray(rel)
    if rel.ndim != 2:
        raise ValueError(f"rel must be (queries, depth), got shape {rel.shape}")
    R = np.asarray(num_relevant)
    if R.shape != (rel.shape[0],):
        raise ValueError(f"num_relevant must be ({rel.shape[0]},) to match rel {rel.shape}, got {R.shape}")
    if R.size and (not np.all(np.isfinite(R)) or np.any(R != np.round(R)) or R.min() < 0):
        raise ValueError("num_relevant must hold non-negative integers")
    return rel.astype(bool, copy=False), R.astype(np.int64)
