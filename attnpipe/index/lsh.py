"""Random-projection LSH (the design note's): sign bits of projections on random directions, re-ranked by cosine.

``SimHashLSH`` draws ``num_tables x bits`` directions with entries uniform in [-1, 1]; a vector's code in a table is
the sign pattern of its projections packed into a uint64. Vectors sharing a bucket in any table are candidate
neighbours; ``search`` confirms them by exact cosine (optionally against a threshold). Codes are computed per
embedding part in Ray tasks by the index builder, then the tables are built once from all of them: per table the
codes are sorted, so lookups are vectorized ``np.searchsorted`` calls instead of a dict per bucket.

This module also re-exports the weighted MinHash / near-duplicate API of :mod:`attnpipe.index.minhash`.

Example::

    lsh = SimHashLSH(dim=512, num_tables=16, bits=12, seed=0)
    lsh.add(lsh.codes(X), np.arange(len(X)))
    scores, ids = lsh.search(Q, X, k=10)          # X: an array indexed by id, or a callable ids -> vectors
    candidate_recall(exact_top10_ids, lsh.candidates(Q))
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from attnpipe.index.minhash import (
    dedup_table,
    near_duplicate_groups,
    near_duplicate_groups_from_hashes,
    weighted_minhash,
)

if TYPE_CHECKING:
    import torch

# The MinHash names are re-exported: the index builder takes all LSH functions from this module.
__all__ = [
    "SimHashLSH",
    "candidate_recall",
    "dedup_table",
    "near_duplicate_groups",
    "near_duplicate_groups_from_hashes",
    "weighted_minhash",
]

FORMAT = "attnpipe-simhash"
FORMAT_VERSION = 1
_FILES = ("projections", "offsets", "codes", "pos", "ids")  # .npy files written by save()


class SimHashLSH:
    """``num_tables`` hash tables of ``bits``-bit sign codes (cosine LSH) over int64 ids.

    Args:
        dim: vector dimension.
        num_tables: L, tables queried together (more tables: more candidates, higher recall).
        bits: k sign bits per table, 1..64 (more bits: smaller buckets, fewer candidates).
        seed: seeds the projections (numpy ``default_rng``); equal settings give equal codes everywhere.
        center: optional mean vector subtracted before hashing. Embeddings pooled from ReLU features live in a
            narrow cone of the positive orthant, where few random hyperplanes separate them; centering spreads them
            around the origin so the sign bits carry information (bit = ``(x - center) @ p > 0``).
    """

    def __init__(
        self,
        dim: int,
        num_tables: int = 16,
        bits: int = 12,
        seed: int = 0,
        center: np.ndarray | list[float] | None = None,
    ):
        if dim < 1 or num_tables < 1 or not 1 <= bits <= 64:
            raise ValueError(f"need dim >= 1, num_tables >= 1 and 1 <= bits <= 64; got {dim}, {num_tables}, {bits}")
        self.dim, self.num_tables, self.bits, self.seed = int(dim), int(num_tables), int(bits), int(seed)
        rng = np.random.default_rng(seed)
        # (dim, L * k): column l * k + b is bit b of table l
        self.projections = rng.uniform(-1.0, 1.0, size=(dim, num_tables * bits)).astype(np.float32)
        c = np.zeros(dim, np.float32) if center is None else np.asarray(center, np.float32).reshape(dim)
        self.offsets = c @ self.projections  # (L * k,): thresholds, so codes need no centered copy of X
        self._codes = np.zeros((num_tables, 0), np.uint64)  # (L, N) each table's codes, sorted
        self._pos = np.zeros((num_tables, 0), np.int64)  # (L, N) insertion position of each sorted code
        self._ids = np.zeros(0, np.int64)  # (N,) ids in insertion order

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def params(self) -> dict:
        return {"dim": self.dim, "num_tables": self.num_tables, "bits": self.bits, "seed": self.seed}

    def codes(self, X: np.ndarray | torch.Tensor, batch_size: int = 65536) -> np.ndarray:
        """``(n, dim)`` vectors -> ``(n, num_tables)`` uint64 codes; bit b of table l is ``X @ p_lb > 0``.

        ``X`` may be a torch tensor (e.g. embeddings still on the encoder's GPU): the projections then run on its
        device, with the codes the numpy path gives (see :meth:`_codes_torch`).
        """
        if type(X).__module__.startswith("torch"):
            return self._codes_torch(X, batch_size)  # type: ignore[arg-type]
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        if X.shape[1] != self.dim:
            raise ValueError(f"vectors have dim {X.shape[1]}, this LSH has dim {self.dim}")
        out = np.empty((len(X), self.num_tables), np.uint64)
        for s in range(0, len(X), batch_size):
            out[s : s + batch_size] = self._pack((X[s : s + batch_size] @ self.projections) > self.offsets)
        return out

    def _pack(self, bits: np.ndarray) -> np.ndarray:
        """Sign bits ``(b, L * k)`` -> codes ``(b, L)`` uint64."""
        bits = bits.reshape(-1, self.num_tables, self.bits)  # (b, L * k) -> (b, L, k)
        packed = np.packbits(bits, axis=-1, bitorder="little")  # (b, L, ceil(k / 8)) bytes, bit b -> byte b // 8
        padded = np.zeros((*packed.shape[:2], 8), np.uint8)
        padded[..., : packed.shape[2]] = packed
        return padded.view("<u8")[..., 0]  # 8 little-endian bytes -> one uint64 per table

    def _codes_torch(self, X: torch.Tensor, batch_size: int) -> np.ndarray:
        """The codes of float32 rows ``X`` computed on their device, equal to the numpy path's.

        Projections are taken in float64 there. The numpy path's float32 product differs from the exact one by at
        most ``gamma_d * sum_i |x_i p_i|`` (``gamma_d = d u / (1 - d u)``, ``u = 2^-24``, any summation order), so
        a bit whose float64 projection clears its threshold by more than that (plus float64's own, smaller bound)
        is the bit numpy computes. Rows holding a bit inside the band are recomputed by the numpy path itself.
        """
        import torch

        X = torch.atleast_2d(X.detach()).to(torch.float32)
        if X.shape[1] != self.dim:
            raise ValueError(f"vectors have dim {X.shape[1]}, this LSH has dim {self.dim}")
        P = torch.as_tensor(self.projections, device=X.device).double()  # (d, L * k)
        off = torch.as_tensor(self.offsets, device=X.device).double()
        u32, u64 = 2.0**-24, 2.0**-53
        band = (self.dim * u32 / (1 - self.dim * u32) + 2 * (self.dim + 2) * u64) * 1.01  # x 1.01: the band's own
        out = np.empty((len(X), self.num_tables), np.uint64)
        for s in range(0, len(X), batch_size):
            x = X[s : s + batch_size].double()  # float32 values are exact in float64
            gap = x @ P - off  # (b, L * k)
            codes = self._pack((gap > 0).cpu().numpy())
            unsure = (gap.abs_() <= (x.abs() @ P.abs()).mul_(band)).any(1).cpu().numpy()  # a bit inside the band
            if unsure.any():
                x32 = X[s : s + batch_size][torch.as_tensor(unsure, device=X.device)].cpu().numpy()
                codes[unsure] = self.codes(x32)
            out[s : s + len(x)] = codes
        return out

    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Add ``(n, num_tables)`` codes with their int64 ids; the tables end up as if built from all codes at once.

        Raises:
            ValueError: shapes disagree with each other or with ``num_tables``.
        """
        codes = np.asarray(codes)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if codes.ndim != 2 or codes.shape[1] != self.num_tables or len(codes) != len(ids):
            raise ValueError(f"codes must be (len(ids)={len(ids)}, num_tables={self.num_tables}), got {codes.shape}")
        if codes.dtype != np.uint64:
            raise ValueError(f"codes must be uint64 (from SimHashLSH.codes), got {codes.dtype}")
        allc = np.concatenate([self._insertion_codes(), codes])
        order = np.argsort(allc, axis=0, kind="stable").T  # (L, N); stable: equal codes keep insertion order
        self._pos = np.ascontiguousarray(order)
        self._codes = np.take_along_axis(allc.T, self._pos, 1)
        self._ids = np.concatenate([self._ids, ids])

    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        ids: np.ndarray,
        dim: int,
        num_tables: int = 16,
        bits: int = 12,
        seed: int = 0,
        center: np.ndarray | list[float] | None = None,
    ) -> SimHashLSH:
        """Tables built once from the codes of all parts (concatenated in part order)."""
        lsh = cls(dim, num_tables, bits, seed, center)
        lsh.add(codes, ids)
        return lsh

    def emptied(self) -> SimHashLSH:
        """A table with the same projections and offsets (so equal codes) and no entries."""
        out = type(self)(**self.params)
        out.projections, out.offsets = self.projections, self.offsets
        return out

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """``(codes (N, num_tables), ids (N,))`` in insertion order: what ``add`` received."""
        return self._insertion_codes(), np.asarray(self._ids)

    @classmethod
    def merge(cls, parts: Sequence[SimHashLSH]) -> SimHashLSH:
        """One LSH holding the entries of ``parts`` in order, equal to adding all their codes to one.

        Raises:
            ValueError: no parts, or parts with different settings.
        """
        if not parts:
            raise ValueError("merge needs at least one SimHashLSH")
        first = parts[0]
        for p in parts[1:]:
            same = np.array_equal(p.projections, first.projections) and np.array_equal(p.offsets, first.offsets)
            if p.params != first.params or not same:
                raise ValueError(f"cannot merge SimHashLSH with different settings: {p.params} vs {first.params}")
        merged = cls(**first.params)
        merged.projections, merged.offsets = first.projections, first.offsets
        merged.add(np.concatenate([p._insertion_codes() for p in parts]), np.concatenate([p._ids for p in parts]))
        return merged

    def _insertion_codes(self) -> np.ndarray:
        """The stored codes back in insertion order, ``(N, num_tables)``."""
        out = np.empty((len(self._ids), self.num_tables), np.uint64)
        for t in range(self.num_tables):
            out[self._pos[t], t] = self._codes[t]
        return out

    def _candidate_positions(self, qcodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique (query, position) pairs sharing a bucket, with how many tables they share; sorted by query."""
        n, L = len(self._ids), self.num_tables
        lo = np.empty(qcodes.shape, np.int64)  # (b, L)
        hi = np.empty(qcodes.shape, np.int64)
        for t in range(L):
            lo[:, t] = np.searchsorted(self._codes[t], qcodes[:, t], "left")
            hi[:, t] = np.searchsorted(self._codes[t], qcodes[:, t], "right")
        counts = (hi - lo).ravel()  # (b * L,) bucket sizes
        starts = (lo + np.arange(L) * n).ravel()  # offsets into the flattened (L, N) tables
        owner = np.repeat(np.arange(len(counts)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = self._pos.ravel()[starts[owner] + within]
        key, shared = np.unique((owner // L) * n + pos, return_counts=True)  # dedup across tables
        return key // n, key % n, shared

    def candidates(self, Q: np.ndarray, max_candidates: int | None = None, batch_size: int = 1024) -> list[np.ndarray]:
        """Per query (vectors ``(nq, dim)`` or their uint64 codes), the ids sharing a bucket in any table, int64.

        Ordered by the number of tables shared (most first), then by insertion order; ``max_candidates`` keeps the
        first ones. Memory per batch is the sum of the batch's bucket sizes, so keep buckets small (enough bits).
        """
        qcodes = Q if np.asarray(Q).dtype == np.uint64 else self.codes(Q)
        if not len(self):
            return [np.zeros(0, np.int64) for _ in range(len(qcodes))]
        out: list[np.ndarray] = []
        for s in range(0, len(qcodes), batch_size):
            q, pos, shared = self._candidate_positions(qcodes[s : s + batch_size])
            order = np.lexsort((pos, -shared, q))
            q, pos = q[order], pos[order]
            bounds = np.searchsorted(q, np.arange(min(batch_size, len(qcodes) - s) + 1))
            out.extend(self._ids[pos[a:b][:max_candidates]] for a, b in itertools.pairwise(bounds))
        return out

    def search(
        self,
        Q: np.ndarray,
        X_lookup: np.ndarray | Callable[[np.ndarray], np.ndarray],
        k: int = 10,
        max_candidates: int | None = None,
        threshold: float | None = None,
        batch_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by exact cosine among each query's candidates: ``(scores float32 (nq, k), ids int64 (nq, k))``.

        Args:
            Q: ``(nq, dim)`` query vectors (need not be normalized).
            X_lookup: ids -> ``(m, dim)`` vectors: an array indexed by id, or a callable.
            k: results per query; rows are padded with score -inf and id -1 when fewer candidates remain.
            max_candidates: re-rank at most this many candidates per query (see ``candidates``).
            threshold: drop candidates whose cosine is below it (the design note's confirmation step).
        """
        Q = np.atleast_2d(np.asarray(Q, dtype=np.float32))
        Qn = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
        lookup = X_lookup if callable(X_lookup) else np.asarray(X_lookup).__getitem__
        scores = np.full((len(Q), k), -np.inf, np.float32)
        ids = np.full((len(Q), k), -1, np.int64)
        for s in range(0, len(Q), batch_size):
            cands = self.candidates(Q[s : s + batch_size], max_candidates, batch_size)
            uniq, inv = np.unique(np.concatenate(cands), return_inverse=True)  # fetch each vector once per batch
            if not len(uniq):
                continue
            V = np.asarray(lookup(uniq), dtype=np.float32).reshape(len(uniq), self.dim)
            V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
            bounds = np.cumsum([0] + [len(c) for c in cands])
            for i, (a, b) in enumerate(itertools.pairwise(bounds)):
                sc = V[inv[a:b]] @ Qn[s + i]
                keep = np.flatnonzero(sc >= threshold) if threshold is not None else np.arange(b - a)
                top = keep[np.argsort(-sc[keep], kind="stable")[:k]]
                scores[s + i, : len(top)] = sc[top]
                ids[s + i, : len(top)] = cands[i][top]
        return scores, ids

    def save(self, path: str) -> None:
        """Write ``path/{projections,codes,pos,ids}.npy`` and ``path/simhash.json`` (last, via rename)."""
        os.makedirs(path, exist_ok=True)
        arrays: dict[str, np.ndarray] = dict(
            zip(_FILES, (self.projections, self.offsets, self._codes, self._pos, self._ids))
        )
        for name, arr in arrays.items():
            tmp = os.path.join(path, f".{name}.tmp.npy")
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, os.path.join(path, f"{name}.npy"))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, **self.params, "count": len(self)}
        tmp = os.path.join(path, ".simhash.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(path, "simhash.json"))

    @classmethod
    def load(cls, path: str, mmap: bool = False) -> SimHashLSH:
        """Read what ``save`` wrote (never unpickles); ``mmap`` maps the tables instead of reading them.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: not an attnpipe SimHash directory, or arrays that disagree with its ``simhash.json``.
        """
        with open(os.path.join(path, "simhash.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}/simhash.json is not an {FORMAT} v{FORMAT_VERSION} file: {meta}")
        lsh = cls(meta["dim"], meta["num_tables"], meta["bits"], meta["seed"])
        arr = {
            n: np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r" if mmap else None, allow_pickle=False)
            for n in _FILES
        }
        L, n = lsh.num_tables, meta["count"]
        expected = {
            "projections": (lsh.dim, L * lsh.bits),
            "offsets": (L * lsh.bits,),
            "codes": (L, n),
            "pos": (L, n),
            "ids": (n,),
        }
        for name, shape in expected.items():
            if arr[name].shape != shape:
                raise ValueError(f"{path}/{name}.npy has shape {arr[name].shape}, simhash.json implies {shape}")
        lsh.projections, lsh.offsets, lsh._codes, lsh._pos, lsh._ids = (arr[n] for n in _FILES)
        return lsh


def candidate_recall(true_topk_ids: np.ndarray, candidates: Sequence[np.ndarray]) -> float:
    """Fraction of the true top-k ids (``(nq, k)``, -1 entries ignored) found among each query's candidates."""
    true = np.asarray(true_topk_ids, dtype=np.int64).reshape(len(candidates), -1)
    qt, col = np.nonzero(true >= 0)
    if not len(qt):
        return float("nan")
    lens = np.array([len(c) for c in candidates])
    qc = np.repeat(np.arange(len(candidates)), lens)
    ic = np.concatenate(candidates).astype(np.int64) if lens.sum() else np.zeros(0, np.int64)
    uniq, inv = np.unique(np.concatenate([ic, true[qt, col]]), return_inverse=True)  # ids -> 0..u-1
    u = len(uniq)
    found = np.isin(qt * u + inv[len(ic) :], qc * u + inv[: len(ic)])  # (query, id) pairs as one int64 key
    return float(found.mean())
