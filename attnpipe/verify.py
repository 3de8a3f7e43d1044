"""``attnpipe verify PATH``: the full integrity check of an embeddings dataset or an index root, and its leftovers.

Readers check what they use as they use it (parts by sha256, index files by size and a sampled hash); this is the
check of everything, with every file hashed in full. It also lists what killed runs left behind — unfinished
encode/reindex runs in a dataset (their staging records and the parts they wrote), index staging directories and
partial uploads — and removes them with ``clean=True``. Only files attnpipe's own manifests or staging records
name are ever removed.

Example::

    report = verify("s3://bucket/emb")   # {"kind": "embeddings", "checked": 12, "problems": [], "leftovers": [...]}
"""

from __future__ import annotations

from attnpipe import fs, store
from attnpipe.index import layout


def verify(path: str, clean: bool = False) -> dict:
    """Check every file of the dataset or index root at ``path``; returns a report (problems, leftovers).

    Raises:
        FileNotFoundError: ``path`` is neither an attnpipe embeddings dataset nor an index root.
    """
    if fs.is_file(fs.join(path, store.MANIFEST)) or fs.is_dir(fs.join(path, store.writer.STAGING)):
        return _verify_dataset(path, clean)
    if fs.is_file(fs.join(path, layout.CURRENT)) or layout.versions(path):
        return _verify_index(path, clean)
    raise FileNotFoundError(f"{fs.display(path)} is neither an attnpipe embeddings dataset nor an index root")


def _verify_dataset(path: str, clean: bool) -> dict:
    problems: list[str] = []
    checked = 0
    manifest = None
    try:
        manifest = store.read_manifest(path)
    except FileNotFoundError:
        problems.append(f"{fs.display(path)} has no {store.MANIFEST}: never published (an unfinished first run?)")
    except store.DamagedData as exc:
        problems.append(str(exc))
    if manifest is not None:
        bad = store.damaged_parts(path, manifest, full=True)
        problems += list(bad.values())
        checked = sum(len(s["parts"]) for s in manifest["shards"]) + 1
    runs = store.unfinished_runs(path)
    leftovers = [f"unfinished run {r.token} (started {r.info.get('started', '?')})" for r in runs]
    if clean:
        listed = set(store.part_numbers(manifest)) if manifest else set()
        leftovers += [f"removed {x}" for x in store.clean_dataset(path, listed)]
    return {
        "path": fs.display(path),
        "kind": "embeddings",
        "checked": checked,
        "problems": problems,
        "leftovers": leftovers,
    }


def _verify_index(path: str, clean: bool) -> dict:
    problems: list[str] = []
    checked = 0
    try:
        layout.read_current(path)
    except layout.IndexLayoutError as exc:
        problems.append(str(exc))
    for version in layout.versions(path):
        try:
            manifest = layout.load_manifest(path, version, verify=True, full=True)
            checked += len(manifest.get("files", {})) + 1
        except layout.IndexLayoutError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            layout.load_manifest(path, verify=False)  # CURRENT's checksum of its manifest
        except layout.IndexLayoutError as exc:
            problems.append(str(exc))
    names = fs.listdir(path)
    leftovers = [d for d in names if d.startswith(".v") and ".staging-" in d]
    leftovers += [d for d in names if layout._VERSION.match(d) and d not in layout.versions(path)]
    if clean:
        leftovers = [f"removed {x}" for x in layout.clean_leftovers(path)]
    return {"path": fs.display(path), "kind": "index", "checked": checked, "problems": problems, "leftovers": leftovers}
