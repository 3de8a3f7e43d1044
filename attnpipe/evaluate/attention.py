"""Attention-map statistics for the evaluate stage: stored ``(n, h, w)`` maps (+ object boxes) -> per-image numbers.

Per image: normalized entropy, peak, top-10% mass, effective area, centre of mass and spatial spread, and with an
object box the attention mass inside it and the pointing-game hit. :func:`summarize` averages them overall and per
label into a JSON-ready dict (``metrics.attention.heads.<pooling>``); :func:`histogram` bins one statistic for the
report. Entropy, peak and top-10% mass follow ``attnpipe.models.pooling.attention_stats`` (the values stored in the
embeddings dataset). Everything is vectorized over images, in float64, in row chunks to bound memory.

Example::

    stats = per_image_stats(ds.attention, ds.boxes)   # {"entropy": (n,), ..., "box_mass": (n,), "pointing_hit": (n,)}
    summarize(stats, ds.labels)["overall"]["entropy"], histogram(stats["entropy"])["counts"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # float64 work arrays of ~32 MB per chunk of maps
NONE_LABEL = "(none)"
BASE_STATS = ("entropy", "peak", "top10_mass", "effective_area", "center_x", "center_y", "spread")
BOX_STATS = ("box_mass", "pointing_hit")


def per_image_stats(attn: np.ndarray, boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Statistics of each attention map, ``{stat: (n,) float64}``.

    Coordinates are normalized to [0, 1] with cell ``(i, j)`` centred at ``((j + 0.5) / w, (i + 0.5) / h)``.

    - ``entropy``: ``-sum a log a / log(hw)`` in [0, 1] (1 uniform, 0 one cell; 0 when ``hw == 1``);
    - ``peak``: the largest weight; ``top10_mass``: total weight of the ``ceil(hw / 10)`` largest cells;
    - ``effective_area``: ``exp(H) / hw`` with ``H`` the natural-log entropy (1 uniform, ``1 / hw`` one cell);
    - ``center_x``, ``center_y``: centre of mass; ``spread``: root of the attention-weighted mean squared distance
      from it;
    - with ``boxes``: ``box_mass``, the attention inside the box, each cell weighted by the fraction of its area the
      box covers (exact for boxes not aligned to cells), and ``pointing_hit``, 1.0 when the centre of the argmax
      cell (first one on ties) lies in the box (edges included), else 0.0; NaN for rows without a box.

    Each map is renormalized to sum 1 (the stored maps are float16); a map with no positive finite mass gets NaN
    everywhere.

    Args:
        attn: ``(n, h, w)`` non-negative attention maps.
        boxes: ``(n, 4)`` ``[x0, y0, x1, y1]`` in normalized image coordinates (swapped corners are reordered);
            a row with any NaN has no box.

    Raises:
        ValueError: on shapes other than ``(n, h, w)`` and ``(n, 4)``.
    """
    attn = np.asarray(attn)
    if attn.ndim != 3 or 0 in attn.shape[1:]:
        raise ValueError(f"attention maps must be (n, h, w) with h, w >= 1, got shape {attn.shape}")
    n, h, w = attn.shape
    if boxes is not None:
        boxes = np.asarray(boxes, np.float64)
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must be ({n}, 4) to match the attention maps, got {boxes.shape}")
    names = BASE_STATS + (BOX_STATS if boxes is not None else ())
    out = {name: np.full(n, np.nan) for name in names}
    rows = max(1, CHUNK_ELEMENTS // (h * w))
    for s in range(0, n, rows):
        part = _chunk_stats(attn[s : s + rows], None if boxes is None else boxes[s : s + rows])
        for name, v in part.items():
            out[name][s : s + len(v)] = v
    return out


def _chunk_stats(attn: np.ndarray, boxes: np.ndarray | None) -> dict[str, np.ndarray]:
    n, h, w = attn.shape
    hw = h * w
    a = np.nan_to_num(attn.reshape(n, hw).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # (n, h, w) -> (n, hw)
    np.maximum(a, 0.0, out=a)
    total = a.sum(1)
    ok = total > 0  # an all-zero (or all-NaN) map has no distribution: its stats stay NaN
    a /= np.where(ok, total, 1.0)[:, None]

    ent = -np.sum(a * np.log(np.where(a > 0, a, 1.0)), axis=1)  # natural log; 0 log 0 = 0
    top = -(-hw // 10)  # integer ceil(hw / 10), as the encoder computes it
    xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h  # cell centres
    grid = a.reshape(n, h, w)
    mx, my = grid.sum(1), grid.sum(2)  # marginals: (n, w) over columns, (n, h) over rows
    cx, cy = mx @ xs, my @ ys
    # squared distances from the centre, summed through the marginals (no cancellation: one cell gives exactly 0)
    var = (mx * (xs[None, :] - cx[:, None]) ** 2).sum(1) + (my * (ys[None, :] - cy[:, None]) ** 2).sum(1)
    stats = {
        "entropy": np.clip(ent / math.log(hw), 0.0, 1.0) if hw > 1 else np.zeros(n),
        "peak": a.max(1),
        "top10_mass": np.partition(a, hw - top, axis=1)[:, hw - top :].sum(1),
        "effective_area": np.exp(ent) / hw,
        "center_x": cx,
        "center_y": cy,
        "spread": np.sqrt(var),
    }
    if boxes is not None:
        has = ~np.isnan(boxes).any(1) & ok
        b = np.where(has[:, None], boxes, 0.0)
        x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
        y0, y1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
        fx = _coverage(x0, x1, w)  # (n, w): fraction of each column's width inside [x0, x1]
        fy = _coverage(y0, y1, h)  # (n, h)
        box_mass = np.einsum("nhw,nh,nw->n", grid, fy, fx)
        peak = a.argmax(1)
        px, py = xs[peak % w], ys[peak // w]
        hit = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
        stats["box_mass"] = np.where(has, box_mass, np.nan)
        stats["pointing_hit"] = np.where(has, hit.astype(np.float64), np.nan)
    for v in stats.values():
        v[~ok] = np.nan
    return stats


def _coverage(lo: np.ndarray, hi: np.ndarray, cells: int) -> np.ndarray:
    """``(n, cells)``: overlap of ``[lo, hi]`` with each cell ``[j / cells, (j + 1) / cells]``, over the cell width."""
    edges = np.arange(cells + 1) / cells
    overlap = np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1])
    return np.clip(overlap * cells, 0.0, 1.0)


def summarize(stats: dict[str, np.ndarray], labels: Sequence[str | None] | None = None) -> dict:
    """Means of :func:`per_image_stats` overall and per label, JSON-ready.

    Returns:
        ``{"count": n, "overall": {stat: mean}, "per_label": {label: {"count": n_label, stat: mean}}}``. NaNs are
        ignored; a stat with no finite value (for a label, or overall) is left out, so ``box_mass`` and
        ``pointing_game`` (the hit rate of ``pointing_hit``) appear only where some image has a box. Labels are
        sorted; ``None`` labels are grouped under ``"(none)"``; ``per_label`` is empty without labels. Counts are
        ints, means plain floats.

    Raises:
        ValueError: when the stats have different lengths or ``labels`` does not have one entry per image.
    """
    lengths = {len(v) for v in stats.values()}
    if len(lengths) > 1:
        raise ValueError(f"stats have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    values = {("pointing_game" if k == "pointing_hit" else k): np.asarray(v, np.float64) for k, v in stats.items()}
    out: dict = {"count": n, "overall": _means(values, np.zeros(n, np.int64), 1)[0], "per_label": {}}
    if labels is None:
        return out
    keys = [NONE_LABEL if x is None else str(x) for x in labels]
    if len(keys) != n:
        raise ValueError(f"labels has {len(keys)} entries for {n} images")
    names = sorted(set(keys))
    code_of = {name: c for c, name in enumerate(names)}
    codes = np.fromiter((code_of[x] for x in keys), np.int64, n)
    counts = np.bincount(codes, minlength=len(names))
    means = _means(values, codes, len(names))
    out["per_label"] = {name: {"count": int(counts[c]), **means[c]} for c, name in enumerate(names)}
    return out


def _means(values: dict[str, np.ndarray], codes: np.ndarray, groups: int) -> list[dict[str, float]]:
    """Per group, ``{stat: nanmean}`` for the stats with at least one finite value in the group."""
    out: list[dict[str, float]] = [{} for _ in range(groups)]
    for name, v in values.items():
        finite = np.isfinite(v)
        num = np.bincount(codes[finite], minlength=groups)
        total = np.bincount(codes[finite], weights=v[finite], minlength=groups)
        for g in np.flatnonzero(num):
            out[g][name] = float(total[g] / num[g])
    return out


def histogram(values: np.ndarray, bins: int = 20, range_: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Counts of ``values`` in ``bins`` equal bins over ``range_``: ``{"edges": [bins + 1], "counts": [bins]}``.

    NaNs are dropped; finite values outside the range are clipped into the end bins, so the counts sum to the number
    of finite values. Plain Python floats and ints (JSON-ready).

    Raises:
        ValueError: on ``bins < 1`` or an empty or inverted range.
    """
    lo, hi = float(range_[0]), float(range_[1])
    if bins < 1 or not hi > lo:
        raise ValueError(f"histogram needs bins >= 1 and range lo < hi, got bins={bins}, range={range_}")
    v = np.asarray(values, np.float64).ravel()
    v = np.clip(v[np.isfinite(v)], lo, hi)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


class Totals:
    """Mergeable sums behind :func:`summarize`: one part of a dataset at a time, merged across parts (or tasks).

    ``add(stats, labels)`` takes :func:`per_image_stats` of some images; ``merge`` adds another ``Totals``;
    ``summary()`` returns what :func:`summarize` returns over all images added (means of sums, so the same numbers
    up to float rounding). ``histogram`` holds the exact counts of the normalized entropy in 20 bins over [0, 1].
    """

    def __init__(self) -> None:
        self.count = 0
        # label key -> [images, {stat: [sum, finite count]}]; overall under None
        self.groups: dict[str | None, list] = {}
        self.entropy_counts = np.zeros(20, np.int64)

    def add(self, stats: dict[str, np.ndarray], labels: Sequence[str | None]) -> None:
        n = len(next(iter(stats.values()))) if stats else 0
        self.count += n
        keys = [NONE_LABEL if x is None else str(x) for x in labels]
        names = sorted(set(keys))
        code_of = {name: c for c, name in enumerate(names)}
        codes = np.fromiter((code_of[x] for x in keys), np.int64, n)
        counts = np.bincount(codes, minlength=len(names))
        values = {("pointing_game" if k == "pointing_hit" else k): np.asarray(v, np.float64) for k, v in stats.items()}
        self._add_group(None, n, values, np.zeros(n, np.int64), 0)
        for c, name in enumerate(names):
            self._add_group(name, int(counts[c]), values, codes, c)
        self.entropy_counts += histogram(stats["entropy"])["counts"] if "entropy" in stats else 0

    def _add_group(self, key: str | None, images: int, values: dict[str, np.ndarray], codes: np.ndarray, c: int):
        group = self.groups.setdefault(key, [0, {}])
        group[0] += images
        for name, v in values.items():
            sel = (codes == c) & np.isfinite(v)
            acc = group[1].setdefault(name, [0.0, 0])
            acc[0] += float(v[sel].sum())
            acc[1] += int(sel.sum())

    def merge(self, other: Totals) -> Totals:
        self.count += other.count
        self.entropy_counts += other.entropy_counts
        for key, (images, stats) in other.groups.items():
            group = self.groups.setdefault(key, [0, {}])
            group[0] += images
            for name, (s, k) in stats.items():
                acc = group[1].setdefault(name, [0.0, 0])
                acc[0] += s
                acc[1] += k
        return self

    def summary(self) -> dict:
        def means(stats: dict) -> dict[str, float]:
            return {name: s / k for name, (s, k) in stats.items() if k}

        overall = self.groups.get(None, [0, {}])
        out: dict = {"count": self.count, "overall": means(overall[1]), "per_label": {}}
        labels = sorted(k for k in self.groups if k is not None)
        out["per_label"] = {k: {"count": self.groups[k][0], **means(self.groups[k][1])} for k in labels}
        return out
