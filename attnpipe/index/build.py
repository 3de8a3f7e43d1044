"""Index build: embeddings dataset -> ``ROOT/v<N>`` (FAISS + LSH), published atomically, memory-bounded.

Steps: plan the index from the count, dim and memory budget (:func:`attnpipe.index.config.plan`) -> one pass over
the parts that hold a uniform sample (training vectors + tuning queries) -> train on the driver (GPU k-means when
present) -> add: in this process part by part for small data or one worker (Ray start-up would dominate), else
Ray tasks that each hold one part at a time; every adder also computes the exact top-k of the tuning queries and
the LSH codes of its parts -> merge (IVF inverted lists in memory, or on disk into one ``faiss.ivfdata``; flat by
concatenation; graph indexes stay shards) -> tune nprobe/efSearch to the target recall@10 vs exact -> write to a
local staging directory, checksum, publish, move CURRENT. The driver never holds the vectors beyond the sample.

FAISS ids are ``(part number << 32) | row within the part's ok rows``: unique and known to each adder without
coordination, and stable while a part exists; ``ids.parquet`` maps them to string ids (written part by part).

Example::

    manifest = build_index("out/emb", "out/index", IndexConfig(factory="IVF64,Flat", lsh="simhash", workers=2))
    manifest["faiss"]["nprobe"], manifest["faiss"]["recall@10"], manifest["memory"]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnpipe import fs, log, store
from attnpipe.index import faiss_index as fx
from attnpipe.index import layout, ondisk
from attnpipe.index.config import LSH_CHOICES, IndexConfig, plan
from attnpipe.index.version import faiss_meta, source_info, version_manifest

__all__ = ["LSH_CHOICES", "IndexConfig", "build_index"]

TUNE_K = 10
LOCAL_MAX_FLOATS = 256 << 20  # below 1 GB of vectors (or workers=1) the build runs in this process: no Ray


def faiss_ids(part_number: int, n: int) -> np.ndarray:
    return (np.int64(part_number) << 32) | np.arange(n, dtype=np.int64)


def ok_counts(ds: store.Dataset) -> list[int]:
    """Ok rows of every part: from the manifest, read from the part for manifests without per-part counts."""
    return [p.ok if p.ok >= 0 else store.read_part(ds.path, p, ["status"], ok_only=True).num_rows for p in ds.parts()]


def sample_rows(
    path: str, parts: list[store.Part], counts: list[int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` rows drawn uniformly without replacement across all parts, reading only the parts that hold them
    (one in use, the next one being read): vectors and their faiss ids."""
    total = sum(counts)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    offsets = np.cumsum([0, *counts])
    local_rows: dict[int, tuple[np.ndarray, int]] = {}  # part number -> (chosen rows in its ok rows, its ok rows)
    for i, part in enumerate(parts):
        local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        if len(local):
            local_rows[part.number] = (local, counts[i])
    holding = [p for p in parts if p.number in local_rows]
    rows, fids = [], []
    # No string ids decoded, and no sha256: a damaged part fails the add pass, which verifies every part, before
    # anything trained on this sample is published.
    for part, t in store.iter_parts(path, holding, ["embedding"], ok_only=True, sha256=False):
        local, count = local_rows[part.number]
        rows.append(store.embedding_matrix(t)[local])
        fids.append(faiss_ids(part.number, count)[local])
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(fids)


