"""Duplicate groups: connected components of the pairs (union-find), and which member of each group is kept.

Keep rules (``--keep``):

- ``first``: the smallest id;
- ``central``: the highest mean similarity to the rest of the group (``(z_i · Σz - 1) / (n - 1)`` on unit rows: exact
  and linear in the group size);
- ``largest``: the biggest source image (pixels, from the image header) when sizes are known, ties and unknown sizes
  by ``first``.

Example::

    groups = connected([(0, 1), (1, 2), (5, 6)])           # [[0, 1, 2], [5, 6]]
    table = group_table(groups, ids, Z, keep="central")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

KEEP_RULES = ("first", "central", "largest")


def connected(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (with at least two members) of an edge list of hashable ints, union-find."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        root = i
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(find(i), []).append(i)
    return [sorted(m) for m in members.values() if len(m) > 1]


def choose(ids: Sequence[str], Z: np.ndarray, keep: str, pixels: Sequence[int | None] | None = None) -> int:
    """Position of the kept member of one group (rows of ``Z`` are its unit vectors, in ``ids`` order)."""
    if keep not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {keep!r}; expected one of {KEEP_RULES}")
    first = min(range(len(ids)), key=lambda i: ids[i])
    if keep == "central" and len(ids) > 2:
        score = (Z @ Z.sum(0) - 1.0) / (len(ids) - 1)  # mean similarity to the others
        best = float(score.max())
        return min((i for i in range(len(ids)) if score[i] >= best - 1e-6), key=lambda i: ids[i])
    if keep == "largest" and pixels is not None and any(p is not None for p in pixels):
        size = [p if p is not None else -1 for p in pixels]
        return min(range(len(ids)), key=lambda i: (-size[i], ids[i]))
    return first


def group_table(
    groups: list[list[int]],
    id_of: dict[int, str],
    z_of: dict[int, np.ndarray],
    keep: str,
    pixels_of: dict[str, int] | None = None,
) -> pa.Table:
    """``id, group, keep, similarity_to_kept`` for every grouped vector; groups numbered by size, then first id."""
    named = sorted(([id_of[g] for g in m], m) for m in groups)
    named.sort(key=lambda t: -len(t[0]))
    rows: dict[str, list] = {"id": [], "group": [], "keep": [], "similarity_to_kept": []}
    for number, (ids, members) in enumerate(named):
        Z = np.stack([z_of[g] for g in members])
        pixels = [pixels_of.get(i) for i in ids] if pixels_of is not None else None
        k = choose(ids, Z, keep, pixels)
        sims = Z @ Z[k]
        for j, i in sorted(enumerate(ids), key=lambda t: t[1]):
            rows["id"].append(i)
            rows["group"].append(number)
            rows["keep"].append(j == k)
            rows["similarity_to_kept"].append(1.0 if j == k else float(sims[j]))
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "group": pa.array(rows["group"], pa.int32()),
            "keep": pa.array(rows["keep"], pa.bool_()),
            "similarity_to_kept": pa.array(rows["similarity_to_kept"], pa.float32()),
        }
    )
