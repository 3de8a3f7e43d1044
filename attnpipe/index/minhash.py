"""Weighted MinHash of embedding batches, bit-identical to datasketch, and near-duplicate groups via MinHashLSH.

``weighted_minhash`` returns exactly the ``hashvalues`` that ``datasketch.WeightedMinHashGenerator.minhash`` gives
row by row (same random draws, same float32 operations in the same order), vectorized over rows and permutations
in cache-sized chunks; the index build calls it per embedding part in Ray tasks. ``near_duplicate_groups`` puts the
sketches into ``datasketch.MinHashLSH``, confirms candidates by estimated weighted Jaccard and returns the
connected components.

Input contract: weights must be non-negative and finite. Embeddings pooled by ``avg``/``max``/``avgmax``/``gem``/
``crow``/``attn`` from a post-ReLU feature map (ResNet) are non-negative; ``mha`` (a learned output projection) and
SiLU backbones (EfficientNet) give signed values, so callers clamp first (the index builder uses ``np.maximum(X, 0)``).

Example::

    H = weighted_minhash(np.maximum(X, 0), num_perm=128, seed=1)        # (n, 128, 2) int64
    groups = near_duplicate_groups(ids, np.maximum(X, 0), threshold=0.9)
    pq.write_table(dedup_table(groups), "near_duplicates.parquet")
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from datasketch import MinHashLSH, WeightedMinHash, WeightedMinHashGenerator

HASH_DTYPE = np.dtype(np.int64)  # datasketch's ``np.zeros((sample_size, 2), dtype=int)``
# Elements per (rows, perms, dims) work array: two float32 buffers of 1 MiB stay in L2 (2 MiB per core on the 2-core
# EPYC), which measured 3-5x faster than whole-batch arrays: the work is seven streaming float32 ops per element.
_CHUNK_ELEMENTS = 1 << 18
_cuda_exact: dict[str, bool] = {}  # device -> whether its results matched the CPU path (checked on first use)


@functools.lru_cache(maxsize=8)
def _draws(dim: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """datasketch's ``rs, ln_cs, betas`` ``(num_perm, dim)`` float32, drawn by datasketch itself (same order)."""
    g = WeightedMinHashGenerator(dim, sample_size=num_perm, seed=seed)
    for a in (g.rs, g.ln_cs, g.betas):
        a.flags.writeable = False  # shared by the cache
    return g.rs, g.ln_cs, g.betas


def _check(X: np.ndarray) -> np.ndarray:
    """``X`` as float32 after the contract checks; raises ValueError naming the offending rows."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] == 0:
        raise ValueError(f"weighted_minhash needs a 2-D array (n, dim) with dim >= 1, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"weighted_minhash needs real numbers, got dtype {X.dtype}")
    neg = (X < 0).any(1)  # on the input: a tiny negative float64 must not pass as float32 -0.0
    if neg.any():
        raise ValueError(
            f"weighted MinHash needs non-negative weights; rows {_rows(neg)} have negative entries "
            "(clamp first, e.g. np.maximum(X, 0))"
        )
    with np.errstate(over="ignore"):
        X32 = X.astype(np.float32, copy=False)  # datasketch casts each row to float32: tiny values may become 0
    bad = ~np.isfinite(X32).all(1)
    if bad.any():
        raise ValueError(
            f"weighted MinHash needs finite weights; rows {_rows(bad)} have NaN or inf (after the float32 cast)"
        )
    zero = ~X32.any(1)
    if zero.any():
        raise ValueError(
            f"weighted MinHash is undefined for all-zero rows (zero after the float32 cast): rows {_rows(zero)}"
        )
    return X32


def _rows(mask: npt.ArrayLike) -> str:
    idx = np.flatnonzero(mask)
    return ", ".join(map(str, idx[:10])) + (f" ... ({len(idx)} rows)" if len(idx) > 10 else "")


def _hash_chunk(vlog: np.ndarray, rs: np.ndarray, ln_cs: np.ndarray, betas: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``vlog (c, d)`` (-inf at zero weights) -> hashvalues ``(c, P, 2)``; datasketch's float32 ops, same order.

    A zero weight has ``log = -inf``, which propagates to ``ln_a = +inf``, so argmin skips it like datasketch's
    ``nanargmin`` skips its NaNs; ties go to the lowest dimension in both. ``buf`` holds ``2 * c * P * d`` float32.
    """
    c, d = vlog.shape
    P = rs.shape[0]
    t = buf[: c * P * d].reshape(c, P, d)
    ln_a = buf[c * P * d : 2 * c * P * d].reshape(c, P, d)
    np.divide(vlog[:, None, :], rs, out=t)  # (c, 1, d) against (P, d) -> (c, P, d)
    np.add(t, betas, out=t)
    np.floor(t, out=t)  # t = floor(vlog / r + beta)
    np.subtract(t, betas, out=ln_a)
    np.multiply(ln_a, rs, out=ln_a)  # ln_y = (t - beta) * r
    np.subtract(ln_cs, ln_a, out=ln_a)
    np.subtract(ln_a, rs, out=ln_a)  # ln_a = ln_c - ln_y - r
    k = ln_a.argmin(-1)  # (c, P)
    out = np.empty((c, P, 2), HASH_DTYPE)
    out[..., 0] = k
    out[..., 1] = np.take_along_axis(t, k[..., None], -1)[..., 0]
    return out


