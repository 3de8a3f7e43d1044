"""LSH: weighted MinHash bit-identical to datasketch, SimHash tables against exact references, near-duplicate groups."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasketch import WeightedMinHash, WeightedMinHashGenerator

from attnpipe.index.lsh import SimHashLSH, candidate_recall
from attnpipe.index.minhash import (
    dedup_table,
    estimated_jaccard,
    near_duplicate_groups,
    near_duplicate_groups_from_hashes,
    weighted_minhash,
)


def datasketch_hashes(X: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    gen = WeightedMinHashGenerator(X.shape[1], sample_size=num_perm, seed=seed)
    return np.stack([gen.minhash(x).hashvalues for x in X])


def sparse_nonneg(n: int, dim: int, zeros: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.exponential(size=(n, dim)) ** 2 * (rng.random((n, dim)) >= zeros)
    X[np.arange(n), rng.integers(0, dim, n)] += 0.5  # no all-zero rows
    return X.astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    X = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


# --- weighted MinHash --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_perm", [1, 7, 128])
@pytest.mark.parametrize("seed", [1, 42])
def test_weighted_minhash_equals_datasketch_on_sparse_rows(num_perm, seed):
    X = sparse_nonneg(200, 64, zeros=0.7, seed=seed)
    ref = datasketch_hashes(X, num_perm, seed)
    got = weighted_minhash(X, num_perm=num_perm, seed=seed, device="cpu")
    assert got.shape == ref.shape == (200, num_perm, 2) and got.dtype == ref.dtype
    assert np.array_equal(got, ref)
    assert np.array_equal(weighted_minhash(X, num_perm, seed, device="cpu", threads=2), ref)


@pytest.mark.parametrize("shape, zeros", [((60, 512), 0.0), ((60, 512), 0.5), ((40, 400), 0.98)])
def test_weighted_minhash_equals_datasketch_dense_and_high_dim_sparse(shape, zeros):
    # (40, 400) at 98% zeros takes the column-compressed path; the others the dense one
    X = sparse_nonneg(*shape, zeros=zeros, seed=3)
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # like attnpipe embeddings
    assert np.array_equal(weighted_minhash(X, 128, 5, device="cpu"), datasketch_hashes(X, 128, 5))


def test_weighted_minhash_casts_like_datasketch():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(30, 20))  # integer term counts
    counts[:, 0] += 1
    assert np.array_equal(weighted_minhash(counts, 16, 2, device="cpu"), datasketch_hashes(counts, 16, 2))
    X = rng.random((5, 8))  # float64, one entry that float32 rounds to zero
    X[0, 3] = 1e-50
    assert np.array_equal(weighted_minhash(X, 32, 2, device="cpu"), datasketch_hashes(X, 32, 2))


def test_weighted_minhash_rejects_bad_rows():
    X = sparse_nonneg(6, 10, 0.5, seed=0)
    zero = X.copy()
    zero[[2, 4]] = 0
    with pytest.raises(ValueError, match=r"all-zero rows.*rows 2, 4"):
        weighted_minhash(zero, 8, 1)
    with pytest.raises(ValueError, match="Input is all zeros"):  # datasketch's own behaviour, for reference
        WeightedMinHashGenerator(10, 8, 1).minhash(zero[2])
    tiny = X.astype(np.float64)
    tiny[1] = 1e-60  # non-zero in float64, zero once cast to float32 like datasketch does
    with pytest.raises(ValueError, match="rows 1"):
        weighted_minhash(tiny, 8, 1)
    neg = X.copy()
    neg[3, 1] = -0.1
    with pytest.raises(ValueError, match=r"non-negative.*rows 3.*np\.maximum"):
        weighted_minhash(neg, 8, 1)
    nan = X.copy()
    nan[5, 0] = np.nan
    with pytest.raises(ValueError, match="rows 5 have NaN or inf"):
        weighted_minhash(nan, 8, 1)
    with pytest.raises(ValueError, match="2-D"):
        weighted_minhash(X[0], 8, 1)


def test_torch_path_equals_datasketch_on_torch_cpu():
    from attnpipe.index import minhash

    X = sparse_nonneg(100, 300, zeros=0.5, seed=1)  # the CUDA code path, run on torch's CPU device
    assert np.array_equal(minhash._hash_torch(X, minhash._draws(300, 64, 3), "cpu"), datasketch_hashes(X, 64, 3))


def test_device_path_that_differs_falls_back_to_cpu(monkeypatch):
    from attnpipe.index import minhash

    monkeypatch.setattr(minhash, "_hash_torch", lambda X, draws, device: np.zeros((len(X), 16, 2), np.int64))
    monkeypatch.setattr(minhash, "_cuda_exact", {})
    X = sparse_nonneg(20, 30, zeros=0.5, seed=1)
    with pytest.warns(RuntimeWarning, match="using the CPU path"):
        got = weighted_minhash(X, 16, 1, device="cuda:9")
    assert np.array_equal(got, datasketch_hashes(X, 16, 1)) and minhash._cuda_exact == {"cuda:9": False}
    assert np.array_equal(weighted_minhash(X, 16, 1, device="cuda:9"), got)  # remembered: no second try


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weighted_minhash_cuda_equals_cpu():
    from attnpipe.index import minhash

    X = sparse_nonneg(500, 512, zeros=0.5, seed=7)
    cpu = weighted_minhash(X, 128, 3, device="cpu")
    assert np.array_equal(weighted_minhash(X, 128, 3, device="cuda"), cpu)
    assert minhash._cuda_exact.get("cuda") is True  # no silent fallback to the CPU path


# --- SimHash -----------------------------------------------------------------------------------------------------


def test_projections_uniform_in_unit_interval_and_seeded():
    lsh = SimHashLSH(dim=64, num_tables=16, bits=32, seed=3)
    P = lsh.projections
    assert P.shape == (64, 16 * 32) and P.dtype == np.float32
    assert P.min() >= -1 and P.max() <= 1 and P.min() < -0.99 and P.max() > 0.99
    quarters = np.histogram(P, bins=[-1, -0.5, 0, 0.5, 1])[0] / P.size
    assert np.allclose(quarters, 0.25, atol=0.02)  # uniform, not normal
    assert np.array_equal(SimHashLSH(64, 16, 32, seed=3).projections, P)
    assert not np.array_equal(SimHashLSH(64, 16, 32, seed=4).projections, P)


@pytest.mark.parametrize("bits", [1, 13, 64])
def test_codes_match_per_bit_reference(bits):
    X = clustered(300, 48, 5, seed=1)
    lsh = SimHashLSH(48, num_tables=5, bits=bits, seed=0)
    codes = lsh.codes(X, batch_size=128)
    assert codes.shape == (300, 5) and codes.dtype == np.uint64
    proj = X.astype(np.float64) @ lsh.projections.astype(np.float64)
    ref = np.zeros((300, 5), np.uint64)
    care = np.zeros((300, 5), np.uint64)  # bits whose projection is clearly away from 0 (float32 vs float64 sign)
    for t in range(5):
        for b in range(bits):
            p = proj[:, t * bits + b]
            ref[:, t] |= (p > 0).astype(np.uint64) << np.uint64(b)
            care[:, t] |= (np.abs(p) > 1e-4).astype(np.uint64) << np.uint64(b)
    assert np.array_equal(codes & care, ref & care)
    assert (care != 0).all()


def test_identical_vectors_collide_in_every_table():
    X = clustered(500, 32, 10)
    lsh = SimHashLSH(32, num_tables=8, bits=16, seed=1)
    assert np.array_equal(lsh.codes(X), lsh.codes(3.0 * X.copy()))  # scale-invariant: cosine LSH
    lsh.add(lsh.codes(X), np.arange(500))
    for i, cand in enumerate(lsh.candidates(X[:50])):
        assert cand[0] == i  # shares all 8 tables, so it is ranked first


def test_candidate_recall_and_search_on_clustered_data(capsys):
    X = clustered(2000, 64, 20)
    lsh = SimHashLSH(64, num_tables=16, bits=12, seed=0)
    lsh.add(lsh.codes(X), np.arange(len(X)))
    Q = X[:300]
    exact = np.argsort(-(Q @ X.T), axis=1, kind="stable")[:, :10]
    cands = lsh.candidates(Q)
    recall = candidate_recall(exact, cands)
    mean_cands = np.mean([len(c) for c in cands])
    with capsys.disabled():
        print(
            f"\nsimhash L=16 k=12, 2000x64 in 20 clusters: candidate recall@10 {recall:.3f}, "
            f"{mean_cands:.0f} candidates/query"
        )
    assert recall > 0.8 and mean_cands < 0.1 * len(X)
    scores, ids = lsh.search(Q, X, k=10)
    assert np.array_equal(ids[:, 0], np.arange(300))  # a database vector finds itself first
    assert np.allclose(scores[:, 0], 1, atol=1e-5) and (np.diff(scores, axis=1) <= 0).all()
    for i in (0, 17, 299):  # exactly the cosine top-10 among the candidates
        sc = X[cands[i]] @ Q[i]
        assert set(ids[i]) == set(cands[i][np.argsort(-sc)[:10]])
        assert np.allclose(scores[i], np.sort(sc)[::-1][:10], atol=1e-5)
    # ids need not be row numbers: a callable maps them to vectors
    lsh2 = SimHashLSH.from_codes(lsh.codes(X), np.arange(len(X)) + 1000, dim=64, num_tables=16, bits=12, seed=0)
    s2, i2 = lsh2.search(Q, lambda ids: X[ids - 1000], k=10)
    assert np.array_equal(i2, ids + 1000) and np.array_equal(s2, scores)


def test_search_pads_and_thresholds():
    X = clustered(3, 16, 3)
    lsh = SimHashLSH.from_codes(SimHashLSH(16, 4, 8, 0).codes(X), np.arange(3), dim=16, num_tables=4, bits=8, seed=0)
    scores, ids = lsh.search(X[:1], X, k=10)
    n = int((ids[0] >= 0).sum())
    assert 1 <= n <= 3 and (ids[0, n:] == -1).all() and np.isneginf(scores[0, n:]).all()
    scores, ids = lsh.search(X[:1], X, k=10, threshold=0.999)
    assert ids[0, 0] == 0 and (ids[0, 1:] == -1).all()
    empty = SimHashLSH(16, 4, 8, 0)
    assert [len(c) for c in empty.candidates(X)] == [0, 0, 0]
    assert (empty.search(X, X, k=2)[1] == -1).all()


def test_save_load_round_trip(tmp_path):
    X = clustered(1000, 32, 8)
    lsh = SimHashLSH(32, num_tables=6, bits=10, seed=9, center=X.mean(0))
    lsh.add(lsh.codes(X), np.arange(len(X)) * 7)
    lsh.save(str(tmp_path / "simhash"))
    assert sorted(os.listdir(tmp_path / "simhash")) == [
        "codes.npy",
        "ids.npy",
        "offsets.npy",
        "pos.npy",
        "projections.npy",
        "simhash.json",
    ]
    for mmap in (False, True):
        back = SimHashLSH.load(str(tmp_path / "simhash"), mmap=mmap)
        assert back.params == lsh.params and len(back) == 1000
        assert np.array_equal(back.codes(X), lsh.codes(X))
        for a, b in zip(back.candidates(X[:50]), lsh.candidates(X[:50])):
            assert np.array_equal(a, b)
        s1, i1 = lsh.search(X[:50], lambda ids: X[ids // 7], k=5)
        s2, i2 = back.search(X[:50], lambda ids: X[ids // 7], k=5)
        assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    np.save(tmp_path / "simhash" / "ids.npy", np.arange(5))
    with pytest.raises(ValueError, match="ids.npy has shape"):
        SimHashLSH.load(str(tmp_path / "simhash"))


def test_build_from_parts_equals_build_at_once():
    X = clustered(900, 24, 6)
    ids = np.arange(900, dtype=np.int64) * 3 + 1
    whole = SimHashLSH(24, num_tables=5, bits=6, seed=2)  # few bits: many equal codes, so order matters
    whole.add(whole.codes(X), ids)
    parts = np.array_split(np.arange(900), 3)
    pieces = []
    for p in parts:
        piece = SimHashLSH(24, 5, 6, 2)
        piece.add(piece.codes(X[p]), ids[p])
        pieces.append(piece)
    merged = SimHashLSH.merge(pieces)
    incremental = SimHashLSH(24, 5, 6, 2)
    for p in parts:
        incremental.add(incremental.codes(X[p]), ids[p])
    from_codes = SimHashLSH.from_codes(np.concatenate([whole.codes(X[p]) for p in parts]), ids, **whole.params)
    for other in (merged, incremental, from_codes):
        assert np.array_equal(other._codes, whole._codes) and np.array_equal(other._pos, whole._pos)
        assert np.array_equal(other._ids, whole._ids)
        assert all(np.array_equal(a, b) for a, b in zip(other.candidates(X[:40]), whole.candidates(X[:40])))
    with pytest.raises(ValueError, match="different settings"):
        SimHashLSH.merge([pieces[0], SimHashLSH(24, 5, 6, seed=3)])


def test_invalid_settings_and_inputs():
    with pytest.raises(ValueError, match="bits <= 64"):
        SimHashLSH(8, 4, 65)
    lsh = SimHashLSH(8, 4, 8)
    with pytest.raises(ValueError, match="dim 9"):
        lsh.codes(np.ones((2, 9), np.float32))
    with pytest.raises(ValueError, match="uint64"):
        lsh.add(np.ones((2, 4), np.int64), np.arange(2))
    with pytest.raises(ValueError, match="num_tables=4"):
        lsh.add(np.ones((2, 3), np.uint64), np.arange(2))


def test_candidate_recall_counts_found_ids():
    true = np.array([[1, 2, 3, -1], [7, 8, -1, -1]])
    cands = [np.array([3, 1, 9]), np.array([], np.int64)]
    assert candidate_recall(true, cands) == pytest.approx(2 / 5)


# --- near duplicates ---------------------------------------------------------------------------------------------


def test_near_duplicate_groups_find_planted_copies():
    rng = np.random.default_rng(0)
    base = rng.exponential(size=(300, 64)).astype(np.float32)
    planted = {5: [300], 17: [301, 302], 123: [303]}  # 17 has two noisy copies: one group of three
    copies = [base[src] + 1e-3 * rng.random(64).astype(np.float32) for src, cs in planted.items() for _ in cs]
    X = np.concatenate([base, np.stack(copies)])
    ids = [f"img/{i:04d}" for i in range(len(X))]
    groups = near_duplicate_groups(ids, X, threshold=0.9, num_perm=128, seed=1)
    expected = sorted(sorted([ids[src]] + [ids[c] for c in cs]) for src, cs in planted.items())
    assert groups == expected
    table = dedup_table(groups)
    assert table.schema == pa.schema([("group", pa.int32()), ("id", pa.string()), ("representative", pa.string())])
    assert table.num_rows == 7 and table.column("representative").to_pylist()[:2] == [ids[5], ids[5]]
    assert dedup_table([]).num_rows == 0


def test_near_duplicate_verification_matches_datasketch_jaccard():
    X = sparse_nonneg(40, 32, 0.3, seed=2)
    X[1] = X[0] * 1.001
    H = weighted_minhash(X, 64, 4, device="cpu")
    for i, j in [(0, 1), (0, 2), (5, 9)]:
        est = WeightedMinHash(4, H[i]).jaccard(WeightedMinHash(4, H[j]))
        assert estimated_jaccard(H[i][None], H[j][None])[0] == est
    ids = [str(i) for i in range(40)]
    assert near_duplicate_groups_from_hashes(ids, H, threshold=0.8, num_perm=64, seed=4) == [["0", "1"]]
    with pytest.raises(ValueError, match="unique"):
        near_duplicate_groups_from_hashes(["a"] * 40, H)
    with pytest.raises(ValueError, match="num_perm"):
        near_duplicate_groups_from_hashes(ids, H, num_perm=128)


def test_centering_separates_cone_shaped_data():
    """ReLU-pooled embeddings sit in a narrow positive cone; centred hashing must recover recall there."""
    rng = np.random.default_rng(3)
    base = np.abs(rng.normal(size=(1, 64))) * 4
    X = np.abs(base + clustered(3000, 64, 30, seed=3))  # positive, all within a narrow cone
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    Q = X[:200]
    exact = np.argsort(-(Q @ X.T), axis=1)[:, 1:11]
    plain = SimHashLSH(64, num_tables=16, bits=12, seed=0)
    plain.add(plain.codes(X), np.arange(len(X)))
    centred = SimHashLSH(64, num_tables=16, bits=12, seed=0, center=X.mean(0))
    centred.add(centred.codes(X), np.arange(len(X)))
    n_plain = np.mean([len(c) for c in plain.candidates(Q)])
    n_centred = np.mean([len(c) for c in centred.candidates(Q)])
    r_centred = candidate_recall(exact, centred.candidates(Q))
    assert n_centred < 0.5 * n_plain, (n_plain, n_centred)  # buckets no longer hold most of the data
    assert r_centred > 0.8, r_centred
    # bit = (x - c) @ p > 0, computed through offsets
    ref = ((X[:5] - X.mean(0)) @ centred.projections > 0).reshape(5, 16, 12)
    weights = (1 << np.arange(12)).astype(np.uint64)
    assert np.array_equal((ref.astype(np.uint64) * weights).sum(-1), centred.codes(X[:5]))
