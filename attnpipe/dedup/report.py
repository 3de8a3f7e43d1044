"""``report.html`` of a dedup run: one self-contained page (inline thumbnails, no external references).

It shows the summary numbers, the largest groups (kept member first, each with its similarity to it), and the
borderline pairs (the least similar pairs still over the threshold, where a wrong threshold shows first), each as
thumbnails side by side. Ids whose source image is not readable get a labelled placeholder.

Example::

    write_report("out/report.html", summary, groups=[[("a", True, 1.0), ("b", False, 0.93)]],
                 pairs=[("a", "b", 0.93, "semantic")], images={"a": b"...jpeg..."})
"""

from __future__ import annotations

import base64
import html
import io
import json

from PIL import Image, UnidentifiedImageError

THUMB = 128
_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 8px}h2{margin-top:28px;border-bottom:1px solid #ccc}
.row{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 18px;padding:8px;background:#fff;border:1px solid #ddd}
figure{margin:0;width:136px;font-size:11px;word-break:break-all}
figure img,.ph{width:128px;height:128px;object-fit:contain;background:#eee;border:3px solid transparent}
figure.keep img,figure.keep .ph{border-color:#2a9d3a}
.ph{display:flex;align-items:center;justify-content:center;color:#888}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}
"""
_SCRIPT = """
window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.imagesTotal=imgs.length;
document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});
"""


def thumbnail(data: bytes | None) -> str | None:
    """A ``data:`` URI of a JPEG thumbnail, or None when the bytes are missing or not an image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            rgb.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(id_: str, caption: str, images: dict[str, bytes], keep: bool = False) -> str:
    uri = thumbnail(images.get(id_))
    pic = f'<img src="{uri}" alt="{html.escape(id_)}">' if uri else '<div class="ph">no image</div>'
    cls = ' class="keep"' if keep else ""
    return f"<figure{cls}>{pic}<figcaption>{html.escape(id_)}<br>{html.escape(caption)}</figcaption></figure>"


def write_report(
    path: str,
    summary: dict,
    groups: list[list[tuple[str, bool, float]]],
    pairs: list[tuple[str, str, float, str]],
    images: dict[str, bytes],
    leakage: list[tuple[str, str, str, float]] | None = None,
) -> str:
    """Write the page to the local ``path``; ``groups`` members are ``(id, kept, similarity_to_kept)``."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>attnpipe dedup</title>"]
    out.append(f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>")
    out.append("<h1>attnpipe dedup</h1><section><h2>Summary</h2><table>")
    for key in ("embeddings", "method", "vectors", "pairs", "groups", "duplicates_removable", "leakage_pairs"):
        if key in summary:
            out.append(f"<tr><th>{key}</th><td>{html.escape(json.dumps(summary[key]))}</td></tr>")
    th = summary.get("threshold", {})
    out.append(f"<tr><th>threshold</th><td>{html.escape(json.dumps(th))}</td></tr></table></section>")
    out.append(f"<section><h2>Largest groups ({len(groups)} shown)</h2>")
    for n, members in enumerate(groups):
        figs = "".join(_figure(i, "kept" if k else f"sim {s:.3f}", images, k) for i, k, s in members)
        out.append(f"<h3>group {n}: {len(members)} images</h3><div class='row'>{figs}</div>")
    out.append(f"</section><section><h2>Borderline pairs ({len(pairs)} least similar over the threshold)</h2>")
    for a, b, s, method in pairs:
        figs = _figure(a, "", images) + _figure(b, f"{method} {s:.3f}", images)
        out.append(f"<div class='row'>{figs}</div>")
    out.append("</section>")
    if leakage:
        out.append(f"<section><h2>Leakage ({len(leakage)} most similar cross-dataset pairs)</h2>")
        for a, dataset_b, b, s in leakage:
            figs = _figure(a, "", images) + _figure(b, f"{dataset_b} {s:.3f}", images)
            out.append(f"<div class='row'>{figs}</div>")
        out.append("</section>")
    out.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    return path
