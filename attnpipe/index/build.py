"""Distributed index build: embeddings dataset -> ``ROOT/v<N>`` (FAISS + LSH), published atomically.

Steps: sample once across all parts -> train the FAISS index on the driver (GPU k-means when present) -> Ray tasks,
one per worker, each add their parts with ``add_with_ids`` and also compute the exact top-k of a held-out query
sample against their parts and their LSH codes -> merge (IVF inverted lists / flat concatenation / graph shards)
-> tune nprobe or efSearch to the target recall@10 vs exact -> write to staging, checksum, rename, move CURRENT.

FAISS ids are ``(part number << 32) | row within the part's ok rows``: unique and known to each task without
coordination, and stable while a part exists (part numbers live in the embeddings manifest, so an incremental
update can remove or add whole parts by id); ``ids.parquet`` maps them to string ids.

Example::

    manifest = build_index("out/emb", "out/index", factory="IVF64,Flat", lsh="simhash", workers=2)
    manifest["faiss"]["nprobe"], manifest["faiss"]["recall@10"]
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from attnpipe import store
from attnpipe.index import faiss_index as fx
from attnpipe.index import layout

LSH_CHOICES = ("simhash", "minhash", "both", "none")
TUNE_K = 10


def part_paths(embeddings: str) -> list[tuple[int, str]]:
    """(part number, path) of every part, by number; the number is the high half of the part's FAISS ids."""
    numbers = store.part_numbers(store.read_manifest(embeddings))
    return sorted((n, os.path.join(embeddings, f)) for f, n in numbers.items())