def add_parts(
    trained: bytes,
    path: str,
    parts: list[store.Part],
    queries: np.ndarray,
    lsh: dict,
    shard_file: str | None = None,
    serialize: bool = True,
) -> dict:
    """One adder: its parts into a copy of the trained index (one part in memory at a time); exact top-k of the
    queries over its parts; LSH codes. Plain arguments: it runs in this process or as a Ray task.

    Returns the filled index (serialized for a Ray task, or written to ``shard_file`` for the on-disk merge), the
    ids in add order, the exact top-k and the hashes.
    """
    if lsh.get("minhash"):
        from attnpipe.index import lsh as lsh_mod

    index = fx.to_gpu(faiss.deserialize_index(np.frombuffer(trained, np.uint8)))
    all_ids, all_fids, codes, hashes = [], [], [], []
    k = TUNE_K + 1  # +1: queries are indexed (leave-one-out)
    D, I = fx.exact_topk(np.zeros((0, queries.shape[1]), np.float32), np.zeros(0, np.int64), queries, k)
    for part, t in store.iter_parts(path, parts, ["id", "embedding"], ok_only=True):
        if not t.num_rows:
            continue
        ids, X = t.column("id"), store.embedding_matrix(t)  # ids stay Arrow strings (no Python object per row)
        fids = faiss_ids(part.number, len(ids))
        fx.add(index, X, fids)
        Dp, Ip = fx.exact_topk(X, fids, queries, k)
        D, I = fx.merge_topk([D, Dp], [I, Ip], k)
        if "simhash" in lsh:
            codes.append(lsh["simhash"].codes(X))
        if lsh.get("minhash"):
            hashes.append(lsh_mod.weighted_minhash(np.maximum(X, 0), **lsh["minhash"]))
        all_ids.extend(ids.chunks)
        all_fids.append(fids)
        del X, t
    index = fx.to_cpu(index)
    out = {
        "ids": pa.chunked_array(all_ids, pa.string()),
        "fids": np.concatenate(all_fids) if all_fids else np.zeros(0, np.int64),
        "exact": (D, I),
        "codes": np.concatenate(codes) if codes else None,
        "hashes": np.concatenate(hashes) if hashes else None,
    }
    if shard_file is not None:
        faiss.write_index(index, shard_file)
        out["index"] = None
    else:
        out["index"] = faiss.serialize_index(index) if serialize else index
    return out


def tuning_queries(queries: int, n: int, index: faiss.Index) -> int:
    """How many indexed vectors tune nprobe: ``queries``, but for an IVF index at most max(250, nlist / 4).

    Their exact top-k costs queries·n·d, adding costs n·nlist·d: capped, the exact pass costs at most a quarter of
    the add, for a recall estimate that 250+ queries (2,500+ neighbours) already pin to about ±0.01.
    """
    ivf = fx._ivf(index)
    cap = max(250, ivf.nlist // 4) if ivf is not None else queries
    return min(queries, cap, n)


def split_parts(parts: list[store.Part], counts: list[int], workers: int) -> list[list[store.Part]]:
    """Greedy balance of parts over workers by row count (largest first); each group in part-number order."""
    groups: list[list[store.Part]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(parts)), key=lambda i: -counts[i]):
        w = int(np.argmin(load))
        groups[w].append(parts[i])
        load[w] += counts[i]
    return [sorted(g, key=lambda p: p.number) for g in groups if g]


def use_ray(config: IndexConfig, n: int, dim: int, parts: int) -> bool:
    """Ray tasks only when they can pay for their start-up: several workers asked for, or big data on a cluster."""
    if config.workers == 1 or parts <= 1:
        return False
    if config.workers >= 2:
        return True
    import ray

    return ray.is_initialized() and n * dim > LOCAL_MAX_FLOATS


def run_adders(
    trained: faiss.Index,
    path: str,
    groups: list[list[store.Part]],
    Q: np.ndarray,
    lsh_cfg: dict,
    remote: bool,
    shard_dir: str | None = None,
):
    """Yield each adder's result in group order: Ray tasks (``remote``) or in this process, one after another."""
    blob = faiss.serialize_index(trained).tobytes()
    files = [os.path.join(shard_dir, f".shard-{i}.index") if shard_dir else None for i in range(len(groups))]
    if not remote:
        for g, f in zip(groups, files):
            yield add_parts(blob, path, g, Q, lsh_cfg, f, serialize=False)
        return
    import ray

    task = ray.remote(add_parts)
    ref = ray.put(blob)
    # on-disk shards are written by the driver from the serialized index (tasks may run on other nodes)
    pending = [task.remote(ref, path, g, Q, lsh_cfg) for g in groups]
    for f, p in zip(files, pending):
        r = ray.get(p)
        index = faiss.deserialize_index(r["index"])
        r["index"] = None if f is not None else index
        if f is not None:
            faiss.write_index(index, f)
        del index
        yield r


