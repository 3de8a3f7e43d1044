"""The ``minhash`` method: weighted MinHash-LSH pairs (the index's near-duplicate sketches) as dedup pairs.

Sketches are :func:`attnpipe.index.minhash.weighted_minhash` of ``max(embedding, 0)`` (the raw vectors: MinHash
needs non-negative weights, so no centring); candidates come from ``datasketch.MinHashLSH`` and are kept when
their estimated weighted Jaccard reaches the threshold. Vectors are hashed on the driver, so this method is for
datasets that fit in memory; ``semantic`` is the one that scales.

Example::

    a, b, jac = minhash_pairs(X, threshold=0.9)                   # rows of X, a < b
    a, b, jac = minhash_pairs(X, threshold=0.9, other=Y)          # rows of X x rows of Y
"""

from __future__ import annotations

import numpy as np
from datasketch import MinHashLSH, WeightedMinHash

from attnpipe.index.minhash import estimated_jaccard, weighted_minhash

SEED = 1  # the index build's MinHash seed


def _sketches(X: np.ndarray, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    W = np.maximum(np.asarray(X, np.float32), 0)
    ok = W.sum(1) > 0  # an all-zero row has no sketch (weighted_minhash refuses it)
    H = weighted_minhash(W[ok], num_perm, SEED) if ok.any() else np.zeros((0, num_perm, 2), np.int64)
    return np.flatnonzero(ok), np.ascontiguousarray(H)


def minhash_pairs(
    X: np.ndarray, threshold: float = 0.9, num_perm: int = 128, other: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs whose estimated weighted Jaccard is ``>= threshold``: (rows of X, rows of X or ``other``, jaccard)."""
    rows_a, Ha = _sketches(X, num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for i in range(len(rows_a)):
            session.insert(i, WeightedMinHash(SEED, Ha[i]))
    if other is None:
        rows_b, Hb = rows_a, Ha
    else:
        rows_b, Hb = _sketches(other, num_perm)
    cand = [(i, j) for j in range(len(rows_b)) for i in lsh.query(WeightedMinHash(SEED, Hb[j]))]
    if other is None:
        cand = [(i, j) for i, j in cand if i < j]
    if not cand:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b = np.array(cand, np.int64).T
    jac = estimated_jaccard(Ha[a], Hb[b])
    keep = jac >= threshold
    return rows_a[a[keep]], rows_b[b[keep]], jac[keep].astype(np.float32)
