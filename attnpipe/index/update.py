"""Index refresh after the embeddings changed: nothing, an incremental update, or a full rebuild.

``plan_update`` compares the live version (``CURRENT``) with the embeddings' part numbers and decides:

* **none** — the live version already holds exactly the current parts (with the same LSH choice);
* **incremental** — the live version is one ``ivf`` or ``flat`` index built from the same dataset and model: its
  vectors are stored by id, so the parts that left are removed with ``remove_ids`` (ids ``part << 32 | row``) and
  the new parts are added by Ray tasks into copies of the *trained* previous index, then merged. SimHash codes and
  MinHashes of kept vectors are carried over; only new parts are hashed;
* **full** — no live version, another dataset/model/factory, a graph index (no ``remove_ids``), the default factory
  rule now picks another index for the new count, or the vectors added since the last training reach
  ``max_growth`` × the count it was trained on (default +50%: the quantizer was fit to other data).

Every new version re-measures recall@10 against exact top-k over *all* current vectors and re-tunes nprobe. An
incremental update also measures recall at the previous version's nprobe: if it fell more than
``DRIFT_TOLERANCE`` under the target, the data drifted away from the quantizer and the update is dropped for a full
rebuild (unpublished: nothing reaches ``CURRENT`` until a version is complete).

Example::

    manifest = refresh_index("out/emb", "out/index")   # None when nothing changed
    manifest["update"]                                 # {'mode': 'incremental', 'base': 'v3', ...}
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray

from attnpipe import store
from attnpipe.index import build, layout
from attnpipe.index import faiss_index as fx
from attnpipe.runtime import init_ray

DRIFT_TOLERANCE = 0.05


@dataclass
class Plan:
    mode: str  # none | incremental | full
    reason: str
    base: dict | None = None  # manifest of the live version
    new: list[int] = field(default_factory=list)  # part numbers to add
    retired: list[int] = field(default_factory=list)  # part numbers to remove


def plan_update(
    embeddings: str, root: str, factory: str | None = None, lsh: str = "simhash", max_growth: float = 0.5
) -> Plan:
    """Decide how the index under ``root`` must follow the embeddings dataset (see the module docstring)."""
    src = store.read_manifest(embeddings)
    if not os.path.isfile(os.path.join(root, layout.CURRENT)):
        return Plan("full", "first build: no live version yet")
    try:
        base = layout.load_manifest(root, verify=True)
    except layout.IndexLayoutError as exc:
        return Plan("full", f"no usable live version ({exc})")
    source = base.get("source", {})
    if "parts" not in source or source.get("embeddings") != os.path.abspath(embeddings):
        return Plan("full", "the live version was built from another dataset (or records no part numbers)", base)
    if source.get("model") != src.get("model"):
        return Plan("full", "the embeddings were made by another model", base)
    # Part files are uniquely named; a number whose file changed (a re-encoded dataset) is removed, then re-added.
    built, current = source["parts"], store.part_numbers(src)
    new = sorted({n for f, n in current.items() if built.get(f) != n})
    retired = sorted({n for f, n in built.items() if current.get(f) != n})
    if _lsh_kinds(lsh) != set(base.get("lsh", {})):
        return Plan("full", f"--lsh {lsh} differs from the live version's LSH tables", base, new, retired)
    if not new and not retired:
        return Plan("none", "the live version holds exactly the current parts", base)
    f = base["faiss"]
    if f["kind"] not in ("ivf", "flat") or len(f["files"]) != 1:
        return Plan("full", f"a {f['kind']} index cannot remove ids", base, new, retired)
    if factory and factory != f["factory"]:
        return Plan("full", f"--faiss {factory} differs from the live {f['factory']}", base, new, retired)
    n = sum(s["ok"] for s in src["shards"])
    if f.get("factory_auto") and fx.default_factory(n, base["dim"]) != f["factory"]:
        return Plan(
            "full",
            f"for {n} vectors the default factory is {fx.default_factory(n, base['dim'])}, not {f['factory']}",
            base,
            new,
            retired,
        )
    parts = dict(build.part_paths(embeddings))
    added = sum(build.ok_rows(parts[p]) for p in new) + f.get("added_since_training", 0)
    if added >= max_growth * f.get("trained_count", base["count"]):
        return Plan(
            "full",
            f"{added} vectors added since the index was trained on {f.get('trained_count')} (>= {max_growth:.0%})",
            base,
            new,
            retired,
        )
    return Plan("incremental", f"+{len(new)} / -{len(retired)} parts", base, new, retired)


def _keep_live_choices(root: str, factory: str | None, lsh: str | None) -> tuple[str | None, str]:
    try:
        live = layout.load_manifest(root, verify=False)
    except layout.IndexLayoutError:
        return factory, lsh or "simhash"
    if factory is None and not live["faiss"].get("factory_auto", False):
        factory = live["faiss"]["factory"]
    if lsh is None:
        kinds = set(live.get("lsh", {}))
        lsh = "both" if len(kinds) == 2 else kinds.pop() if kinds else "none"
    return factory, lsh


def _lsh_kinds(lsh: str) -> set[str]:
    return {"simhash", "minhash"} if lsh == "both" else set() if lsh == "none" else {lsh}


def refresh_index(
    embeddings: str,
    root: str,
    factory: str | None = None,
    lsh: str | None = None,
    max_growth: float = 0.5,
    workers: int = 0,
    target_recall: float = 0.95,
    queries: int = 1000,
    seed: int = 0,
    dedup_threshold: float = 0.9,
    ray_address: str | None = None,
) -> tuple[dict | None, Plan]:
    """Bring the index under ``root`` up to date with ``embeddings``; returns (new manifest or None, the plan).

    ``factory``/``lsh`` left as None keep the live version's choices (a factory the user picked stays picked, even
    through a retrain; an automatic one follows the default rule), or the defaults for a first build. Starts (or joins) Ray only when there is work: a run with nothing to do stays cheap.
    """
    factory, lsh = _keep_live_choices(root, factory, lsh)
    plan = plan_update(embeddings, root, factory, lsh, max_growth)
    build._log(f"index: {plan.mode} update ({plan.reason})")
    if plan.mode != "none":
        init_ray(ray_address)
    if plan.mode == "incremental":
        manifest = update_index(embeddings, root, plan, workers, target_recall, queries, seed)
        if manifest is not None:
            return manifest, plan
        plan = Plan(
            "full",
            "recall at the previous nprobe fell under the target: data drifted",
            plan.base,
            plan.new,
            plan.retired,
        )
        build._log(f"index: full rebuild ({plan.reason})")
    if plan.mode == "none":
        return None, plan
    manifest = build.build_index(
        embeddings,
        root,
        factory=factory,
        lsh=lsh,
        workers=workers,
        target_recall=target_recall,
        queries=queries,
        seed=seed,
        dedup_threshold=dedup_threshold,
    )
    return manifest, plan


@ray.remote
def scan_parts(parts: list[tuple[int, str]], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over unchanged parts (their vectors are already in the index)."""
    found = []
    for number, path in parts:
        ids, X = build.read_part(path)
        if ids:
            found.append(fx.exact_topk(X, build.faiss_ids(number, len(ids)), queries, k))
    if not found:
        return fx.exact_topk(np.zeros((0, queries.shape[1]), np.float32), np.zeros(0, np.int64), queries, k)
    return fx.merge_topk([d for d, _ in found], [i for _, i in found], k)