def _hash_cpu(X32: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray], threads: int) -> np.ndarray:
    n, d = X32.shape
    P = draws[0].shape[0]
    out = np.empty((n, P, 2), HASH_DTYPE)
    rows = max(1, _CHUNK_ELEMENTS // (P * d))

    def run(block: range) -> None:
        buf = np.empty(2 * rows * P * d, np.float32)  # reused: fresh MiB-sized arrays per chunk cost page faults
        for s in range(block.start, block.stop, rows):
            x = X32[s : min(s + rows, block.stop)]
            cols = np.flatnonzero(x.any(0))
            with np.errstate(divide="ignore"):  # log(0) = -inf marks zero weights
                # Sparse chunk: only its non-zero dims can win, but gathering the draws costs about 3 of the 7
                # ops per element, so it pays when few columns are left (measured: <20% at 1 row, <50% at 4 rows).
                if len(cols) * (len(x) + 4) <= d * len(x):
                    # np.take keeps C order (x[:, cols] would be Fortran-ordered: strided, 3x slower ops after)
                    rs, ln_cs, betas = (np.take(a, cols, 1) for a in draws)
                    h = _hash_chunk(np.log(np.take(x, cols, 1)), rs, ln_cs, betas, buf)
                    h[..., 0] = cols[h[..., 0]]  # cols ascend, so ties still go to the lowest dimension
                else:
                    h = _hash_chunk(np.log(x), *draws, buf)
            out[s : s + len(x)] = h

    blocks = min(threads, -(-n // rows))
    if blocks > 1:  # numpy ufuncs release the GIL; one contiguous block of rows per thread
        bounds = np.linspace(0, n, blocks + 1).astype(int)
        with ThreadPoolExecutor(blocks) as pool:
            list(pool.map(run, [range(a, b) for a, b in itertools.pairwise(bounds)]))
    else:
        run(range(n))
    return out


def _hash_torch(X32: np.ndarray, draws: tuple[np.ndarray, ...], device: str) -> np.ndarray:
    """The same float32 ops in torch; ``log`` stays in numpy so its (library-specific) rounding is datasketch's."""
    import torch

    with np.errstate(divide="ignore"):
        vlog_all = np.log(X32)
    rs, ln_cs, betas = (torch.tensor(a, device=device) for a in draws)  # copies: the cached draws are read-only
    P, d = rs.shape
    out = torch.empty((len(X32), P, 2), dtype=torch.int64, device=device)
    step = max(1, (1 << 26) // (P * d))
    for s in range(0, len(X32), step):
        vl = torch.from_numpy(vlog_all[s : s + step]).to(device)[:, None, :]  # (c, 1, d)
        t = torch.floor(torch.div(vl, rs).add_(betas))
        ln_a = torch.sub(ln_cs, torch.sub(t, betas).mul_(rs)).sub_(rs)
        k = ln_a.argmin(-1)  # first minimum on ties (documented torch behaviour)
        out[s : s + step, :, 0] = k
        out[s : s + step, :, 1] = torch.gather(t, -1, k[..., None])[..., 0].to(torch.int64)
    return out.cpu().numpy()


def weighted_minhash(
    X: np.ndarray, num_perm: int = 128, seed: int = 1, device: str | None = None, threads: int = 1
) -> np.ndarray:
    """Weighted MinHash (Ioffe's ICWS) of every row, equal to datasketch's ``hashvalues`` bit for bit.

    Args:
        X: ``(n, dim)`` non-negative finite weights (any real dtype; cast to float32 as datasketch does).
        num_perm: samples per sketch (datasketch's ``sample_size``).
        seed: datasketch's generator seed.
        device: ``"cpu"`` (numpy), ``"cuda"`` (torch), or None for CUDA when available. The CUDA path is checked
            against the CPU path on a few rows the first time it runs in a process; on any mismatch it warns and
            stays on CPU.
        threads: CPU threads over row chunks (keep 1 inside a 1-CPU Ray task).

    Returns:
        ``(n, num_perm, 2)`` int64: per sample the winning dimension ``k`` and its quantized log weight ``t[k]``,
        i.e. ``WeightedMinHashGenerator(dim, num_perm, seed).minhash(X[i]).hashvalues`` for each row ``i``.

    Raises:
        ValueError: a row is all zero (datasketch's "Input is all zeros"), has a negative entry, NaN or inf; the
            message lists the rows.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    X32 = _check(X)
    draws = _draws(X32.shape[1], int(num_perm), int(seed))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return _hash_cpu(X32, draws, max(1, threads))
    if _cuda_exact.get(device) is False:
        return _hash_cpu(X32, draws, max(1, threads))
    out = _hash_torch(X32, draws, device)
    if device not in _cuda_exact and len(X32):
        probe = np.unique(np.linspace(0, len(X32) - 1, min(len(X32), 64)).astype(int))
        _cuda_exact[device] = bool(np.array_equal(out[probe], _hash_cpu(X32[probe], draws, 1)))
        if not _cuda_exact[device]:
            warnings.warn(
                f"weighted_minhash on {device} differs from datasketch's results; using the CPU path",
                RuntimeWarning,
                stacklevel=2,
            )
            return _hash_cpu(X32, draws, max(1, threads))
    return out


def estimated_jaccard(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise ``WeightedMinHash.jaccard`` of hashvalue batches ``(m, P, 2)``: fraction of equal ``(k, t)`` pairs."""
    return (A == B).all(-1).mean(-1)


def near_duplicate_groups_from_hashes(
    ids: Sequence[str], hashes: np.ndarray, threshold: float = 0.9, num_perm: int | None = None, seed: int = 1
) -> list[list[str]]:
    """Near-duplicate groups from precomputed ``weighted_minhash`` output ``(n, P, 2)``.

    Candidates come from ``datasketch.MinHashLSH(threshold, num_perm)`` fed with ``WeightedMinHash`` objects and
    are kept when their estimated weighted Jaccard is ``>= threshold``; groups are the connected components of the
    kept pairs with at least two members. Each group is sorted and the groups are sorted.

    Raises:
        ValueError: ids and hashes disagree in length or ``num_perm``, or ids repeat.
    """
    hashes = np.ascontiguousarray(hashes)  # MinHashLSH hashes the raw bytes of each band
    n = len(ids)
    if hashes.ndim != 3 or hashes.shape[0] != n or hashes.shape[2] != 2:
        raise ValueError(f"hashes must be (len(ids)={n}, num_perm, 2), got shape {hashes.shape}")
    num_perm = num_perm or hashes.shape[1]
    if hashes.shape[1] != num_perm:
        raise ValueError(f"hashes have {hashes.shape[1]} samples, num_perm is {num_perm}")
    repeated = [i for i, c in Counter(ids).items() if c > 1]
    if repeated:
        raise ValueError(f"ids must be unique; repeated: {sorted(repeated)[:10]}")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches = [WeightedMinHash(seed, hashes[i]) for i in range(n)]
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m)  # row numbers as keys: cheaper than strings, and ids are mapped back below
    pairs = [(i, j) for i, m in enumerate(sketches) for j in lsh.query(m) if j > i]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if pairs:
        a, b = np.array(pairs).T
        keep = estimated_jaccard(hashes[a], hashes[b]) >= threshold
        for i, j in zip(a[keep].tolist(), b[keep].tolist()):
            parent[find(i)] = find(j)
    members: dict[int, list[str]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(ids[i])
    return sorted(sorted(g) for g in members.values() if len(g) > 1)


def near_duplicate_groups(
    ids: Sequence[str], X: np.ndarray, threshold: float = 0.9, num_perm: int = 128, seed: int = 1
) -> list[list[str]]:
    """Groups of ids whose rows of ``X`` (non-negative, see module doc) are near-duplicates by weighted Jaccard.

    Raises:
        ValueError: as ``weighted_minhash`` (negative, non-finite or all-zero rows) and as
            ``near_duplicate_groups_from_hashes``.
    """
    return near_duplicate_groups_from_hashes(ids, weighted_minhash(X, num_perm, seed), threshold, num_perm, seed)


def dedup_table(groups: list[list[str]]) -> pa.Table:
    """One row per grouped id: ``group`` (int32), ``id``, ``representative`` (the group's first id)."""
    return pa.table(
        {
            "group": pa.array([g for g, members in enumerate(groups) for _ in members], pa.int32()),
            "id": pa.array([i for members in groups for i in members], pa.string()),
            "representative": pa.array([members[0] for members in groups for _ in members], pa.string()),
        }
    )
