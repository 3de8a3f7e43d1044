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
from dataclasses import dataclass, field, replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnpipe import fs, store
from attnpipe.index import build, layout
from attnpipe.index import faiss_index as fx
from attnpipe.index import version as version_mod
from attnpipe.index.config import IndexConfig, plan
from attnpipe.runtime import init_ray

DRIFT_TOLERANCE = 0.05


@dataclass
class Plan:
    mode: str  # none | incremental | full
    reason: str
    base: dict | None = None  # manifest of the live version
    new: list[int] = field(default_factory=list)  # part numbers to add
    retired: list[int] = field(default_factory=list)  # part numbers to remove


def plan_update(embeddings: str, root: str, config: IndexConfig | None = None, **overrides) -> Plan:
    """Decide how the index under ``root`` must follow the embeddings dataset (see the module docstring)."""
    config = replace(config or IndexConfig(), **overrides)
    ds = store.open_dataset(embeddings)
    src = ds.manifest
    if not fs.is_file(fs.join(root, layout.CURRENT)):
        return Plan("full", "first build: no live version yet")
    try:
        base = layout.load_manifest(root, verify=True)
    except layout.IndexLayoutError as exc:
        return Plan("full", f"no usable live version ({exc})")
    source = base.get("source", {})
    if "parts" not in source or source.get("embeddings") != version_mod.source_path(embeddings):
        return Plan("full", "the live version was built from another dataset (or records no part numbers)", base)
    if source.get("model") != src.get("model"):
        return Plan("full", "the embeddings were made by another model", base)
    # Part files are uniquely named; a number whose file changed (a re-encoded dataset) is removed, then re-added.
    built, current = source["parts"], store.part_numbers(src)
    new = sorted({n for f, n in current.items() if built.get(f) != n})
    retired = sorted({n for f, n in built.items() if current.get(f) != n})
    if _lsh_kinds(config.lsh_choice) != set(base.get("lsh", {})):
        return Plan("full", f"--lsh {config.lsh_choice} differs from the live version's LSH tables", base, new, retired)
    if not new and not retired:
        return Plan("none", "the live version holds exactly the current parts", base)
    f = base["faiss"]
    if f["kind"] not in ("ivf", "flat") or len(f["files"]) != 1 or f.get("ivfdata"):
        why = (
            "an on-disk index is rebuilt, not updated" if f.get("ivfdata") else f"a {f['kind']} index cannot remove ids"
        )
        return Plan("full", why, base, new, retired)
    if config.factory and config.factory != f["factory"]:
        return Plan("full", f"--faiss {config.factory} differs from the live {f['factory']}", base, new, retired)
    counts = dict(zip((p.number for p in ds.parts()), build.ok_counts(ds)))
    n = sum(counts.values())
    default = plan(n, base["dim"], replace(config, factory=None))["factory"]
    if f.get("factory_auto") and default != f["factory"]:
        return Plan("full", f"for {n} vectors the default factory is {default}, not {f['factory']}", base, new, retired)
    added = sum(counts[p] for p in new) + f.get("added_since_training", 0)
    if added >= config.max_growth * f.get("trained_count", base["count"]):
        return Plan(
            "full",
            f"{added} vectors added since the index was trained on {f.get('trained_count')} "
            f"(>= {config.max_growth:.0%})",
            base,
            new,
            retired,
        )
    return Plan("incremental", f"+{len(new)} / -{len(retired)} parts", base, new, retired)


def _keep_live_choices(root: str, config: IndexConfig) -> IndexConfig:
    try:
        live = layout.load_manifest(root, verify=False)
    except layout.IndexLayoutError:
        return replace(config, lsh=config.lsh or "simhash")
    factory, lsh = config.factory, config.lsh
    if factory is None and not live["faiss"].get("factory_auto", False):
        factory = live["faiss"]["factory"]
    if lsh is None:
        kinds = set(live.get("lsh", {}))
        lsh = "both" if len(kinds) == 2 else kinds.pop() if kinds else "none"
    return replace(config, factory=factory, lsh=lsh)


def _lsh_kinds(lsh: str) -> set[str]:
    return {"simhash", "minhash"} if lsh == "both" else set() if lsh == "none" else {lsh}


def refresh_index(
    embeddings: str,
    root: str,
    config: IndexConfig | None = None,
    ray_address: str | None = None,
    **overrides,
) -> tuple[dict | None, Plan]:
    """Bring the index under ``root`` up to date with ``embeddings``; returns (new manifest or None, the plan).

    ``config.factory``/``config.lsh`` left as None keep the live version's choices (a factory the user picked stays
    picked, even through a retrain; an automatic one follows the default rule), or the defaults for a first build.
    ``overrides`` are :class:`IndexConfig` fields. Starts (or joins) Ray only when there is work to spread.
    """
    config = _keep_live_choices(root, replace(config or IndexConfig(), **overrides))
    plan_ = plan_update(embeddings, root, config)
    build._log(f"index: {plan_.mode} update ({plan_.reason})")
    if plan_.mode != "none" and config.workers != 1:
        init_ray(ray_address)
    if plan_.mode == "incremental":
        manifest = update_index(embeddings, root, plan_, config)
        if manifest is not None:
            return manifest, plan_
        plan_ = Plan(
            "full",
            "recall at the previous nprobe fell under the target: data drifted",
            plan_.base,
            plan_.new,
            plan_.retired,
        )
        build._log(f"index: full rebuild ({plan_.reason})")
    if plan_.mode == "none":
        return None, plan_
    return build.build_index(embeddings, root, config), plan_


