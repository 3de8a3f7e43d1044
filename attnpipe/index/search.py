"""Searching a published index version: vectors or ids -> ranked string ids with cosine scores.

Indices know vectors, not networks: search by image (which needs the encoder) is :mod:`attnpipe.query`, one layer
up. This module imports faiss, numpy and the store, never torch or the models.

Example::

    index = SearchIndex.load("out/index")                 # CURRENT, checksums verified
    scores, ids = index.search(vectors, k=10)             # (nq, k) float32, list of lists of str
    hits = index.search_id("shard-00000/000042", k=5)     # [(id, score), ...], the id itself first
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attnpipe import store
from attnpipe.index import faiss_index as fx
from attnpipe.index import layout


class SearchIndex:
    """One loaded index version: faiss index (or shards), id map, tuned search parameter."""

    def __init__(self, manifest: dict, indexes: list[faiss.Index], faiss_ids: np.ndarray, ids: np.ndarray):
        self.manifest = manifest
        self.indexes = indexes
        order = np.argsort(faiss_ids)
        self._fids, self._ids = faiss_ids[order], ids[order]
        f = manifest["faiss"]
        param = next((p for p in ("nprobe", "efSearch") if p in f), None)
        fx.set_search_param(indexes, param, f.get(param))

    @classmethod
    def load(cls, root: str, version: str | None = None) -> SearchIndex:
        """Load ``version`` (default ``CURRENT``) after verifying every file's checksum.

        Raises:
            layout.IndexLayoutError: no such root/version, or a missing or damaged file (named).
        """
        manifest = layout.load_manifest(root, version, verify=True)
        path = manifest["path"]
        indexes = fx.load_version(manifest)  # on-disk inverted lists are found beside the index, wherever it is
        table = pq.read_table(os.path.join(path, "ids.parquet"))
        ids = np.array(table.column("id").to_pylist(), dtype=object)
        return cls(manifest, indexes, table.column("faiss_id").to_numpy(), ids)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def id_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(faiss ids sorted ascending, the string id of each): the content of ``ids.parquet``."""
        return self._fids, self._ids

    def lookup(self, faiss_ids: np.ndarray) -> np.ndarray:
        """faiss ids -> string ids (None for -1)."""
        pos = np.clip(np.searchsorted(self._fids, faiss_ids), 0, len(self._fids) - 1)
        found = (faiss_ids >= 0) & (self._fids[pos] == faiss_ids)
        return np.where(found, self._ids[pos], np.array(None, dtype=object))

    def search(self, Q: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k for a batch of vectors ``(nq, D)`` (normalized here): scores and string ids per query."""
        Q = np.atleast_2d(np.asarray(Q, dtype=np.float32))
        if Q.shape[1] != self.manifest["dim"]:
            raise ValueError(f"query dim {Q.shape[1]} does not match the index dim {self.manifest['dim']}")
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
        D, I = fx.search(self.indexes, Q, k)
        names = self.lookup(I)
        return D, [[n for n in row if n is not None] for row in names]

    def vector_of(self, id_: str) -> np.ndarray:
        """The embedding of ``id_``, read from the one source part that holds it (its faiss id says which)."""
        src = self.manifest["source"]["embeddings"]
        hit = np.flatnonzero(self._ids == id_)
        if len(hit) == 0:  # not indexed: an error row, or not in the dataset at all (say which)
            table = store.read_embeddings(src, ["id", "status"], filter=pc.field("id") == id_)
            status = table.column("status")[0].as_py() if table.num_rows else None
            raise KeyError(f"id {id_!r} " + (f"has no embedding (status={status})" if status else f"is not in {src}"))
        fid = int(self._fids[hit[0]])
        part = next(p for p in store.open_dataset(src).parts() if p.number == fid >> 32)
        ids, X = store.part_vectors(src, part)  # verified against the manifest's checksum
        row = fid & 0xFFFFFFFF
        if row >= len(ids) or ids[row] != id_:
            raise store.DamagedData(f"{src} changed since the index was built ({id_!r} moved); run `attnpipe reindex`")
        return X[row]

    def search_id(self, id_: str, k: int = 10) -> list[tuple[str, float]]:
        D, names = self.search(self.vector_of(id_)[None], k)
        return list(zip(names[0], D[0].tolist()))