def build_index(
    embeddings: str,
    root: str,
    config: IndexConfig | None = None,
    _crash_before_publish: bool = False,
    **overrides,
) -> dict:
    """Build and publish a new index version of ``embeddings`` under ``root``; returns its manifest.

    ``overrides`` are :class:`IndexConfig` fields (``factory=``, ``lsh=``, ``workers=`` ...) applied on ``config``.

    Raises:
        FileNotFoundError: ``embeddings`` is not a published dataset.
        ValueError: a bad factory/LSH choice, or no ok rows to index.
    """
    config = replace(config or IndexConfig(), **overrides)
    start = time.perf_counter()
    ds = store.open_dataset(embeddings)
    for gone in layout.clean_leftovers(root):
        _log(f"index: removed {gone} left by a build that did not finish")
    parts = ds.parts()
    counts = ok_counts(ds)
    n = sum(counts)
    if n == 0:
        raise ValueError(f"{fs.display(embeddings)} has no ok rows to index")
    dim = int(ds.metadata()["attnpipe.embedding_dim"])
    chosen = plan(n, dim, config)
    factory = chosen["factory"]
    index, kind = fx.make_index(factory, dim)
    ondisk_lists = chosen["ondisk"] and kind == "ivf"
    rng = np.random.default_rng(config.seed)
    train_size = min(n, max(256 * (fx.min_train_size(index) // 39), 10_000), 1_000_000) if not index.is_trained else 0
    if train_size and train_size < fx.min_train_size(index):
        raise ValueError(f"{factory} needs at least {fx.min_train_size(index)} vectors to train; {n} available")
    where = "on disk" if ondisk_lists else "in memory"
    _log(f"index: {n} vectors, dim {dim}, factory {factory} ({kind}, lists {where}), training on {train_size}")
    # One pass over the parts holding the sample: training vectors, and the tuning queries drawn from them.
    S, sids = sample_rows(ds.path, parts, counts, max(train_size, tuning_queries(config.queries, n, index)), rng)
    if train_size:
        fx.train(index, S[rng.permutation(len(S))[:train_size]], config.seed)
    pick = np.sort(rng.choice(len(S), size=tuning_queries(config.queries, n, index), replace=False))
    Q, qids = S[pick], sids[pick]
    del S
    # SimHash centred on the query sample's mean: see SimHashLSH (centering against the ReLU cone)
    lsh_cfg = lsh_config(config, dim, center=Q.mean(axis=0))
    remote = use_ray(config, n, dim, len(parts))
    workers = config.workers or (_cpus() if remote else 1)
    groups = split_parts(parts, counts, workers if remote else 1)
    if ondisk_lists and not remote:  # in-process on-disk build: one shard file per chunk of ~budget/4 bytes
        groups = _chunks(parts, counts, config.memory_budget, dim)
    how = f"with {len(groups)} Ray tasks" if remote else "in this process"
    _log(f"index: adding {len(parts)} parts {how}")

    version = layout.next_version(root)
    stage = layout.staging(root, version)
    try:
        ids_writer = pq.ParquetWriter(os.path.join(stage, "ids.parquet"), IDS_SCHEMA)
        merged: list[faiss.Index] | None = None
        exact: tuple[np.ndarray, np.ndarray] | None = None
        shard_files: list[str] = []
        codes: list[np.ndarray] = []
        hashes: list[np.ndarray] = []
        fid_chunks: list[np.ndarray] = []
        adders = run_adders(index, ds.path, groups, Q, lsh_cfg, remote, stage if ondisk_lists else None)
        for r in log.progress(adders, "index: adding", len(groups), "group"):
            ids_writer.write_table(pa.table({"faiss_id": r["fids"], "id": r["ids"]}, schema=IDS_SCHEMA))
            fid_chunks.append(r["fids"])
            if exact is None:
                exact = r["exact"]
            else:
                exact = fx.merge_topk([exact[0], r["exact"][0]], [exact[1], r["exact"][1]], TUNE_K + 1)
            if r["codes"] is not None:
                codes.append(r["codes"])
            if r["hashes"] is not None:
                hashes.append(r["hashes"])
            if r["index"] is None:
                shard_files.append(os.path.join(stage, f".shard-{len(shard_files)}.index"))
                continue
            one = r["index"]
            del r
            merged = [one] if merged is None else fx.merge([*merged, one], kind)
        ids_writer.close()
        if ondisk_lists:
            merged = [ondisk.merge(index, shard_files, stage)]
        assert merged is not None and exact is not None
        tuning = fx.tune(merged, Q, exact[1], TUNE_K, config.target_recall, self_ids=qids)
        if tuning["param"] and not tuning.get("reached"):
            _log(
                f"index: warning: recall@{TUNE_K} {tuning[f'recall@{TUNE_K}']:.3f} at the largest {tuning['param']} "
                f"stays under the target {config.target_recall}"
            )
        files = write_faiss(stage, merged)
        fids = np.concatenate(fid_chunks)
        lsh_meta = write_lsh(
            stage, lsh_cfg, codes, hashes, stage, fids, config, Q, fx.drop_self(exact[1], qids, TUNE_K)
        )
        if _crash_before_publish:
            raise RuntimeError("injected failure before publish (test hook)")
        faiss_section = {
            **faiss_meta(factory, kind, files, tuning, config.target_recall, len(Q)),
            "train_size": train_size,
            "factory_auto": config.factory is None,
            "trained_count": int(n),
            "added_since_training": 0,
        }
        if ondisk_lists:
            faiss_section["ivfdata"] = ondisk.IVFDATA
        manifest = version_manifest(
            count=n,
            dim=dim,
            faiss_section=faiss_section,
            lsh_meta=lsh_meta,
            update={"mode": "full"},
            workers=len(groups) if remote else 1,
            start=start,
            source=source_info(ds),
            config=config,
            estimate=chosen,
        )
        layout.publish_version(root, stage, version, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    manifest = layout.load_manifest(root, version, verify=False)
    knob = f"{tuning['param']}={tuning['value']}, " if tuning["param"] else ""
    _log(
        f"index: published {fs.display(root)}/{version}: {n} vectors, {knob}recall@10 "
        f"{tuning[f'recall@{TUNE_K}']:.3f}, {manifest['build_seconds']} s"
    )
    return manifest


IDS_SCHEMA = pa.schema([("faiss_id", pa.int64()), ("id", pa.string())])


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


def _chunks(parts: list[store.Part], counts: list[int], budget: int | None, dim: int) -> list[list[store.Part]]:
    """Consecutive groups of parts holding at most ~budget/4 bytes of vectors each (one shard file per group)."""
    cap = max(1, (budget or 1 << 30) // 4 // (dim * 4 + 8))
    groups: list[list[store.Part]] = [[]]
    rows = 0
    for part, c in zip(parts, counts):
        if groups[-1] and rows + c > cap:
            groups.append([])
            rows = 0
        groups[-1].append(part)
        rows += c
    return groups


def lsh_config(config: IndexConfig, dim: int, center: np.ndarray) -> dict:
    cfg: dict = {}
    lsh = config.lsh_choice
    if lsh in ("simhash", "both"):
        from attnpipe.index.lsh import SimHashLSH

        cfg["simhash"] = SimHashLSH(dim, config.simhash_tables, config.simhash_bits, config.seed, center)
    if lsh in ("minhash", "both"):
        cfg["minhash"] = {"num_perm": config.minhash_perm, "seed": config.seed + 1}
    return cfg


def write_faiss(stage: str, indexes: list[faiss.Index]) -> list[str]:
    names = ["faiss.index"] if len(indexes) == 1 else [f"faiss-{i}.index" for i in range(len(indexes))]
    for name, index in zip(names, indexes):
        faiss.write_index(index, os.path.join(stage, name))
    return names


def read_ids(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(os.path.join(path, "ids.parquet"))
    return table.column("faiss_id").to_numpy(), np.array(table.column("id").to_pylist(), dtype=object)


def write_lsh(
    stage: str,
    cfg: dict,
    codes: list[np.ndarray],
    hashes: list[np.ndarray],
    ids_dir: str,
    fids: np.ndarray,
    config: IndexConfig,
    Q: np.ndarray,
    exact: np.ndarray,
) -> dict:
    """SimHash tables from the codes and near-duplicate groups from the MinHashes, both in ``ids.parquet`` order
    (``ids_dir/ids.parquet`` is read for the string ids only when near-duplicates are grouped)."""
    meta: dict = {}
    if not cfg:
        return meta
    from attnpipe.index import lsh as lsh_mod

    os.makedirs(os.path.join(stage, "lsh"), exist_ok=True)
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
        ids = read_ids(ids_dir)[1].tolist()
        groups = lsh_mod.near_duplicate_groups_from_hashes(
            ids, allh, threshold=config.dedup_threshold, **cfg["minhash"]
        )
        pq.write_table(lsh_mod.dedup_table(groups), os.path.join(stage, "lsh", "near_duplicates.parquet"))
        meta["minhash"] = {
            **cfg["minhash"],
            "threshold": config.dedup_threshold,
            "groups": len(groups),
            "note": "weighted MinHash of max(embedding, 0)",
        }
    return meta


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
