"""Source image bytes of a few embedded ids, re-read from the shards the embeddings manifest names (for reports).

Only the shards holding the wanted ids are opened, and in an image folder only the wanted members are read; tar and
Parquet shards are streamed by the ordinary readers. Best effort by design: a report must still render when the
sources moved or were deleted, so missing shards give missing entries, never an exception.

Example::

    images = fetch_images("emb/", {"shard-00000/000012", "shard-00001/000345"})   # {id: JPEG/PNG bytes}
"""

from __future__ import annotations

from collections.abc import Iterable

from attnpipe.data.readers import read_unit
from attnpipe.data.shards import InputError, discover, read_units

MAX_BYTES = 64 << 20  # per member, as data.max_bytes' default


def shard_of(manifest: dict, ids: Iterable[str]) -> dict[str, set[str]]:
    """Shard name -> the wanted ids in it (ids are ``<shard name>/<key>``; longest matching shard name wins)."""
    names = sorted((s["name"] for s in manifest["shards"]), key=len, reverse=True)
    out: dict[str, set[str]] = {}
    for i in ids:
        name = next((n for n in names if i.startswith(n + "/")), None)
        if name is not None:
            out.setdefault(name, set()).add(i)
    return out


def fetch_images(embeddings: str | dict, ids: Iterable[str], max_bytes: int = MAX_BYTES) -> dict[str, bytes]:
    """Encoded image bytes for ``ids`` from the source shards of an embeddings dataset (path or its manifest).

    Ids whose shard is synthetic, gone, or unreadable, or whose member is an error row, are left out.
    """
    if isinstance(embeddings, dict):
        manifest = embeddings
    else:
        from attnpipe import store

        manifest = store.open_dataset(embeddings).manifest
    wanted = shard_of(manifest, ids)
    entries = {s["name"]: s for s in manifest["shards"] if s["name"] in wanted and s.get("format") != "synthetic"}
    out: dict[str, bytes] = {}
    for name, entry in sorted(entries.items()):
        try:
            # ``known`` carries the recorded fingerprint: an unchanged shard is not hashed (read) again
            found = [s for s in discover([entry["uri"]], known={name: entry}) if s.name == name]
        except (InputError, OSError, ValueError):  # sources moved or gone: the report shows placeholders
            continue
        keys = {i[len(name) + 1 :] for i in wanted[name]}
        for unit in read_units(found):
            if unit["format"] == "folder":  # read only the wanted members of an image folder
                pick = [j for j, k in enumerate(unit["keys"]) if k in keys]
                if not pick:
                    continue
                unit = {**unit, **{f: [unit[f][j] for j in pick] for f in ("files", "keys", "key_errors")}}
            table = read_unit(unit, max_bytes)
            for rid, data in zip(table.column("id").to_pylist(), table.column("data").to_pylist()):
                if rid in wanted[name] and data:
                    out[rid] = data
    return out
