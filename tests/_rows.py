"""Exact-row checks for the cluster and fault tests: every input row exactly once, nothing left behind.

``sample_to(uri, n, shards)`` makes a tar sample locally, uploads it to ``uri`` (local or ``s3://``) and returns the
ids a complete encode must produce, read from the tar members themselves (not through attnpipe's readers).
``assert_exact(out, ids)`` checks the published dataset against them and that no staging area or unlisted part is
left in ``out``.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections import Counter

from attnpipe import fs, store
from attnpipe.data.sample import make_sample


def sample_to(uri: str, n: int, shards: int, image_size: int = 64) -> list[str]:
    """Write a tar sample of ``n`` images in ``shards`` shards to ``uri``; returns the expected ids, sorted."""
    with tempfile.TemporaryDirectory(prefix="attnpipe-rows-") as local:
        paths = make_sample(local, fmt="tar", n=n, num_shards=shards, image_size=image_size)
        ids = []
        for path in paths:
            shard = os.path.basename(path).removesuffix(".tar")
            with tarfile.open(path) as tar:
                keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))}
            ids += [f"{shard}/{k}" for k in keys]
        if fs.is_local(uri):
            os.makedirs(uri, exist_ok=True)
        fs.upload_dir(local, uri)
    assert len(ids) == n, f"the sample has {len(ids)} image members, expected {n}"
    return sorted(ids)


def committed_shards(out: str) -> list[str]:
    """Shard commit records of unfinished runs: ``_staging/<token>/shards/<shard>.json``."""
    return [p for p, _ in fs.walk_files(fs.join(out, store.writer.STAGING)) if "/shards/" in p]


def assert_exact(out: str, ids: list[str]) -> None:
    """The dataset at ``out`` holds every id of ``ids`` exactly once and nothing else is left in ``out``."""
    got = store.read_embeddings(out, ["id", "status"])
    counts = Counter(got.column("id").to_pylist())
    dups = sorted(i for i, c in counts.items() if c > 1)
    assert not dups, f"{len(dups)} ids written more than once, e.g. {dups[:5]}"
    assert sorted(counts) == ids, (
        f"missing {sorted(set(ids) - set(counts))[:5]}, unexpected {sorted(set(counts) - set(ids))[:5]}"
    )
    assert set(got.column("status").to_pylist()) == {"ok"}
    listed = set(store.part_numbers(store.read_manifest(out)))
    files = [p for p, _ in fs.walk_files(out)]
    assert not [p for p in files if p.startswith(store.writer.STAGING)], f"staging left in {out}: {files}"
    unlisted = sorted(p for p in files if p.startswith("part-") and p not in listed)
    assert not unlisted, f"parts the manifest does not list were left in {out}: {unlisted}"
    assert listed <= set(files), f"listed parts missing: {sorted(listed - set(files))}"
