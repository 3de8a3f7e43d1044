"""The report's query grid: each query, its attention heat-map with a colour bar, entropy and peak, and top hits.

Heat-maps are drawn on a fixed scale, 0 to the map's maximum in multiples of the uniform level (``1 / positions``),
with the uniform level marked on the colour bar: a uniform map is one flat colour, a small ripple stays small (a
min-max stretch would paint any ripple as a hot spot). Images are embedded as PNG data URIs.

Example::

    html = grid(cards)   # cards: query_id, label, image, attention, box, attn_entropy?, attn_peak?, results
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from attnpipe.evaluate._html import e as _e
from attnpipe.evaluate._html import isnum as _isnum
from attnpipe.evaluate._html import png as _png

THUMB = 128  # px, longest side of every card image


def _open(data: bytes | None) -> Image.Image | None:
    """RGB image, decoded at reduced scale when the format allows (JPEG draft); original size in ``info["size0"]``."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            size0 = im.size
            im.draft("RGB", (2 * THUMB, 2 * THUMB))  # a 12 MP JPEG decodes ~10x faster; no-op for PNG
            out = im.convert("RGB")
            out.info["size0"] = size0
            return out
    except (OSError, ValueError, Image.DecompressionBombError):  # unreadable bytes -> placeholder
        return None


def _placeholder(text: str) -> Image.Image:
    img = Image.new("RGB", (THUMB, THUMB), (226, 229, 234))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, THUMB - 1, THUMB - 1], outline=(190, 195, 203))
    w = draw.textlength(text)
    draw.text(((THUMB - w) / 2, THUMB / 2 - 6), text, fill=(110, 118, 130))
    return img


def _overlay(img: Image.Image | None, attention, box) -> tuple[Image.Image, float | None]:
    """The thumbnail with the attention map as an inferno heat-map, and the scale's top (in uniform levels).

    The map is divided by the uniform level ``1 / positions`` and drawn on ``[0, vmax]`` with
    ``vmax = max(map max, 1)``: a uniform map is one flat colour, and a small ripple stays a small ripple (a min-max
    stretch would paint any ripple as a hot spot).
    """
    a = np.asarray(attention, np.float32)
    if a.ndim != 2 or a.size == 0:
        return _placeholder("no attention"), None
    a = np.clip(np.nan_to_num(a), 0, None)
    total = float(a.sum())
    ratio = a * (a.size / total) if total > 0 else np.zeros_like(a)  # 1.0 = the uniform level
    vmax = max(float(ratio.max()), 1.0)
    base = ImageOps.contain(img, (THUMB, THUMB)) if img is not None else Image.new("RGB", (THUMB, THUMB), (150,) * 3)
    up = Image.fromarray(ratio / vmax).resize(base.size, Image.Resampling.BILINEAR)  # (h, w) -> (H, W) of the thumb
    up = np.clip(np.asarray(up), 0, 1)
    heat = matplotlib.colormaps["inferno"](up)[..., :3] * 255
    out = Image.fromarray((0.5 * np.asarray(base, np.float32) + 0.5 * heat).astype(np.uint8))
    if box is not None and len(box) == 4 and all(_isnum(v) for v in box):
        x0, y0, x1, y1 = (float(v) for v in box)
        # Boxes are normalized (README); pixel boxes are scaled from the original image size when it is known.
        sx, sy = (
            (out.width, out.height)
            if max(x0, y0, x1, y1) <= 1.0
            else ((out.width / img.info["size0"][0], out.height / img.info["size0"][1]) if img is not None else (0, 0))
        )
        if sx:
            ImageDraw.Draw(out).rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=(0, 229, 255), width=2)
    return out, vmax


def _colorbar(vmax: float) -> str:
    """The heat-map's scale under the tile: 0 .. vmax uniform levels, a cyan tick at the uniform level."""
    stops = ",".join(matplotlib.colors.to_hex(matplotlib.colormaps["inferno"](x)) for x in np.linspace(0, 1, 9))
    return (
        f'<div class="cbar" title="attention / uniform level, 0 to {vmax:.2f}; cyan tick = uniform" '
        f'style="background:linear-gradient(to right,{stops})"><i style="left:{100 / vmax:.1f}%"></i></div>'
        f'<div class="cbl"><span>0</span><span>{vmax:.2g}× unif.</span></div>'
    )


