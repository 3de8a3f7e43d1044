"""Offline evaluation on a real index: exact metrics vs an independent numpy computation, ANN and LSH sections."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from attnpipe import store
from attnpipe.evaluate.runner import evaluate
from attnpipe.index.build import build_index

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
KS = (1, 5, 10, 100)


def labeled(n: int, labels: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(labels, dim))
    y = rng.integers(0, labels, n)
    X = centers[y] + 1.2 * rng.normal(size=(n, dim))  # overlapping classes: metrics well inside (0, 1)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), np.array([f"c{i}" for i in y])


def numpy_metrics(Q, qy, X, gy, ks=KS) -> dict[str, float]:
    """Straightforward full-ranking metrics, written independently of attnpipe.evaluate.metrics."""
    order = np.argsort(-(Q.astype(np.float64) @ X.T.astype(np.float64)), axis=1, kind="stable")
    rel = (gy[order] == qy[:, None]).astype(np.float64)
    R = rel.sum(1)
    ranks = np.arange(1, rel.shape[1] + 1)
    cum = np.cumsum(rel, 1)
    prec = cum / ranks
    out = {}
    for k in ks:
        disc = 1 / np.log2(ranks[:k] + 1)
        idcg = np.array([disc[: int(min(r, k))].sum() for r in R])
        out[f"precision@{k}"] = np.mean(cum[:, k - 1] / k)
        out[f"recall@{k}"] = np.mean(cum[:, k - 1] / R)
        out[f"hit_rate@{k}"] = np.mean(cum[:, k - 1] > 0)
        out[f"map@{k}"] = np.mean((prec[:, :k] * rel[:, :k]).sum(1) / R)
        out[f"ndcg@{k}"] = np.mean((rel[:, :k] * disc).sum(1) / idcg)
    out["map"] = np.mean((prec * rel).sum(1) / R)
    out["map@r"] = np.mean([(prec[i, : int(r)] * rel[i, : int(r)]).sum() / r for i, r in enumerate(R)])
    out["r_precision"] = np.mean([cum[i, int(r) - 1] / r for i, r in enumerate(R)])
    out["mrr"] = np.mean(1 / (rel.argmax(1) + 1))
    return out


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    X, gy = labeled(10_000, 20, 48, seed=0)
    Q, qy = labeled(1_000, 20, 48, seed=1)
    store.write_vectors(str(root / "gallery"), [f"g/{i}" for i in range(len(X))], X, list(gy), num_shards=4)
    store.write_vectors(str(root / "queries"), [f"q/{i}" for i in range(len(Q))], Q, list(qy), num_shards=1)
    build_index(str(root / "gallery"), str(root / "index"), factory="IVF64,Flat", lsh="simhash", workers=2)
    metrics = evaluate(str(root / "gallery"), str(root / "index"), str(root / "out"), queries=str(root / "queries"))
    return root, metrics, (Q, qy, X, gy)


def test_exact_section_equals_independent_numpy(setup):
    root, metrics, data = setup
    want = numpy_metrics(*data)
    got = metrics["exact"]
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert 0.05 < got["map@r"] < 0.95  # a non-trivial task
    on_disk = json.loads((root / "out" / "metrics.json").read_text())
    assert set(on_disk) >= {"meta", "exact", "faiss", "lsh", "attention"}


def test_faiss_and_lsh_sections(setup):
    _, metrics, _ = setup
    f = metrics["faiss"]
    assert f["recall_vs_exact@10"] >= 0.9
    assert f["qps"] > 0 and 0 < f["latency_ms_p50"] <= f["latency_ms_p99"]
    assert "nprobe" in f and {"map@r", "ndcg@10", "precision@100"} <= set(f)
    lsh = metrics["lsh"]
    assert 0 < lsh["candidate_recall@10"] <= 1 and lsh["mean_candidates"] > 0
    assert lsh["precision@10"] <= metrics["exact"]["precision@10"] + 1e-9  # re-ranked candidates: never better


def test_report_holds_its_plots(setup):
    root, _, _ = setup
    html = (root / "out" / "report.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", html)) >= 3
    assert not re.search(r"(src|href)=\"https?://", html)


def test_leave_one_out_and_qrels(setup, tmp_path):
    root, _, (_, _, X, gy) = setup
    m = evaluate(str(root / "gallery"), str(root / "index"), str(tmp_path / "loo"), num_queries=300)
    assert m["meta"]["leave_one_out"] and m["meta"]["queries"] == 300
    rows = np.sort(np.random.default_rng(0).choice(len(X), 300, replace=False))  # the documented seeded sample
    per_query = [numpy_metrics(X[[r]], gy[[r]], np.delete(X, r, 0), np.delete(gy, r)) for r in rows]
    for key in ("precision@1", "recall@100", "map", "map@r", "ndcg@10", "mrr"):
        assert m["exact"][key] == pytest.approx(np.mean([q[key] for q in per_query]), abs=1e-4), key
    qrels = tmp_path / "qrels.txt"
    lines = [f"g/{i} 0 g/{j} 1" for i in range(50) for j in np.flatnonzero(gy == gy[i])]
    qrels.write_text("\n".join(lines) + "\n")
    mq = evaluate(str(root / "gallery"), str(root / "index"), str(tmp_path / "qrels"), qrels=str(qrels))
    assert mq["meta"]["relevance"] == "qrels" and mq["exact"]["queries"] == 50
