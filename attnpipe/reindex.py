"""Scheduled, incremental re-indexing: re-encode only the shards that changed, then refresh the index.

One run, under a lock on both the embeddings dataset and the index root:

1. clean up what a killed run left (staging dirs, unlisted parts, index staging versions);
2. discover the input shards and classify them against the embeddings manifest: added, changed (content hash
   differs), removed, unchanged. A different model signature (backbone, pooling, weights, image size) makes every
   stored embedding stale: the run refuses unless ``force`` is given, then re-encodes everything;
3. encode added + changed shards into a staging dir inside the dataset, move the parts in and replace
   ``_manifest.json`` (the commit point: readers see the old or the new dataset, never a mix; parts of changed
   and removed shards leave the manifest and are deleted by the next run);
4. refresh the index (``index.update``): nothing, incremental, or full — each new version verified before
   ``CURRENT`` moves — and keep the newest ``keep`` versions.

Killed at any moment, the dataset and ``CURRENT`` stay whole; the next run cleans up and finishes the work (if the
kill fell after step 3, the index is still behind the manifest and is brought up to date without re-encoding).

Example::

    summary = reindex(["data/"], "out/emb", "out/index", load_config())
    summary["added"], summary["version"], summary["vectors"]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

from attnpipe import fs, store
from attnpipe.config import Config, ConfigError
from attnpipe.data.shards import Shard, check_inputs, discover
from attnpipe.encode import encode_shards, model_signature, run_description, summarize
from attnpipe.index import layout
from attnpipe.index.config import IndexConfig
from attnpipe.index.update import refresh_index
from attnpipe.lock import exclusive
from attnpipe.runtime import init_ray

LOCK = ".reindex.lock"
log = logging.getLogger("attnpipe.reindex")
MODEL_KEYS = ("backbone", "pooling", "weights_fingerprint", "image_size")
KILL_ENV = "ATTNPIPE_TEST_KILL_AT"  # tests: SIGKILL this process at a named step (see _step)


def reindex(
    inputs: list[str],
    embeddings: str,
    root: str,
    cfg: Config,
    *,
    index: IndexConfig | None = None,
    force: bool = False,
    ray_address: str | None = None,
    **overrides,
) -> dict:
    """Bring ``embeddings`` and the index under ``root`` up to date with ``inputs``; returns the run summary.

    ``index`` holds the index settings (factory, lsh, workers, target recall, max growth, keep, ...); ``overrides``
    are :class:`~attnpipe.index.config.IndexConfig` fields applied on top (``reindex(..., factory="IVF16,Flat")``).

    Raises:
        InputError: an input is missing or holds no shard.
        ConfigError: the model changed and ``force`` is False, or ``keep < 1``.
        LockHeld: another reindex holds the dataset or the index root.
    """
    try:
        index = dataclasses.replace(index or IndexConfig(), **overrides)
    except ValueError as exc:  # IndexConfig checks its own values (keep >= 1, lsh choice, ...)
        raise ConfigError(str(exc)) from None
    keep = index.keep
    check_inputs(inputs)  # before creating anything
    start = time.perf_counter()
    fs.makedirs(embeddings)
    fs.makedirs(root)
    command = f"attnpipe reindex --embeddings {fs.display(embeddings)} --index {fs.display(root)}"
    with exclusive(fs.join(root, LOCK), command), exclusive(fs.join(embeddings, LOCK), command):
        for gone in layout.clean_leftovers(root):
            _log(f"removed {gone}: left by a killed run")
        if fs.is_file(fs.join(root, layout.CURRENT)) and (repaired := layout.repair_current(root)):
            _log(f"{layout.CURRENT} was damaged or named a broken version: it names {repaired} again")
        old = store.read_manifest(embeddings) if fs.is_file(fs.join(embeddings, store.MANIFEST)) else None
        known = {s["name"]: s for s in old["shards"]} if old else {}
        shards = discover(inputs, known)
        damaged = store.damaged_parts(embeddings, old) if old else {}
        for why in damaged.values():
            _log(f"{why}: its shard is re-encoded")
        if old and damaged:  # a damaged or missing part makes its shard 'changed': this run repairs it
            bad = {e["name"] for e in old["shards"] if set(e["parts"]) & set(damaged)}
            old = {**old, "shards": [{**e, "fingerprint": "damaged"} if e["name"] in bad else e for e in old["shards"]]}
        stale = _model_change(old, cfg)
        if stale and not force:
            raise ConfigError(
                f"the embeddings in {embeddings} were made with {stale}; every shard would be "
                "re-encoded. Pass --force to do that, or restore the previous model settings"
            )
        changes = classify(shards, old, stale_model=bool(stale))
        _log(_describe(changes) + (f" (model changed: {stale})" if stale else ""))
        todo = [s for s in shards if s.name in changes["added"] + changes["changed"]]
        if todo:
            init_ray(ray_address)
        encoded = _update_embeddings(embeddings, shards, todo, old, cfg)
        _step("embeddings-committed")
        manifest, plan = refresh_index(embeddings, root, index, ray_address=ray_address)
        live = manifest or layout.load_manifest(root, verify=False)
        pruned = layout.prune(root, keep)
        for v in pruned:
            _log(f"removed index version {v} (keeping the newest {keep})")
    return {
        **changes,
        "version": live["version"],
        "vectors": int(live["count"]),
        "seconds": round(time.perf_counter() - start, 2),
        "encoded_images": encoded,
        "index_update": plan.mode,
        "index_reason": plan.reason,
        "pruned": pruned,
    }


def classify(shards: list[Shard], old: dict | None, stale_model: bool = False) -> dict[str, list[str]]:
    """Shard names by change against the previous manifest: added, changed, removed, unchanged."""
    before = {s["name"]: s["fingerprint"] for s in (old or {}).get("shards", [])}
    now = {s.name: s.fingerprint for s in shards}
    return {
        "added": sorted(n for n in now if n not in before),
        "changed": sorted(n for n in now if n in before and (stale_model or before[n] != now[n])),
        "removed": sorted(n for n in before if n not in now),
        "unchanged": sorted(n for n in now if n in before and not stale_model and before[n] == now[n]),
    }


def _model_change(old: dict | None, cfg: Config) -> str:
    """'' if the stored embeddings were made with ``cfg``'s model, else what differs."""
    if old is None or not old.get("shards"):
        return ""
    was, now = old.get("model", {}), model_signature(cfg)
    keys = [k for k in MODEL_KEYS if k in was] or ["backbone", "pooling", "weights", "image_size"]
    diff = [f"{k}={was.get(k)!r} (now {now[k]!r})" for k in keys if was.get(k) != now[k]]
    return ", ".join(diff)


