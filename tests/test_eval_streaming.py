"""Streaming evaluation: part-by-part metrics equal an in-memory reference; the driver does not hold the gallery."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from attnpipe import store


def rich_tables(n=3000, dim=16, classes=8, shards=3, h=3, w=4, seed=5, pooling="attn"):
    """Deterministic labeled vectors with real attention maps, boxes on half the rows, unlabeled and error rows."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    X = centers[y] + 1.3 * rng.normal(size=(n, dim))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    A = rng.dirichlet(np.full(h * w, 0.5), n).astype(np.float16)
    b0 = rng.uniform(0, 0.6, (n, 2))
    b1 = b0 + rng.uniform(0.1, 0.4, (n, 2))
    B = np.concatenate([b0, b1], 1).astype(np.float32)
    has_box = rng.random(n) < 0.5
    labels = [None if rng.random() < 0.04 else f"c{c}" for c in y]
    status_ok = rng.random(n) > 0.03
    meta = {"attnpipe.model": "synthetic", "attnpipe.pooling": pooling, "attnpipe.embedding_dim": dim}
    sch = store.schema(dim, h * w, meta)
    shard_of = np.arange(n) * shards // n
    out = []
    for s in range(shards):
        rows = np.flatnonzero(shard_of == s)
        m, ok = len(rows), status_ok[rows]
        name = f"rich-{s:05d}"
        t = pa.table(
            {
                "id": pa.array([f"{name}/{i:06d}" for i in rows], pa.string()),
                "shard": pa.array([name] * m, pa.string()),
                "key": pa.array([f"{i:06d}" for i in rows], pa.string()),
                "label": pa.array([labels[i] for i in rows], pa.string()),
                "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
                "error": pa.array([None if o else "broken" for o in ok], pa.string()),
                "embedding": store.fixed_list(X[rows], ok, sch.field("embedding").type),
                "attention": store.fixed_list(A[rows], ok, sch.field("attention").type),
                "attn_h": pa.array(np.where(ok, h, 0).astype(np.int16)),
                "attn_w": pa.array(np.where(ok, w, 0).astype(np.int16)),
                "attn_entropy": pa.array(np.where(ok, 0.5, np.nan).astype(np.float32)),
                "attn_peak": pa.array(np.where(ok, 0.3, np.nan).astype(np.float32)),
                "attn_top10_mass": pa.array(np.where(ok, 0.3, np.nan).astype(np.float32)),
                "box": store.fixed_list(B[rows], has_box[rows] & ok, sch.field("box").type),
            },
            schema=sch,
        )
        out.append((name, t))
    return out


def write_rich(path: str, **kw) -> None:
    run = store.start_run(path, {"synthetic": "rich", **{k: str(v) for k, v in kw.items()}}, resume=False, replace=True)
    entries = []
    for name, t in rich_tables(**kw):
        entries.append(run.add_table(name, t))
    run.publish(entries, {"model": {"backbone": "synthetic"}})


pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
KS = (1, 5, 10, 50)


def reference(gallery: str, index_root: str, num_queries: int, ks=KS) -> dict:
    """The in-memory evaluation (the gallery held whole): exact, faiss and SimHash rankings + attention summary."""
    from attnpipe.evaluate import attention as attn
    from attnpipe.evaluate.metrics import count_relevant, ranking_metrics
    from attnpipe.index.layout import load_manifest
    from attnpipe.index.lsh import SimHashLSH

    t = store.read_embeddings(gallery, ["id", "label", "embedding", "attention", "attn_h", "attn_w", "box", "status"])
    t = t.filter(pa.compute.equal(t.column("status"), "ok"))
    X, labels, n = store.embedding_matrix(t), np.array(t.column("label").to_pylist(), object), t.num_rows
    rows = np.sort(np.random.default_rng(0).choice(n, size=num_queries, replace=False))
    Q, ql = X[rows], labels[rows]
    num_rel = count_relevant(ql, labels, np.ones(len(rows), bool))
    depth = n - 1

    def rel_of(ranked: np.ndarray) -> np.ndarray:  # gallery rows (-1 none), self already dropped
        return (
            (ranked >= 0) & np.equal(labels[np.clip(ranked, 0, None)], ql[:, None]).astype(bool) & (ql != None)[:, None]
        )

    def without_self(ranked: np.ndarray, width: int) -> np.ndarray:
        return np.stack(
            [
                np.pad(r[r != s][:width], (0, max(0, width - len(r[r != s][:width]))), constant_values=-1)
                for r, s in zip(ranked, rows)
            ]
        )

    out = {"exact": ranking_metrics(rel_of(without_self(np.argsort(-(Q @ X.T), 1, kind="stable"), depth)), num_rel, ks)}
    # faiss ids <-> gallery rows: parts in number order, ok rows in order
    fid_of = np.concatenate([(np.int64(p.number) << 32) | np.arange(p.ok) for p in store.open_dataset(gallery).parts()])
    row_of = dict(zip(fid_of.tolist(), range(n)))
    to_rows = np.vectorize(lambda f: row_of.get(int(f), -1), otypes=[np.int64])
    from attnpipe.index import faiss_index as fx

    m = load_manifest(index_root)
    _, I = fx.search(fx.load_version(m), Q, depth + 1)
    out["faiss"] = ranking_metrics(rel_of(without_self(to_rows(I), depth)), num_rel, ks)
    lsh = SimHashLSH.load(f"{m['path']}/lsh/simhash")
    lookup = lambda f: X[to_rows(f)]
    _, L = lsh.search(Q, lookup, k=max(ks) + 1)
    out["lsh"] = ranking_metrics(rel_of(without_self(to_rows(L), max(ks))), num_rel, ks)
    A = t.column("attention").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, 3, 4)
    B = np.array([b if b is not None else [np.nan] * 4 for b in t.column("box").to_pylist()], np.float32)
    out["attention"] = attn.summarize(attn.per_image_stats(A.astype(np.float32), B), list(labels))
    return out


