"""`attnpipe dedup`: union-find and keep rules against brute force, semantic pairs against exact all-pairs cosine,
leakage between datasets, the auto threshold on planted edited copies encoded by the real pipeline, the outputs
(Parquet readable by DuckDB, summary, report rendered in headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from attnpipe import store
from attnpipe.dedup import DedupConfig, dedup
from attnpipe.dedup.calibrate import fit_transform, nn_threshold
from attnpipe.dedup.groups import choose, connected
from tests.test_report import _browser

pytestmark = pytest.mark.timeout(300)


def _brute_components(n: int, edges: list[tuple[int, int]]) -> set[frozenset[int]]:
    adj = {i: set() for i in range(n)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    seen, comps = set(), set()
    for i in range(n):
        if i in seen or not adj[i]:
            continue
        stack, comp = [i], set()
        while stack:
            j = stack.pop()
            if j not in comp:
                comp.add(j)
                stack.extend(adj[j] - comp)
        seen |= comp
        comps.add(frozenset(comp))
    return comps


def test_union_find_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        edges = [tuple(int(v) for v in rng.choice(n, 2, replace=False)) for _ in range(int(rng.integers(0, n)))]
        assert {frozenset(g) for g in connected(edges)} == _brute_components(n, edges), trial


def test_keep_rules():
    ids = ["c", "a", "b"]
    Z = np.array([[1.0, 0.0], [0.6, 0.8], [0.96, 0.28]], np.float32)  # b is closest to both others
    assert choose(ids, Z, "first") == 1
    assert choose(ids, Z, "central") == 2
    assert choose(ids, Z, "largest", [10, 20, 30]) == 2
    assert choose(ids, Z, "largest", [None, None, None]) == 1  # sizes unknown: first
    with pytest.raises(ValueError, match="keep rule"):
        choose(ids, Z, "biggest")


def test_auto_threshold_ignores_a_large_duplicate_share():
    rng = np.random.default_rng(1)
    bulk = rng.normal(0.2, 0.05, 700)
    dups = rng.uniform(0.8, 0.99, 300)  # 30% duplicates must not drag the cut up to them or widen the bulk
    t, info = nn_threshold(np.r_[bulk, dups], z=4.0)
    assert bulk.max() - 0.05 < t < 0.5, info
    assert info["bulk_vectors"] < 760 and not info["clamped"]
    with pytest.raises(ValueError, match="--threshold"):
        nn_threshold(np.ones(3))


def _clustered(rng: np.random.Generator, n: int, dim: int, centers: int, spread: float) -> np.ndarray:
    C = rng.normal(size=(centers, dim))
    return C[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, dim))


def _exact_pairs(Z: np.ndarray, t: float) -> dict[tuple[int, int], float]:
    S = Z @ Z.T
    a, b = np.nonzero(np.triu(S >= t, k=1))
    return {(int(i), int(j)): float(S[i, j]) for i, j in zip(a, b)}


@pytest.mark.ray
@pytest.mark.slow
def test_semantic_pairs_equal_exact_all_pairs(ray_session, tmp_path):
    rng = np.random.default_rng(2)
    X = _clustered(rng, 3000, 32, 40, 1.0)
    src = rng.choice(3000, 150, replace=False)
    X = np.r_[X, X[src] + 0.08 * rng.normal(size=(150, 32))]  # near-copies, some across k-means borders
    ids = [f"syn/{i:05d}" for i in range(len(X))]
    emb = str(tmp_path / "emb")
    store.write_vectors(emb, ids, X.astype(np.float32), num_shards=3)
    cfg = DedupConfig(threshold=0.8, clusters=24, probes=2)
    summary = dedup(emb, str(tmp_path / "out"), cfg=cfg)
    assert summary["plan"]["clusters"] == 24 and summary["plan"]["buckets"] > 1
    _, Xs = store.load_vectors(emb)
    exact = _exact_pairs(fit_transform(_sample_all(emb), whiten=True).apply(Xs), 0.8)
    pairs = pq.read_table(str(tmp_path / "out" / "pairs.parquet")).to_pylist()
    found = {tuple(sorted((int(p["id_a"][4:]), int(p["id_b"][4:])))): p["similarity"] for p in pairs}
    assert len(found) == len(pairs)  # no pair twice though vectors sit in two clusters
    assert set(found) <= set(exact)  # nothing under the threshold
    for k, s in found.items():
        assert s == pytest.approx(exact[k], abs=1e-4)
    planted = {tuple(sorted((int(s), 3000 + j))) for j, s in enumerate(src)}
    assert planted <= set(found)  # every planted copy, whichever clusters it fell into
    assert len(found) >= 0.97 * len(exact)  # border pairs: probes=2 finds nearly all exact pairs
    groups = pq.read_table(str(tmp_path / "out" / "groups.parquet")).to_pylist()
    kept = {}
    for r in groups:
        kept[r["group"]] = kept.get(r["group"], 0) + r["keep"]
    assert set(kept.values()) == {1}  # exactly one kept per group
    assert summary["duplicates_removable"] == len(groups) - len(kept)
    # a new run refuses to replace it without overwrite, and replaces it with
    with pytest.raises(FileExistsError, match="--overwrite"):
        dedup(emb, str(tmp_path / "out"), cfg=cfg)
    assert dedup(emb, str(tmp_path / "out"), cfg=cfg, overwrite=True)["pairs"] == summary["pairs"]


def _sample_all(emb: str) -> np.ndarray:
    return store.load_vectors(emb)[1]


@pytest.mark.ray
def test_against_finds_planted_leaks_and_none_in_a_clean_split(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    X = _clustered(rng, 2400, 48, 30, 1.0)
    train, test = X[:1600], X[1600:]
    leaks = rng.choice(len(test), 20, replace=False)
    leaked = test.copy()
    leaked[leaks] = train[leaks * 2] + 0.05 * rng.normal(size=(20, 48))  # test items copied from train
    paths = {}
    for name, V in (("train", train), ("clean", test), ("leaky", leaked)):
        paths[name] = str(tmp_path / name)
        store.write_vectors(paths[name], [f"{name}/{i:05d}" for i in range(len(V))], V.astype(np.float32), num_shards=2)
    clean = dedup(paths["clean"], str(tmp_path / "out-clean"), against=[paths["train"]])
    assert clean["threshold"]["chosen"] == "auto"
    assert clean["pairs"] == 0 and list(clean["leakage_pairs"].values()) == [0], clean
    leaky = dedup(paths["leaky"], str(tmp_path / "out-leaky"), against=[paths["train"]])
    rows = pq.read_table(str(tmp_path / "out-leaky" / "leakage.parquet")).to_pylist()
    found = {(r["id_a"], r["id_b"]) for r in rows}
    assert found == {(f"leaky/{i:05d}", f"train/{2 * i:05d}") for i in leaks.tolist()}
    assert {r["dataset_b"] for r in rows} == {paths["train"]}
    assert leaky["pairs"] == 0  # leakage is not mixed into in-dataset duplicates


@pytest.mark.ray
@pytest.mark.slow
def test_planted_edited_copies_default_settings(ray_session, tmp_path):
    from attnpipe.cli import main
    from attnpipe.dedup.planted import make_planted, pair_quality
    from attnpipe.encode import encode
    from tests.conftest import fast_config

    # The edits a random-weight backbone is invariant to (brightness and heavy crops are not: see bench/RESULTS.md)
    planted = make_planted(
        str(tmp_path / "data"),
        n=120,
        copied=30,
        image_size=64,
        edits=("jpeg_q15", "rescale_0.625", "blur_1.5", "rotate_5"),
    )
    emb = str(tmp_path / "emb")
    encode([planted.orig, planted.copies], emb, fast_config("model.pooling=gem"))
    out = str(tmp_path / "dedup")
    assert main(["dedup", "--embeddings", emb, "--out", out, "--keep", "largest"]) == 0
    pairs = pq.read_table(os.path.join(out, "pairs.parquet")).to_pylist()
    quality = pair_quality([(p["id_a"], p["id_b"]) for p in pairs], planted)
    assert quality["recall"] >= 0.9 and quality["precision"] >= 0.9, quality
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["kind"] == "dedup" and summary["threshold"]["chosen"] == "auto"
    groups = pq.read_table(os.path.join(out, "groups.parquet")).to_pylist()
    kept = {r["id"] for r in groups if r["keep"]}
    assert summary["keep_note"] is None  # sources are readable: sizes known
    for orig, copy, edit in planted.pairs:  # the rescaled copy is smaller: its original is kept
        if edit == "rescale_0.625" and orig in kept:
            assert copy not in kept
    assert main(["dedup", "--embeddings", emb, "--out", str(tmp_path / "data")]) == 2  # not a dedup output
    try:
        import duckdb
    except ImportError:  # duckdb is not a dependency; pyarrow read it above
        pass
    else:
        n = duckdb.connect().execute(f"select count(*) from read_parquet('{out}/pairs.parquet')").fetchall()[0][0]
        assert n == len(pairs)
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert html.count("data:image/jpeg;base64,") >= 4 and "://" not in html.replace("data:image", "")
    _render(os.path.join(out, "report.html"), tmp_path)


def _render(report: str, tmp_path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (make test installs it when it can)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
    proc = subprocess.run(
        [
            browser,
            *flags,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            "--virtual-time-budget=5000",
            f"file://{report}",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    if proc.returncode != 0 and "dump-dom" not in proc.stdout:
        pytest.skip(f"{browser} does not start: {proc.stderr.strip()[-200:]}")
    loaded = re.search(r'data-images-loaded="(\d+)"', proc.stdout)
    total = re.search(r'data-images-total="(\d+)"', proc.stdout)
    assert loaded and total, proc.stdout[:500]
    assert int(total.group(1)) >= 4 and loaded.group(1) == total.group(1)


def test_bad_settings_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="--keep"):
        dedup(str(tmp_path), str(tmp_path / "o"), cfg=DedupConfig(keep="biggest"))
    with pytest.raises(FileNotFoundError, match="not an attnpipe embeddings dataset"):
        dedup(str(tmp_path / "missing"), str(tmp_path / "o"))
    assert os.listdir(tmp_path) == []  # nothing created