def _update_embeddings(embeddings: str, shards: list[Shard], todo: list[Shard], old: dict | None, cfg: Config) -> int:
    """Encode ``todo`` into the dataset and commit the new manifest; returns the number of images encoded.

    The encoding is a resumable run of the dataset (see :mod:`attnpipe.store.writer`): killed mid-way, the next
    reindex finds the same shards to do and skips those already committed.
    """
    old = old or {"shards": []}
    current = {s.name: s for s in shards}
    redo = {s.name for s in todo}
    kept = [
        {**e, **current[e["name"]].to_json()} for e in old["shards"] if e["name"] in current and e["name"] not in redo
    ]  # stat may have moved: remember it
    if old["shards"] and not todo and _same_dataset(old, kept, cfg):
        for gone in store.clean_dataset(embeddings):
            _log(f"removed {gone}: left by a killed run")
        return 0
    keep = {f: n for f, n in store.part_numbers(old).items() if any(f in e["parts"] for e in kept)}
    run = store.start_run(embeddings, {"reindex": run_description(todo, cfg)}, resume=True, replace=True)
    fresh = {name: rec["entry"] for name, rec in run.resumed.items()}
    rest = [s for s in todo if s.name not in fresh]
    if rest:
        _log(f"encoding {len(rest)} shards: {', '.join(s.name for s in rest)}")
        t = time.perf_counter()
        for entry, parts in encode_shards(rest, embeddings, run.token, cfg):
            run.commit_shard(entry, parts)
            fresh[entry["name"]] = entry
        summarize([fresh[s.name] for s in rest], embeddings, time.perf_counter() - t)
    entries = kept + [fresh[s.name] for s in todo]
    run.publish(entries, {"model": model_signature(cfg)}, config=cfg.to_dict(), keep=keep)
    return sum(fresh[s.name]["rows"] for s in rest)


def _same_dataset(old: dict, kept: list[dict], cfg: Config) -> bool:
    def view(entries: list[dict]) -> list[tuple]:
        return sorted((e["name"], e["fingerprint"], e.get("stat"), tuple(e["parts"])) for e in entries)

    return view(old["shards"]) == view(kept) and old.get("model") == model_signature(cfg)


def _describe(changes: dict[str, list[str]]) -> str:
    return "shards: " + ", ".join(f"{len(v)} {k}" for k, v in changes.items())


def _step(name: str) -> None:
    """Test hook: ``ATTNPIPE_TEST_KILL_AT=<step>`` SIGKILLs this process here (crash-safety tests)."""
    if os.environ.get(KILL_ENV) == name:
        _log(f"test hook: SIGKILL at {name}")
        os.kill(os.getpid(), signal.SIGKILL)


def _log(msg: str) -> None:
    log.info("reindex: %s", msg)
