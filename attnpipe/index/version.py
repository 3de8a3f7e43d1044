"""An index version's manifest: the one builder used by full builds and incremental updates.

Example::

    manifest = version_manifest(count=n, dim=d, faiss_section=..., lsh_meta=..., update={"mode": "full"},
                                workers=1, start=t0, source=source_info(ds), config=cfg, estimate=plan(n, d, cfg))
"""

from __future__ import annotations

import os
import resource
import time

from attnpipe import fs, store
from attnpipe.index.config import IndexConfig

TUNE_K = 10


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def version_manifest(
    count: int,
    dim: int,
    faiss_section: dict,
    lsh_meta: dict,
    update: dict,
    workers: int,
    start: float,
    source: dict,
    config: IndexConfig,
    estimate: dict | None = None,
) -> dict:
    """The one builder of an index version's manifest (full builds and incremental updates)."""
    return {
        "type": "attnpipe-index",
        "count": int(count),
        "dim": int(dim),
        "metric": "inner_product",
        "faiss": faiss_section,
        "lsh": lsh_meta,
        "update": update,
        "workers": workers,
        "build_seconds": round(time.perf_counter() - start, 2),
        "memory": {
            "budget_bytes": config.memory_budget,
            "estimated_bytes": (estimate or {}).get("estimated_bytes"),
            "resident_bytes": (estimate or {}).get("resident_bytes"),
            "ondisk": bool(faiss_section.get("ivfdata")),
            "build_peak_rss_bytes": peak_rss_bytes(),
        },
        "source": source,
    }


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


def source_path(path: str) -> str:
    """How a version records its embeddings: an absolute local path, or the URI."""
    return os.path.abspath(fs.resolve(path)[1]) if fs.is_local(path) else fs.display(path)


def source_info(ds: store.Dataset) -> dict:
    """What a version was built from: the dataset, its model, shard fingerprints, part numbers (for updates), and
    the checksum of the exact dataset state (``eval`` refuses an index of another state)."""
    return {
        "embeddings": source_path(ds.path),
        "model": ds.manifest.get("model"),
        "shards": {s["name"]: s["fingerprint"] for s in ds.manifest["shards"]},
        "parts": store.part_numbers(ds.manifest),
        "manifest_sha256": ds.manifest_sha256,
    }