def update_index(
    embeddings: str,
    root: str,
    plan: Plan,
    workers: int = 0,
    target_recall: float = 0.95,
    queries: int = 1000,
    seed: int = 0,
) -> dict | None:
    """Publish the live version minus ``plan.retired`` plus ``plan.new`` parts; None if recall shows drift."""
    start = time.perf_counter()
    base = plan.base
    assert base is not None
    k = build.TUNE_K
    src = store.read_manifest(embeddings)
    parts = build.part_paths(embeddings)
    index = faiss.read_index(os.path.join(base["path"], base["faiss"]["files"][0]))
    old_fids, old_ids = _read_ids(base["path"])
    keep = ~np.isin(old_fids >> 32, np.asarray(plan.retired, np.int64))
    removed = index.remove_ids(faiss.IDSelectorBatch(old_fids[~keep])) if (~keep).any() else 0
    trained = faiss.clone_index(index)
    trained.reset()  # keeps the quantizer / training, drops the vectors

    ok_counts = [build.ok_rows(p) for _, p in parts]
    n = sum(ok_counts)
    if n == 0:
        raise ValueError(f"{embeddings} has no ok rows to index")
    Q, qids = build.sample_rows(parts, ok_counts, min(queries, n), np.random.default_rng(seed))
    lsh_cfg, codes, hashes = _base_lsh(base, old_fids, keep)
    new = [p for p in parts if p[0] in set(plan.new)]
    old = [p for p in parts if p[0] not in set(plan.new)]
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    trained_ref = ray.put(faiss.serialize_index(trained))
    counts = dict(zip((p for p, _ in parts), ok_counts))
    adds = [
        build.add_parts.remote(trained_ref, g, Q, lsh_cfg)
        for g in build.split_parts(new, [counts[p] for p, _ in new], workers)
    ]
    scans = [scan_parts.remote(g, Q, k + 1) for g in build.split_parts(old, [counts[p] for p, _ in old], workers)]
    results, scanned = ray.get(adds), ray.get(scans)
    indexes = fx.merge([index, *(faiss.deserialize_index(r["index"]) for r in results)], base["faiss"]["kind"])
    exact = fx.merge_topk(
        [r["exact"][0] for r in results] + [d for d, _ in scanned],
        [r["exact"][1] for r in results] + [i for _, i in scanned],
        k + 1,
    )[1]

    f = base["faiss"]
    param = next((p for p in ("nprobe", "efSearch") if p in f), None)
    fx.set_search_param(indexes, param, f.get(param))
    at_base = fx.measure_recall(indexes, Q, exact, k, qids)
    if at_base < f["target_recall"] - DRIFT_TOLERANCE:
        build._log(f"index: recall@{k} at {param}={f.get(param)} is {at_base:.3f}, target {f['target_recall']}")
        return None
    tuning = fx.tune(indexes, Q, exact, k, target_recall, self_ids=qids)

    new_ids = [i for r in results for i in r["ids"]]
    new_fids = np.concatenate([old_fids[keep], *(r["fids"] for r in results)])
    ids = [*old_ids[keep].tolist(), *new_ids]
    version = layout.next_version(root)
    stage = layout.staging(root, version)
    try:
        files = build.write_faiss(stage, indexes)
        build.write_ids(stage, new_fids, ids)
        codes += [r["codes"] for r in results if r["codes"] is not None]
        hashes += [r["hashes"] for r in results if r["hashes"] is not None]
        lsh_meta = build.write_lsh(
            stage,
            lsh_cfg,
            codes,
            hashes,
            ids,
            new_fids,
            base.get("lsh", {}).get("minhash", {}).get("threshold", 0.9),
            Q,
            fx.drop_self(exact, qids, k),
        )
        added = len(new_ids)
        manifest = {
            "type": "attnpipe-index",
            "count": len(ids),
            "dim": base["dim"],
            "metric": base["metric"],
            "faiss": {
                **build.faiss_meta(f["factory"], f["kind"], files, tuning, target_recall, len(Q)),
                **{key: f.get(key) for key in ("train_size", "factory_auto", "trained_count")},
                "added_since_training": f.get("added_since_training", 0) + added,
                f"recall@{k}_at_previous_{param or 'param'}": at_base,
            },
            "lsh": lsh_meta,
            "update": {
                "mode": "incremental",
                "base": base["version"],
                "added_parts": len(plan.new),
                "removed_parts": len(plan.retired),
                "added_vectors": added,
                "removed_vectors": int(removed),
            },
            "workers": len(adds) + len(scans),
            "build_seconds": round(time.perf_counter() - start, 2),
            "source": build.source_info(embeddings, src),
        }
        layout.publish_version(root, stage, version, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    build._log(
        f"index: published {root}/{version} incrementally from {base['version']}: {len(ids)} vectors "
        f"(+{added} -{removed}), recall@{k} {tuning[f'recall@{k}']:.3f}"
    )
    return layout.load_manifest(root, version, verify=False)


def _read_ids(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(os.path.join(path, "ids.parquet"))
    return table.column("faiss_id").to_numpy(), np.array(table.column("id").to_pylist(), dtype=object)


def _base_lsh(base: dict, fids: np.ndarray, keep: np.ndarray) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """The live version's hashing settings (SimHash projections/offsets, MinHash parameters) and the SimHash codes
    and MinHashes of its kept vectors, in ``ids.parquet`` order (``fids``, masked by ``keep``)."""
    cfg: dict = {}
    codes, hashes = [], []
    meta = base.get("lsh", {})
    if "simhash" in meta:
        from attnpipe.index.lsh import SimHashLSH

        table = SimHashLSH.load(os.path.join(base["path"], "lsh", "simhash"))
        c, table_ids = table.entries()
        if not np.array_equal(table_ids, fids):
            raise layout.IndexLayoutError(f"{base['path']}: SimHash ids are not in ids.parquet order")
        cfg["simhash"], codes = table.emptied(), [c[keep]]
    if "minhash" in meta:
        cfg["minhash"] = {"num_perm": meta["minhash"]["num_perm"], "seed": meta["minhash"]["seed"]}
        hashes = [np.load(os.path.join(base["path"], "lsh", "minhash.npy"), allow_pickle=False)[keep]]
    return cfg, codes, hashes
