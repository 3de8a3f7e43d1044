"""``attnpipe dedup``: near-duplicate pairs and groups of an embeddings dataset, and leakage into other datasets.

Composes the stages: sample -> fit (centring/whitening, k-means) -> scatter parts to cluster buckets -> calibrate
the threshold on some buckets -> pairs in every bucket (+ MinHash pairs) -> union-find groups + keep rule -> name
the few vectors involved -> ``pairs.parquet``, ``leakage.parquet``, ``groups.parquet``, ``summary.json``,
``report.html``, built in a staging directory and published with ``store.publish(kind="dedup")``.

Example::

    summary = dedup("emb/", "dedup/", against=["train-emb/"], cfg=DedupConfig(keep="central"))
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnpipe import fs, store
from attnpipe.dedup.calibrate import nn_threshold
from attnpipe.dedup.groups import KEEP_RULES, connected, group_table

METHODS = ("semantic", "minhash", "both")
KIND = "dedup"
MAX_FETCH = 20_000  # source images read for --keep largest; past it, keep falls back to first


@dataclass(frozen=True)
class DedupConfig:
    method: str = "semantic"
    threshold: float | None = None  # cosine in the centred (whitened) space; None = calibrated from the data
    keep: str = "first"
    whiten: bool = True
    z: float = 4.0  # calibration: sigma-clipped median + z * MAD of nearest-neighbour similarity
    probes: int = 2  # nearest centroids each vector is compared in
    clusters: int = 0  # k-means clusters; 0 = n / 1000
    sample: int = 50_000  # vectors for centring, whitening and k-means
    calibrate: int = 20_000  # vectors whose nearest neighbour calibrates the threshold
    minhash_threshold: float = 0.9  # estimated weighted Jaccard (method minhash|both)
    minhash_perm: int = 128
    seed: int = 0
    report_groups: int = 12
    report_pairs: int = 12

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.keep not in KEEP_RULES:
            raise ValueError(f"--keep must be one of {KEEP_RULES}, got {self.keep!r}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold is a cosine in [-1, 1], got {self.threshold}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise ValueError(f"--minhash-threshold must be in (0, 1], got {self.minhash_threshold}")
        if self.probes < 1 or self.sample < 10 or self.z <= 0:
            raise ValueError("--probes must be >= 1, --sample >= 10 and --z > 0")


def _log(msg: str) -> None:
    print(f"dedup: {msg}", file=sys.stderr, flush=True)


def _count(parts: list[store.Part]) -> int:
    return sum(max(p.ok, 0) for p in parts)


def _sample(ds: store.Dataset, size: int, seed: int) -> np.ndarray:
    import ray

    from attnpipe.dedup.semantic import sample_part

    parts = [p for p in ds.parts() if p.ok != 0]
    n = max(_count(parts), 1)
    refs = [sample_part.remote(ds.path, p, math.ceil(size * max(p.ok, 1) / n), seed) for p in parts]
    chunks = [c for c in ray.get(refs) if len(c)]
    if not chunks:
        raise ValueError(f"{fs.display(ds.path)} holds no ok vectors: nothing to deduplicate")
    return np.concatenate(chunks)


def _gather(datasets: list[store.Dataset], transform, wanted: dict[int, set[int]]) -> tuple[dict, dict]:
    """Names and transformed vectors of the wanted gids: side -> {gid: id}, side -> {gid: z}."""
    import ray

    from attnpipe.dedup.semantic import gather_part

    jobs = []
    for side, gids in wanted.items():
        by_part: dict[int, list[int]] = {}
        for g in gids:
            by_part.setdefault(g >> 32, []).append(g & 0xFFFFFFFF)
        numbers = {p.number: p for p in datasets[side].parts()}
        for number, part_rows in by_part.items():
            sel = np.array(sorted(part_rows), np.int64)
            jobs.append((side, number, sel, gather_part.remote(datasets[side].path, numbers[number], sel, transform)))
    names: dict[int, dict[int, str]] = {s: {} for s in wanted}
    vecs: dict[int, dict[int, np.ndarray]] = {s: {} for s in wanted}
    for side, number, rows, ref in jobs:
        ids, Z = ray.get(ref)
        for r, i, z in zip(rows.tolist(), ids, Z):
            g = (number << 32) | r
            names[side][g] = i
            vecs[side][g] = z
    return names, vecs


def _semantic(cfg: DedupConfig, datasets: list[store.Dataset], plan) -> tuple[dict, float, dict]:
    """Pairs per side and the threshold with how it was chosen."""
    from attnpipe.dedup.semantic import compare, nearest_similarities, scatter

    parts = [(ds.path, p, side) for side, ds in enumerate(datasets) for p in ds.parts() if p.ok != 0]
    buckets = scatter(plan, parts)
    n = _count(datasets[0].parts())
    how: dict[str, object]
    if cfg.threshold is not None:
        threshold, how = float(cfg.threshold), {"chosen": "--threshold"}
    else:
        rng = np.random.default_rng(cfg.seed)
        share = min(1.0, cfg.calibrate / max(n, 1))
        picks = sorted(rng.permutation(len(buckets))[: max(1, math.ceil(share * len(buckets)))].tolist())
        _, nn = nearest_similarities([buckets[b] for b in picks])
        threshold, info = nn_threshold(nn, cfg.z)
        how = {"chosen": "auto", "buckets": len(picks), **info}
    found = compare(buckets, threshold)
    del buckets
    return found, threshold, how


def _minhash(cfg: DedupConfig, datasets: list[store.Dataset]) -> dict[int, tuple]:
    from attnpipe.dedup.minhash import minhash_pairs

    def load(ds: store.Dataset) -> tuple[np.ndarray, np.ndarray]:
        gids, Xs = [], []
        for p in ds.parts():
            _, X = store.part_vectors(ds.path, p)
            gids.append((np.int64(p.number) << 32) | np.arange(len(X), dtype=np.int64))
            Xs.append(X)
        return np.concatenate(gids), np.concatenate(Xs)

    gid0, X0 = load(datasets[0])
    out = {}
    a, b, jac = minhash_pairs(X0, cfg.minhash_threshold, cfg.minhash_perm)
    out[0] = (np.minimum(gid0[a], gid0[b]), np.maximum(gid0[a], gid0[b]), jac)
    for side, ds in enumerate(datasets[1:], 1):
        gid, X = load(ds)
        a, b, jac = minhash_pairs(X0, cfg.minhash_threshold, cfg.minhash_perm, other=X)
        out[side] = (gid0[a], gid[b], jac)
    return out


def _merge(semantic: dict, minhash: dict) -> dict[int, dict[tuple[int, int], tuple[float, str]]]:
    """side -> {(gid_a, gid_b): (similarity, method)}; a pair both methods found is ``both`` (cosine kept)."""
    out: dict[int, dict] = {}
    for method, found in (("minhash", minhash), ("semantic", semantic)):
        for side, (a, b, sim) in found.items():
            d = out.setdefault(side, {})
            for key, s in zip(zip(a.tolist(), b.tolist()), sim.tolist()):
                d[key] = (s, "both") if key in d else (s, method)
    return out


def _pixels(manifest: dict, ids: list[str]) -> tuple[dict[str, int], str | None]:
    if len(ids) > MAX_FETCH:
        return {}, f"{len(ids)} grouped images are more than {MAX_FETCH} to read; kept the first id instead"
    from PIL import Image, UnidentifiedImageError

    from attnpipe.data.fetch import fetch_images

    out = {}
    for i, data in fetch_images(manifest, ids).items():
        try:
            with Image.open(io.BytesIO(data)) as im:
                out[i] = im.width * im.height
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    missing = len(set(ids) - set(out))
    note = (
        f"source size unknown for {missing} of {len(ids)} grouped images (first id used for those)" if missing else None
    )
    return out, note


def dedup(
    embeddings: str,
    out: str,
    against: tuple[str, ...] | list[str] = (),
    cfg: DedupConfig = DedupConfig(),
    overwrite: bool = False,
    ray_address: str | None = None,
) -> dict:
    """Find near-duplicates in ``embeddings`` (and leakage into ``against``), publish them at ``out``; returns the
    summary.

    Raises:
        ValueError: a bad setting, or a dataset without ok vectors.
        FileNotFoundError: an input is not an embeddings dataset.
        FileExistsError: ``out`` exists (without ``overwrite``), or is not a dedup output (``store.NotOurs``).
    """
    from attnpipe.dedup.semantic import Plan
    from attnpipe.runtime import init_ray
    from attnpipe.store.outputs import check_replaceable

    cfg.check()
    start = time.perf_counter()
    datasets = [store.open_dataset(p) for p in (embeddings, *against)]
    check_replaceable(out, KIND, overwrite)  # fail before any work
    init_ray(ray_address)
    n = _count(datasets[0].parts())
    sample = _sample(datasets[0], cfg.sample, cfg.seed)
    plan = Plan.fit(sample, n, cfg.whiten, cfg.probes, cfg.clusters, seed=cfg.seed)
    _log(f"{n} vectors, {len(plan.centroids)} clusters x {plan.probes} probes in {plan.buckets} buckets")
    semantic: dict[int, tuple] = {}
    minhash: dict[int, tuple] = {}
    threshold: float | None = None
    how: dict = {}
    if cfg.method in ("semantic", "both"):
        semantic, threshold, how = _semantic(cfg, datasets, plan)
        _log(f"threshold {threshold:.4f} ({how['chosen']})")
    if cfg.method in ("minhash", "both"):
        minhash = _minhash(cfg, datasets)
    merged = _merge(semantic, minhash)
    inside = merged.get(0, {})
    groups = connected(inside)
    wanted = {0: {g for pair in inside for g in pair}}
    for side in range(1, len(datasets)):
        wanted[0] |= {a for a, _ in merged.get(side, {})}
        wanted[side] = {b for _, b in merged.get(side, {})}
    names, vecs = _gather(datasets, plan.transform, wanted)
    grouped_ids = [names[0][g] for m in groups for g in m]
    pixels, keep_note = None, None
    if cfg.keep == "largest":
        pixels, keep_note = _pixels(datasets[0].manifest, grouped_ids)
    table = group_table(groups, names[0], vecs[0], cfg.keep, pixels)

    stage = store.staging_dir(out)
    pair_rows = sorted(inside.items(), key=lambda kv: (-kv[1][0], names[0][kv[0][0]], names[0][kv[0][1]]))
    pairs = pa.table(
        {
            "id_a": pa.array([names[0][a] for (a, _), _ in pair_rows], pa.string()),
            "id_b": pa.array([names[0][b] for (_, b), _ in pair_rows], pa.string()),
            "similarity": pa.array([s for _, (s, _) in pair_rows], pa.float32()),
            "method": pa.array([m for _, (_, m) in pair_rows], pa.string()),
        }
    )
    leak_rows = [
        (names[0][a], fs.display(datasets[side].path), names[side][b], s, m)
        for side in range(1, len(datasets))
        for (a, b), (s, m) in merged.get(side, {}).items()
    ]
    leak_rows.sort(key=lambda r: (-r[3], r[0], r[1], r[2]))
    leakage = pa.table(
        {
            k: pa.array([r[j] for r in leak_rows], t)
            for j, (k, t) in enumerate(
                (
                    ("id_a", pa.string()),
                    ("dataset_b", pa.string()),
                    ("id_b", pa.string()),
                    ("similarity", pa.float32()),
                    ("method", pa.string()),
                )
            )
        }
    )
    pq.write_table(pairs, os.path.join(stage, "pairs.parquet"))
    pq.write_table(leakage, os.path.join(stage, "leakage.parquet"))
    pq.write_table(table, os.path.join(stage, "groups.parquet"))
    sizes = Counter(len(m) for m in groups)
    summary = {
        "kind": KIND,
        "embeddings": fs.display(embeddings),
        "against": [fs.display(a) for a in against],
        "method": cfg.method,
        "vectors": n,
        "threshold": {"value": threshold, **how} if threshold is not None else None,
        "minhash_threshold": cfg.minhash_threshold if minhash else None,
        "space": "centred + PCA-whitened cosine" if cfg.whiten else "centred cosine",
        "pairs": len(pair_rows),
        "pairs_by_method": dict(Counter(m for _, (_, m) in pair_rows)),
        "groups": len(groups),
        "grouped": len(grouped_ids),
        "duplicates_removable": len(grouped_ids) - len(groups),
        "groups_by_size": {str(k): sizes[k] for k in sorted(sizes)},
        "leakage_pairs": {fs.display(d.path): len(merged.get(s, {})) for s, d in enumerate(datasets[1:], 1)},
        "keep": cfg.keep,
        "keep_note": keep_note,
        "plan": {
            "clusters": len(plan.centroids),
            "probes": plan.probes,
            "buckets": plan.buckets,
            "sample": len(sample),
        },
        "config": asdict(cfg),
        "files": ["pairs.parquet", "leakage.parquet", "groups.parquet", "summary.json", "report.html"],
    }
    _report(stage, summary, table, pair_rows, names, leak_rows, datasets, cfg)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    store.write_json(os.path.join(stage, "summary.json"), summary)
    store.publish(stage, out, kind=KIND, overwrite=overwrite)
    return summary


def _report(stage, summary, table, pair_rows, names, leak_rows, datasets, cfg) -> None:
    from attnpipe.data.fetch import fetch_images
    from attnpipe.dedup.report import write_report

    rows = table.to_pylist()
    by_group: dict[int, list] = {}
    for r in rows:
        if r["group"] < cfg.report_groups:
            by_group.setdefault(r["group"], []).append((r["id"], r["keep"], r["similarity_to_kept"]))
    shown = [sorted(m, key=lambda t: (not t[1], -t[2]))[:12] for _, m in sorted(by_group.items())]
    border = [(names[0][a], names[0][b], s, m) for (a, b), (s, m) in pair_rows[::-1][: cfg.report_pairs]]
    leaks = [(a, d, b, s) for a, d, b, s, _ in leak_rows[: cfg.report_pairs]]
    ids0 = {i for m in shown for i, _, _ in m} | {i for a, b, _, _ in border for i in (a, b)} | {a for a, *_ in leaks}
    images = fetch_images(datasets[0].manifest, ids0)
    for side, ds in enumerate(datasets[1:], 1):
        name = fs.display(ds.path)
        images.update(fetch_images(ds.manifest, {b for _, d, b, _ in leaks if d == name}))
    write_report(os.path.join(stage, "report.html"), summary, shown, border, images, leaks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DedupConfig()
    p.add_argument("--embeddings", required=True, help="embeddings dataset to deduplicate")
    p.add_argument("--out", required=True, help="output directory: pairs/leakage/groups.parquet, summary, report")
    p.add_argument("--against", nargs="*", default=[], help="other datasets checked for leakage (e.g. train)")
    p.add_argument("--method", default=d.method, choices=METHODS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None, help="cosine (centred/whitened space) for a pair")
    g.add_argument("--auto", action="store_true", help="calibrate the threshold from the data (the default)")
    p.add_argument("--keep", default=d.keep, choices=KEEP_RULES, help="which member of a group is kept")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=d.whiten, help="PCA-whiten")
    p.add_argument("--z", type=float, default=d.z, help="auto threshold: median + z * MAD of NN similarity")
    p.add_argument("--probes", type=int, default=d.probes, help="nearest clusters each vector is compared in")
    p.add_argument("--clusters", type=int, default=d.clusters, help="k-means clusters (default n/1000)")
    p.add_argument("--sample", type=int, default=d.sample, help="vectors for centring/whitening/k-means")
    p.add_argument("--minhash-threshold", type=float, default=d.minhash_threshold)
    p.add_argument("--minhash-perm", type=int, default=d.minhash_perm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dedup output at --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--ray-address", default=None)


def run_command(args: argparse.Namespace) -> int:
    cfg = DedupConfig(
        method=args.method,
        threshold=args.threshold,
        keep=args.keep,
        whiten=args.whiten,
        z=args.z,
        probes=args.probes,
        clusters=args.clusters,
        sample=args.sample,
        minhash_threshold=args.minhash_threshold,
        minhash_perm=args.minhash_perm,
        seed=args.seed,
    )
    summary = dedup(args.embeddings, args.out, args.against, cfg, args.overwrite, args.ray_address)
    th = summary["threshold"]
    _log(
        f"{summary['pairs']} pairs, {summary['groups']} groups ({summary['duplicates_removable']} removable)"
        + (f", threshold {th['value']:.4f} ({th['chosen']})" if th else "")
        + f", leakage {summary['leakage_pairs']} in {summary['seconds']:.1f} s -> {fs.display(args.out)}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0