def scan_parts(path: str, parts: list[store.Part], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over unchanged parts (their vectors are already in the index), one at a time."""
    D, I = fx.exact_topk(np.zeros((0, queries.shape[1]), np.float32), np.zeros(0, np.int64), queries, k)
    for part in parts:
        ids, X = store.part_vectors(path, part)
        if ids:
            Dp, Ip = fx.exact_topk(X, build.faiss_ids(part.number, len(ids)), queries, k)
            D, I = fx.merge_topk([D, Dp], [I, Ip], k)
    return D, I


def update_index(embeddings: str, root: str, plan: Plan, config: IndexConfig | None = None, **overrides) -> dict | None:
    """Publish the live version minus ``plan.retired`` plus ``plan.new`` parts; None if recall shows drift."""
    config = replace(config or IndexConfig(), **overrides)
    start = time.perf_counter()
    base = plan.base
    assert base is not None
    k = build.TUNE_K
    ds = store.open_dataset(embeddings)
    parts = ds.parts()
    index = fx.read_index(os.path.join(base["path"], base["faiss"]["files"][0]))
    old_fids, old_ids = build.read_ids(base["path"])
    keep = ~np.isin(old_fids >> 32, np.asarray(plan.retired, np.int64))
    removed = index.remove_ids(faiss.IDSelectorBatch(old_fids[~keep])) if (~keep).any() else 0
    trained = faiss.clone_index(index)
    trained.reset()  # keeps the quantizer / training, drops the vectors

    ok = build.ok_counts(ds)
    n = sum(ok)
    if n == 0:
        raise ValueError(f"{fs.display(embeddings)} has no ok rows to index")
    Q, qids = build.sample_rows(ds.path, parts, ok, min(config.queries, n), np.random.default_rng(config.seed))
    lsh_cfg, codes, hashes = _base_lsh(base, old_fids, keep)
    counts = dict(zip((p.number for p in parts), ok))
    new = [p for p in parts if p.number in set(plan.new)]
    old = [p for p in parts if p.number not in set(plan.new)]
    remote = build.use_ray(config, n, base["dim"], len(parts))
    workers = (config.workers or build._cpus()) if remote else 1
    groups = build.split_parts(new, [counts[p.number] for p in new], workers)
    results = list(build.run_adders(trained, ds.path, groups, Q, lsh_cfg, remote))
    scanned = [scan_parts(ds.path, g, Q, k + 1) for g in build.split_parts(old, [counts[p.number] for p in old], 1)]
    indexes = fx.merge([index, *(r["index"] for r in results)], base["faiss"]["kind"])
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
    tuning = fx.tune(indexes, Q, exact, k, config.target_recall, self_ids=qids)

    new_ids = [i for r in results for i in r["ids"].to_pylist()]
    new_fids = np.concatenate([old_fids[keep], *(r["fids"] for r in results)])
    ids = [*old_ids[keep].tolist(), *new_ids]
    version = layout.next_version(root)
    stage = layout.staging(root, version)
    try:
        files = build.write_faiss(stage, indexes)
        pq.write_table(
            pa.table({"faiss_id": new_fids, "id": pa.array(ids, pa.string())}, schema=build.IDS_SCHEMA),
            os.path.join(stage, "ids.parquet"),
        )
        codes += [r["codes"] for r in results if r["codes"] is not None]
        hashes += [r["hashes"] for r in results if r["hashes"] is not None]
        threshold = base.get("lsh", {}).get("minhash", {}).get("threshold", config.dedup_threshold)
        lsh_meta = build.write_lsh(
            stage,
            lsh_cfg,
            codes,
            hashes,
            stage,
            new_fids,
            replace(config, dedup_threshold=threshold),
            Q,
            fx.drop_self(exact, qids, k),
        )
        added = len(new_ids)
        faiss_section = {
            **version_mod.faiss_meta(f["factory"], f["kind"], files, tuning, config.target_recall, len(Q)),
            **{key: f.get(key) for key in ("train_size", "factory_auto", "trained_count")},
            "added_since_training": f.get("added_since_training", 0) + added,
            f"recall@{k}_at_previous_{param or 'param'}": at_base,
        }
        update = {
            "mode": "incremental",
            "base": base["version"],
            "added_parts": len(plan.new),
            "removed_parts": len(plan.retired),
            "added_vectors": added,
            "removed_vectors": int(removed),
        }
        manifest = version_mod.version_manifest(
            count=len(ids),
            dim=base["dim"],
            faiss_section=faiss_section,
            lsh_meta=lsh_meta,
            update=update,
            workers=len(groups) if remote else 1,
            start=start,
            source=version_mod.source_info(ds),
            config=config,
            estimate=base.get("memory"),
        )
        layout.publish_version(root, stage, version, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    build._log(
        f"index: published {fs.display(root)}/{version} incrementally from {base['version']}: {len(ids)} vectors "
        f"(+{added} -{removed}), recall@{k} {tuning[f'recall@{k}']:.3f}"
    )
    return layout.load_manifest(root, version, verify=False)


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
