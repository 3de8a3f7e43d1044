"""Retrieval metrics against ranx (exact reference), an independent MAP@R loop, and hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnpipe.evaluate.metrics import (
    count_relevant,
    metric_names,
    per_query_metrics,
    ranking_metrics,
    read_qrels,
    relevance_from_labels,
)

KS = (1, 5, 10, 50, 100)  # 100 > depth: ranks past the depth are misses, precision still divides by k


def random_runs(nq: int = 200, depth: int = 50, seed: int = 0):
    """Relevance (nq, depth) with short runs (padding), R up to 2x depth, and some queries with R == 0."""
    rng = np.random.default_rng(seed)
    rel = np.zeros((nq, depth), bool)
    lengths = rng.integers(0, depth + 1, nq)
    lengths[rng.random(nq) < 0.6] = depth
    R = rng.integers(1, 2 * depth, nq)
    small = rng.random(nq) < 0.5
    R[small] = rng.integers(1, 8, small.sum())
    R[rng.random(nq) < 0.1] = 0
    for i in range(nq):
        h = rng.integers(0, min(R[i], lengths[i]) + 1)
        rel[i, rng.choice(lengths[i], size=h, replace=False)] = True
    return rel, R, lengths


def to_ranx(rel: np.ndarray, R: np.ndarray, lengths: np.ndarray):
    """Qrels with all R relevant docs (also the ones never retrieved, plus a judged non-relevant), and the Run."""
    from ranx import Qrels, Run

    qrels, run = {}, {}
    for i in np.flatnonzero(R > 0):  # ranx evaluates exactly the queries in the qrels
        q = f"q{i:04d}"
        qrels[q] = {f"r{j}": 1 for j in range(R[i])} | {"judged-nonrel": 0}
        docs, n_rel = {}, 0
        for p in range(lengths[i]):
            if rel[i, p]:
                docs[f"r{n_rel}"], n_rel = float(depth_score(p)), n_rel + 1
            else:
                docs[f"n{p}"] = float(depth_score(p))
        if docs:
            run[q] = docs
    return Qrels(qrels), Run(run)


def depth_score(p: int) -> float:
    return 1000.0 - p  # strictly decreasing with rank


@pytest.mark.filterwarnings("ignore:unsafe cast")  # numba, while compiling ranx's r-precision
def test_every_metric_matches_ranx():
    from ranx import evaluate

    rel, R, lengths = random_runs()
    assert (R == 0).any() and (R > rel.shape[1]).any() and (lengths < rel.shape[1]).any() and (lengths == 0).any()
    qrels, run = to_ranx(rel, R, lengths)
    names = {f"{m}@{k}": f"{m}@{k}" for m in ("precision", "recall", "hit_rate", "map", "ndcg") for k in KS}
    names |= {"map": "map", "r_precision": "r-precision", "mrr": "mrr"}  # ours: ranx
    want = evaluate(qrels, run, list(names.values()), return_mean=False, make_comparable=True)
    per_q = per_query_metrics(rel, R, KS)
    got = ranking_metrics(rel, R, KS)
    for ours, theirs in names.items():
        np.testing.assert_allclose(per_q[ours][R > 0], want[theirs], rtol=0, atol=1e-9, err_msg=ours)
        assert got[ours] == pytest.approx(float(np.mean(want[theirs])), abs=1e-9), ours
    assert np.isnan(per_q["map"][R == 0]).all()
    assert got["queries"] == int((R > 0).sum()) and got["queries_without_relevant"] == int((R == 0).sum())


def map_at_r_loop(rel: np.ndarray, R: np.ndarray) -> list[float]:
    """MAP@R (Musgrave et al. 2020) written out: ranks past the depth are non-relevant."""
    out = []
    for row, r in zip(rel.tolist(), R.tolist()):
        if r == 0:
            continue
        hits, total = 0, 0.0
        for i in range(1, r + 1):
            is_rel = i <= len(row) and row[i - 1]
            if is_rel:
                hits += 1
                total += hits / i
        out.append(total / r)
    return out


def test_map_at_r_matches_a_plain_loop():
    rel, R, _ = random_runs(seed=1)
    want = map_at_r_loop(rel, R)
    np.testing.assert_allclose(per_query_metrics(rel, R)["map@r"][R > 0], want, rtol=0, atol=1e-12)
    assert ranking_metrics(rel, R)["map@r"] == pytest.approx(np.mean(want), abs=1e-12)


def test_hand_worked_example():
    # Query A: relevance [1, 0, 1, 0, 0], R = 3 (one relevant item never retrieved).
    #   P@1 = 1, P@5 = 2/5, recall@5 = 2/3, hit_rate@1 = 1
    #   AP = (P@1 + P@3) / R = (1/1 + 2/3) / 3 = 0.5556  (map@5 = map: no hit after rank 5)
    #   MAP@R = (P@1*1 + P@2*0 + P@3*1) / 3 = (1 + 0 + 2/3) / 3 = 0.5556
    #   R-precision = hits in top 3 / 3 = 2/3
    #   nDCG@5 = (1/log2(2) + 1/log2(4)) / (1/log2(2) + 1/log2(3) + 1/log2(4)) = 1.5 / 2.1309 = 0.7039
    #   MRR = 1/1
    # Query B: relevance [0, 1, 0, 1, 0], R = 3.
    #   P@1 = 0, P@5 = 2/5, hit_rate@1 = 0
    #   AP = (P@2 + P@4) / 3 = (1/2 + 2/4) / 3 = 0.3333
    #   MAP@R = (0 + P@2*1 + 0) / 3 = (1/2) / 3 = 0.1667  (the hit at rank 4 is past R)
    #   R-precision = 1/3, MRR = 1/2
    #   nDCG@5 = (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3) + 1/log2(4)) = 1.0616 / 2.1309 = 0.4982
    rel = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 1, 0]])
    m = per_query_metrics(rel, np.array([3, 3]), ks=(1, 5))
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    want = {
        "precision@1": [1, 0],
        "precision@5": [2 / 5, 2 / 5],
        "recall@1": [1 / 3, 0],
        "recall@5": [2 / 3, 2 / 3],
        "hit_rate@1": [1, 0],
        "hit_rate@5": [1, 1],
        "map@1": [1 / 3, 0],
        "map@5": [(1 + 2 / 3) / 3, (1 / 2 + 2 / 4) / 3],
        "ndcg@1": [1, 0],
        "ndcg@5": [(1 + 1 / math.log2(4)) / idcg, (1 / math.log2(3) + 1 / math.log2(5)) / idcg],
        "map": [(1 + 2 / 3) / 3, (1 / 2 + 2 / 4) / 3],
        "map@r": [(1 + 0 + 2 / 3) / 3, (1 / 2) / 3],
        "r_precision": [2 / 3, 1 / 3],
        "mrr": [1, 1 / 2],
    }
    assert list(m) == list(want) == metric_names((1, 5))
    for name, values in want.items():
        np.testing.assert_allclose(m[name], values, rtol=0, atol=1e-15, err_msg=name)
    assert m["map"][0] == pytest.approx(0.5556, abs=1e-4) and m["ndcg@5"][0] == pytest.approx(0.7039, abs=1e-4)


def test_no_hits_and_k_past_depth():
    rel = np.zeros((2, 3), bool)
    rel[1, 2] = True
    m = ranking_metrics(rel, np.array([4, 2]), ks=(1, 10))
    # query 0 scores 0 everywhere; query 1: one hit at rank 3 of a depth-3 ranking, R = 2
    assert m["precision@10"] == pytest.approx((0 + 1 / 10) / 2)  # divided by k = 10, not by the depth 3
    assert m["recall@10"] == pytest.approx((0 + 1 / 2) / 2)
    assert m["map@10"] == m["map"] == pytest.approx((0 + (1 / 3) / 2) / 2)
    assert m["map@r"] == 0.0 and m["r_precision"] == 0.0  # the hit is at rank 3 > R = 2
    assert m["ndcg@10"] == pytest.approx((0 + (1 / 2) / (1 + 1 / math.log2(3))) / 2)
    assert m["mrr"] == pytest.approx((0 + 1 / 3) / 2)
    assert m["hit_rate@1"] == 0.0 and m["hit_rate@10"] == 0.5


def test_zero_depth_and_r_past_depth():
    m = ranking_metrics(np.zeros((3, 0), bool), np.array([1, 5, 0]), ks=(1,))
    assert all(m[n] == 0.0 for n in metric_names((1,)))
    assert m["queries"] == 2 and m["queries_without_relevant"] == 1
    m = ranking_metrics(np.ones((1, 2), bool), np.array([4]), ks=(1, 2))
    assert m["map@r"] == pytest.approx((1 + 1) / 4) and m["r_precision"] == pytest.approx(2 / 4)
    assert m["recall@2"] == pytest.approx(2 / 4) and m["ndcg@2"] == 1.0  # idcg from min(R, k) = 2 hits


def test_queries_without_relevant_are_excluded():
    rel = np.array([[1, 0], [0, 0], [0, 0]])
    m = ranking_metrics(rel, np.array([1, 0, 0]), ks=(1,))
    assert m["precision@1"] == 1.0 and m["mrr"] == 1.0
    assert m["queries"] == 1 and m["queries_without_relevant"] == 2
    with pytest.raises(ValueError, match="no query has a relevant item"):
        ranking_metrics(np.zeros((2, 2)), np.array([0, 0]))


@pytest.mark.parametrize(
    "rel, R, ks, match",
    [
        (np.ones((2, 3)), np.array([1, 3]), (1,), "more relevant results than num_relevant"),
        (np.ones(3), np.array([3]), (1,), "queries, depth"),
        (np.ones((2, 3)), np.array([3]), (1,), "num_relevant must be"),
        (np.ones((1, 3)), np.array([-1]), (1,), "non-negative"),
        (np.ones((1, 3)), np.array([3]), (0,), "positive integers"),
        (np.ones((1, 3)), np.array([3]), (), "positive integers"),
    ],
)
def test_invalid_inputs(rel, R, ks, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(rel, R, ks)


def test_relevance_and_counts_from_labels():
    q = np.array(["a", "b", None], object)
    res = np.array([["a", "b", "a"], ["a", None, "b"], [None, None, "a"]], object)
    valid = np.array([[True, True, False], [True, True, True], [True, True, True]])
    np.testing.assert_array_equal(
        relevance_from_labels(q, res, valid), [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    )  # padding and None never match
    gallery = np.array(["a", "a", "b", None, "c"], object)
    np.testing.assert_array_equal(count_relevant(q, gallery), [2, 1, 0])
    np.testing.assert_array_equal(count_relevant(q, gallery, np.array([True, True, True])), [1, 0, 0])  # leave-one-out
    with pytest.raises(ValueError, match="no gallery item has its label"):
        count_relevant(np.array(["z"], object), gallery, np.array([True]))
    with pytest.raises(ValueError, match="result_labels"):
        relevance_from_labels(q, res[:2], valid[:2])


def test_read_qrels(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("q1 0 d1 1\nq1 0 d2 0\n\nq1 0 d3 2\nq2 0 d1 0\nq3\t0\td9\t1\nq1 0 d3 0\n")
    assert read_qrels(str(path)) == {"q1": {"d1"}, "q2": set(), "q3": {"d9"}}  # last judgment of (q1, d3) wins


@pytest.mark.parametrize(
    "text, match",
    [
        ("q1 0 d1 1\nq1 0 d2\n", r"qrels.txt:2: expected 'qid 0 docid rel' \(4 fields\), got 3"),
        ("q1 0 d1 1\n\nq1 0 d2 yes\n", r"qrels.txt:3: relevance must be an integer, got 'yes'"),
        ("q1 0 d1 1 extra\n", r"qrels.txt:1: expected"),
    ],
)
def test_read_qrels_malformed(tmp_path, text, match):
    path = tmp_path / "qrels.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_qrels(str(path))