def _attn_numbers(card: dict) -> tuple[float | None, float | None]:
    """Normalized entropy and peak of the card's map: the runner's ``attn_entropy``/``attn_peak`` when present."""
    ent, peak = card.get("attn_entropy"), card.get("attn_peak")
    a = np.asarray(card.get("attention") if card.get("attention") is not None else [], np.float64)
    if (ent is None or peak is None) and a.ndim == 2 and a.size and np.isfinite(a).all() and a.sum() > 0:
        p = np.clip(a, 0, None).ravel() / np.clip(a, 0, None).sum()
        nz = p[p > 0]
        ent = ent if ent is not None else float(-(nz * np.log(nz)).sum() / np.log(p.size)) if p.size > 1 else 0.0
        peak = peak if peak is not None else float(p.max())
    return (float(ent) if ent is not None and _isnum(ent) else None), (
        float(peak) if peak is not None and _isnum(peak) else None
    )


def _tile(img: Image.Image, cls: str, caption: str, sub: str = "", extra: str = "") -> str:
    return (
        f'<div class="tile {cls}"><img alt="{_e(caption)}" src="{_png(img)}">{extra}'
        f'<div class="cap" title="{_e(caption)}">{_e(caption)}</div><div class="sub">{_e(sub)}</div></div>'
    )


def _stats_text(entropy: float | None, peak: float | None) -> str:
    return " · ".join(
        [*([f"H {entropy:.3f}"] if entropy is not None else []), *([f"peak {peak:.3f}"] if peak is not None else [])]
    )


def grid(cards: list[dict]) -> str:
    rows = []
    for card in cards:
        img = _open(card.get("image"))
        thumb = ImageOps.contain(img, (THUMB, THUMB)) if img is not None else _placeholder("no image")
        qid, label = str(card.get("query_id", "?")), card.get("label")
        overlay, vmax = (
            _overlay(img, card.get("attention"), card.get("box"))
            if card.get("attention") is not None
            else (_placeholder("no attention"), None)
        )
        stats = _stats_text(*_attn_numbers(card))
        tiles = [
            _tile(thumb, "query", qid, f"label {label}" if label is not None else "query"),
            _tile(
                overlay,
                "query attn",
                ("attention, box in cyan" if card.get("box") is not None else "attention"),
                stats,
                _colorbar(vmax) if vmax is not None else "",
            ),
            '<div class="sep"></div>',
        ]
        for r in card.get("results") or []:
            rimg = _open(r.get("image"))
            rel = None if r.get("relevant") is None else bool(r["relevant"])  # numpy bools too
            tiles.append(
                _tile(
                    ImageOps.contain(rimg, (THUMB, THUMB)) if rimg is not None else _placeholder("no image"),
                    "ok" if rel is True else "bad" if rel is False else "",
                    str(r.get("id", "?")),
                    ("✓ " if rel is True else "✗ " if rel is False else "")
                    + (f"{r['score']:.4f}" if _isnum(r.get("score")) else "")
                    + (f" · H {r['attn_entropy']:.2f}" if _isnum(r.get("attn_entropy")) else ""),
                )
            )
        rows.append(f'<div class="q">{"".join(tiles)}</div>')
    if not rows:
        return ""
    shards = sorted({str(c.get("query_id", "?")).split("/", 1)[0] for c in cards})
    key = (
        '<p class="note key">Query, its attention map, then the top results by score. Border:'
        '<span style="background:var(--ok)"></span>relevant<span style="background:var(--bad)"></span>not '
        'relevant<span style="background:var(--none)"></span>unjudged</p>'
        '<p class="note">Heat-maps share one rule: 0 to the map\'s maximum, in multiples of the uniform level '
        "(1 / positions; cyan tick on the colour bar), so a uniform map is one flat colour. H = normalized entropy "
        "(1 = uniform), peak = largest attention weight. "
        f"{len(cards)} queries from {len(shards)} shard{'s' if len(shards) != 1 else ''}: {_e(', '.join(shards[:8]))}"
        f"{' …' if len(shards) > 8 else ''}.</p>"
    )
    return key + "".join(rows)