@pytest.fixture(scope="module")
def rich(ray_session, tmp_path_factory):
    from attnpipe.index.build import build_index

    root = tmp_path_factory.mktemp("stream")
    write_rich(str(root / "gallery"), n=1500)
    build_index(str(root / "gallery"), str(root / "index"), factory="IVF16,Flat", lsh="simhash", workers=1)
    return root


def _close(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        if isinstance(value, dict):
            _close(got[key], value, f"{where}/{key}")
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), f"{where}/{key}"


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_metrics_equal_the_in_memory_reference(rich, tmp_path, workers):
    from attnpipe.evaluate.runner import evaluate

    got = evaluate(
        str(rich / "gallery"), str(rich / "index"), str(tmp_path / "e"), num_queries=200, ks=KS, workers=workers
    )
    want = reference(str(rich / "gallery"), str(rich / "index"), 200)
    for section in ("exact", "faiss", "lsh"):
        _close(got[section], want[section], section)
    _close(got["attention"]["heads"]["attn"], want["attention"], "attention")
    assert 0.05 < got["exact"]["map@r"] < 0.95


def test_any_cutoffs_and_cards_from_several_shards(rich, tmp_path):
    from attnpipe.evaluate.runner import evaluate, headline

    m = evaluate(
        str(rich / "gallery"), str(rich / "index"), str(tmp_path / "e"), num_queries=60, ks=(3, 7), depth=7, workers=1
    )
    assert "precision@3" in m["exact"] and "recall_vs_exact@7" in m["faiss"] and "ndcg@10" not in m["exact"]
    assert "ndcg@7" in headline(m)
    from attnpipe.evaluate import cards

    picks = cards.pick_queries([f"rich-0000{i % 3}/{i}" for i in range(30)])
    assert len(picks) == 6 and {i % 3 for i in picks} == {0, 1, 2}


def test_eval_refuses_an_index_of_another_embeddings_state(rich, tmp_path):
    import shutil

    from attnpipe.evaluate.runner import evaluate
    from attnpipe.index.layout import IndexLayoutError

    other = tmp_path / "other"
    shutil.copytree(rich / "gallery", other)
    write_rich(str(other), n=1500, seed=6)  # same shards, another state (new parts, new manifest)
    with pytest.raises(IndexLayoutError, match="another state of the embeddings.*reindex"):
        evaluate(str(other), str(rich / "index"), str(tmp_path / "e"), num_queries=20, workers=1)


def _peak(gallery: str, index: str, out: str) -> int:
    import tracemalloc

    from attnpipe.evaluate.runner import evaluate

    tracemalloc.start()
    evaluate(gallery, index, out, num_queries=100, ks=(1, 10), depth=100, workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_the_gallery(tmp_path):
    from attnpipe.index.build import build_index

    peaks, sizes = {}, {}
    for n in (20_000, 80_000):
        rng = np.random.default_rng(n)
        X = rng.normal(size=(n, 16)).astype(np.float32)
        labels = [f"c{i}" for i in rng.integers(0, 20, n)]
        g = str(tmp_path / f"g{n}")
        store.write_vectors(g, [f"s/{i}" for i in range(n)], X, labels, num_shards=n // 10_000)
        build_index(g, str(tmp_path / f"i{n}"), factory="IVF64,Flat", lsh="none", workers=1, queries=200)
        peaks[n] = _peak(g, str(tmp_path / f"i{n}"), str(tmp_path / f"e{n}"))
        sizes[n] = X.nbytes
    growth = peaks[80_000] - peaks[20_000]
    # holding the gallery would add its vectors (and ids, labels, maps); streaming adds only per-query bookkeeping
    assert growth < 0.25 * (sizes[80_000] - sizes[20_000]), (peaks, sizes)