def read_part(path: str) -> tuple[list[str], np.ndarray]:
    """String ids and float32 embeddings ``(n, D)`` of a part's ok rows."""
    table = pq.read_table(path, columns=["id", "status", "embedding"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    emb = table.column("embedding").combine_chunks()
    X = emb.flatten().to_numpy().reshape(len(table), emb.type.list_size) if len(table) else np.zeros((0, 0))
    return table.column("id").to_pylist(), X.astype(np.float32, copy=False)


def faiss_ids(part_number: int, n: int) -> np.ndarray:
    return (np.int64(part_number) << 32) | np.arange(n, dtype=np.int64)


def sample_rows(
    parts: list[tuple[int, str]], counts: list[int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` rows drawn uniformly without replacement across all parts (one part read at a time): vectors and
    their faiss ids."""
    total = sum(counts)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    offsets = np.cumsum([0, *counts])
    rows, fids = [], []
    for i, (number, path) in enumerate(parts):
        local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        if len(local):
            rows.append(read_part(path)[1][local])
            fids.append(faiss_ids(number, counts[i])[local])
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(fids)


@ray.remote
def add_parts(trained: np.ndarray, parts: list[tuple[int, str]], queries: np.ndarray, lsh: dict) -> dict:
    """One worker: add its parts to a copy of the trained index; exact top-k of the queries over its parts; LSH.

    ``lsh`` may hold ``simhash`` (an empty ``SimHashLSH``: its projections hash the parts) and ``minhash`` settings.
    """
    if lsh.get("minhash"):
        from attnpipe.index import lsh as lsh_mod

    index = fx.to_gpu(faiss.deserialize_index(trained))
    all_ids, all_fids, exact, codes, hashes = [], [], [], [], []
    for part_number, path in parts:
        ids, X = read_part(path)
        if not ids:
            continue
        fids = faiss_ids(part_number, len(ids))
        fx.add(index, X, fids)
        exact.append(fx.exact_topk(X, fids, queries, TUNE_K + 1))  # +1: queries are indexed (leave-one-out)
        if "simhash" in lsh:
            codes.append(lsh["simhash"].codes(X))
        if lsh.get("minhash"):
            hashes.append(lsh_mod.weighted_minhash(np.maximum(X, 0), **lsh["minhash"]))
        all_ids.extend(ids)
        all_fids.append(fids)
    k = TUNE_K + 1
    D, I = (
        fx.merge_topk([e[0] for e in exact], [e[1] for e in exact], k)
        if exact
        else fx.exact_topk(np.zeros((0, queries.shape[1]), np.float32), np.zeros(0, np.int64), queries, k)
    )
    return {
        "index": faiss.serialize_index(fx.to_cpu(index)),
        "ids": all_ids,
        "fids": np.concatenate(all_fids) if all_fids else np.zeros(0, np.int64),
        "exact": (D, I),
        "codes": np.concatenate(codes) if codes else None,
        "hashes": np.concatenate(hashes) if hashes else None,
    }


def split_parts(parts: list[tuple[int, str]], counts: list[int], workers: int) -> list[list[tuple[int, str]]]:
    """Greedy balance of parts over workers by row count (largest first)."""
    groups: list[list[tuple[int, str]]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(parts)), key=lambda i: -counts[i]):
        w = int(np.argmin(load))
        groups[w].append(parts[i])
        load[w] += counts[i]
    return [sorted(g) for g in groups if g]


def build_index(
    embeddings: str,
    root: str,
    factory: str | None = None,
    lsh: str = "simhash",
    workers: int = 0,
    target_recall: float = 0.95,
    queries: int = 1000,
    seed: int = 0,
    simhash_tables: int = 16,
    simhash_bits: int = 12,
    minhash_perm: int = 128,
    dedup_threshold: float = 0.9,
    _crash_before_publish: bool = False,
) -> dict:
    """Build and publish a new index version of ``embeddings`` under ``root``; returns its manifest.

    Raises:
        FileNotFoundError: ``embeddings`` is not a published dataset.
        ValueError: a bad factory/LSH choice, or no ok rows to index.
    """
    if lsh not in LSH_CHOICES:
        raise ValueError(f"--lsh {lsh!r}; allowed: {', '.join(LSH_CHOICES)}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    start = time.perf_counter()
    src_manifest = store.read_manifest(embeddings)
    for gone in layout.clean_leftovers(root):
        _log(f"index: removed {gone} left by a build that did not finish")
    parts = part_paths(embeddings)
    counts = [pq.read_metadata(p).num_rows for _, p in parts]  # upper bound (error rows included)
    ok_counts = [ok_rows(p) for _, p in parts]
    n = sum(ok_counts)
    if n == 0:
        raise ValueError(f"{embeddings} has no ok rows to index")
    dim = int(store.dataset_metadata(embeddings)["attnpipe.embedding_dim"])
    factory_auto = factory is None
    factory = factory or fx.default_factory(n, dim)
    index, kind = fx.make_index(factory, dim)
    rng = np.random.default_rng(seed)
    train_size = min(n, max(256 * (fx.min_train_size(index) // 39), 10_000), 1_000_000) if not index.is_trained else 0
    if train_size and train_size < fx.min_train_size(index):
        raise ValueError(f"{factory} needs at least {fx.min_train_size(index)} vectors to train; {n} available")
    _log(f"index: {n} vectors, dim {dim}, factory {factory} ({kind}), training on {train_size}")
    # One pass over the parts: the training sample, and the tuning queries drawn from it (or alone for Flat/HNSW).
    S, sids = sample_rows(parts, ok_counts, max(train_size, min(queries, n)), rng)
    if train_size:
        fx.train(index, S[rng.permutation(len(S))[:train_size]], seed)
    pick = np.sort(rng.choice(len(S), size=min(queries, n), replace=False))
    Q, qids = S[pick], sids[pick]
    # SimHash centred on the query sample's mean: see SimHashLSH (centering against the ReLU cone)
    lsh_cfg = lsh_config(lsh, dim, seed, simhash_tables, simhash_bits, minhash_perm, center=Q.mean(axis=0))
    workers = workers or max(1, min(len(parts), int(ray.cluster_resources().get("CPU", 1))))
    trained = ray.put(faiss.serialize_index(index))
    groups = split_parts(parts, counts, workers)
    _log(f"index: adding {len(parts)} parts with {len(groups)} Ray tasks")
    results = ray.get([add_parts.remote(trained, g, Q, lsh_cfg) for g in groups])
    indexes = fx.merge([faiss.deserialize_index(r["index"]) for r in results], kind)
    _, exact = fx.merge_topk([r["exact"][0] for r in results], [r["exact"][1] for r in results], TUNE_K + 1)
    tuning = fx.tune(indexes, Q, exact, TUNE_K, target_recall, self_ids=qids)
    if tuning["param"] and not tuning.get("reached"):
        _log(
            f"index: warning: recall@{TUNE_K} {tuning[f'recall@{TUNE_K}']:.3f} at the largest {tuning['param']} "
            f"stays under the target {target_recall}"
        )
    ids = [i for r in results for i in r["ids"]]
    fids = np.concatenate([r["fids"] for r in results])

    version = layout.next_version(root)
    stage = layout.staging(root, version)
    try:
        files = write_faiss(stage, indexes)
        write_ids(stage, fids, ids)
        codes = [r["codes"] for r in results if r["codes"] is not None]
        hashes = [r["hashes"] for r in results if r["hashes"] is not None]
        lsh_meta = write_lsh(
            stage, lsh_cfg, codes, hashes, ids, fids, dedup_threshold, Q, fx.drop_self(exact, qids, TUNE_K)
        )
        if _crash_before_publish:
            raise RuntimeError("injected failure before publish (test hook)")
        manifest = {
            "type": "attnpipe-index",
            "count": int(n),
            "dim": dim,
            "metric": "inner_product",
            "faiss": {
                **faiss_meta(factory, kind, files, tuning, target_recall, len(Q)),
                "train_size": train_size,
                "factory_auto": factory_auto,
                "trained_count": int(n),
                "added_since_training": 0,
            },
            "lsh": lsh_meta,
            "update": {"mode": "full"},
            "workers": len(groups),
            "build_seconds": round(time.perf_counter() - start, 2),
            "source": source_info(embeddings, src_manifest),
        }
        layout.publish_version(root, stage, version, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    manifest = layout.load_manifest(root, version, verify=False)
    knob = f"{tuning['param']}={tuning['value']}, " if tuning["param"] else ""
    _log(
        f"index: published {root}/{version}: {n} vectors, {knob}recall@10 {tuning[f'recall@{TUNE_K}']:.3f}, "
        f"{manifest['build_seconds']} s"
    )
    return manifest


def ok_rows(path: str) -> int:
    status = pq.read_table(path, columns=["status"]).column("status")
    return int(pc.sum(pc.equal(status, "ok")).as_py() or 0)


def faiss_meta(factory: str, kind: str, files: list[str], tuning: dict, target_recall: float, queries: int) -> dict:
    return {
        "factory": factory,
        "kind": kind,
        "files": files,
        tuning["param"] or "param": tuning["value"],
        "recall@10": tuning[f"recall@{TUNE_K}"],
        "target_recall": target_recall,
        "tuning": tuning["sweep"],
        "queries": queries,
    }


def source_info(embeddings: str, src_manifest: dict) -> dict:
    """What a version was built from: the dataset, its model, shard fingerprints and part numbers (for updates)."""
    return {
        "embeddings": os.path.abspath(embeddings),
        "model": src_manifest.get("model"),
        "shards": {s["name"]: s["fingerprint"] for s in src_manifest["shards"]},
        "parts": store.part_numbers(src_manifest),
        "manifest_sha256": store.open_dataset(embeddings).manifest_sha256,
    }


def write_ids(stage: str, fids: np.ndarray, ids: list[str]) -> None:
    pq.write_table(pa.table({"faiss_id": fids, "id": pa.array(ids, pa.string())}), os.path.join(stage, "ids.parquet"))


def lsh_config(lsh: str, dim: int, seed: int, tables: int, bits: int, perm: int, center: np.ndarray) -> dict:
    cfg: dict = {}
    if lsh in ("simhash", "both"):
        from attnpipe.index.lsh import SimHashLSH

        cfg["simhash"] = SimHashLSH(dim, tables, bits, seed, center)
    if lsh in ("minhash", "both"):
        cfg["minhash"] = {"num_perm": perm, "seed": seed + 1}
    return cfg


def write_faiss(stage: str, indexes: list[faiss.Index]) -> list[str]:
    names = ["faiss.index"] if len(indexes) == 1 else [f"faiss-{i}.index" for i in range(len(indexes))]
    for name, index in zip(names, indexes):
        faiss.write_index(index, os.path.join(stage, name))
    return names


def write_lsh(
    stage: str,
    cfg: dict,
    codes: list[np.ndarray],
    hashes: list[np.ndarray],
    ids: list[str],
    fids: np.ndarray,
    threshold: float,
    Q: np.ndarray,
    exact: np.ndarray,
) -> dict:
    """SimHash tables from the codes and near-duplicate groups from the MinHashes, both in ``ids`` order."""
    meta: dict = {}
    if not cfg:
        return meta
    from attnpipe.index import lsh as lsh_mod

    os.makedirs(os.path.join(stage, "lsh"))
    if "simhash" in cfg:
        table = cfg["simhash"].emptied()
        table.add(np.concatenate(codes), fids)
        table.save(os.path.join(stage, "lsh", "simhash"))
        cands = table.candidates(Q)
        meta["simhash"] = {
            **table.params,
            "centered": True,
            f"candidate_recall@{TUNE_K}": lsh_mod.candidate_recall(exact, cands),
            "mean_candidates": float(np.mean([len(c) for c in cands])),
        }
        _log(
            f"index: simhash candidate recall@{TUNE_K} {meta['simhash'][f'candidate_recall@{TUNE_K}']:.3f} "
            f"with {meta['simhash']['mean_candidates']:.0f} candidates per query on average"
        )
    if "minhash" in cfg:
        allh = np.concatenate(hashes)
        np.save(os.path.join(stage, "lsh", "minhash.npy"), allh)
        groups = lsh_mod.near_duplicate_groups_from_hashes(ids, allh, threshold=threshold, **cfg["minhash"])
        pq.write_table(lsh_mod.dedup_table(groups), os.path.join(stage, "lsh", "near_duplicates.parquet"))
        meta["minhash"] = {
            **cfg["minhash"],
            "threshold": threshold,
            "groups": len(groups),
            "note": "weighted MinHash of max(embedding, 0)",
        }
    return meta


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
