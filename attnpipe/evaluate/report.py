"""The evaluation report: ``metrics.json`` + plots + query cards -> one self-contained ``report.html``.

Nothing in the page points outside it: CSS is inline and every picture is a ``data:image/png;base64`` URI, so the
file can be mailed, archived or opened offline. Sections (each rendered only when its inputs exist): Summary,
Recall@k curves, ANN trade-off, LSH, Attention, Heads comparison, Query grid. A tiny inline script records on load
how many images decoded (``data-images-loaded`` / ``data-images-total`` on ``<body>``) for the browser test.

Honesty rules: the header names the model and its weights and warns when they are random (``model.weights=none``);
attention heat-maps are drawn on a fixed scale from 0 to the card's maximum in multiples of the uniform level, with a
colour bar marking that level, so a uniform map looks uniform instead of being stretched into a hot spot; every card
prints its normalized entropy and peak; "best" marks every value within a relative tolerance of the top one.

Example::

    write_report("out/eval/report.html", metrics, {"sweep": sweep, "entropy": {"attn": ent}}, cards)
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import secrets
import sys
from datetime import UTC, datetime
from typing import Any

import matplotlib
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from attnpipe.evaluate._html import e as _e
from attnpipe.evaluate._html import isnum as _isnum
from attnpipe.evaluate.report_grid import grid as _grid

SYSTEMS = ("exact", "faiss", "lsh")
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9"]  # Okabe-Ito: colour-blind safe
COLORS = dict(zip(SYSTEMS, PALETTE))
FAMILIES = ("precision", "recall", "hit_rate", "map", "ndcg")  # @k metrics, in table order
SCALARS = ("map", "map@r", "r_precision", "mrr")
ANN_ONLY = ("recall_vs_exact@", "qps", "latency_", "nprobe", "efSearch", "candidate_recall@", "mean_candidates")
STATS = (
    "entropy",
    "peak",
    "top10_mass",
    "effective_area",
    "center_x",
    "center_y",
    "spread",
    "box_mass",
    "pointing_game",
)
BEST_RTOL = 1e-6  # values this close to the best one are bold too (float noise is not a win)
RC: dict[Any, Any] = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titleweight": "bold",
    "axes.titlesize": 10,
    "legend.frameon": False,
}

CSS = """
:root{--fg:#1d2433;--muted:#5d6878;--bg:#f5f6f8;--line:#e2e5ea;--accent:#0072B2;--ok:#1a9e5a;--bad:#d64545;
--none:#a3aab4;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#1c2638;color:#fff;padding:26px 40px 20px} header .ts{color:#aeb9cc;font-size:13px}
header h1{margin:0;font-size:26px;font-weight:650;letter-spacing:-.01em}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin-top:14px} .fact b{color:#9cc8f5;font-weight:600;margin-right:6px}
.fact{background:rgba(255,255,255,.07);border:1px solid rgba(255,255,255,.16);border-radius:6px;padding:3px 10px;
font-size:13px;max-width:100%;overflow-wrap:anywhere}
nav{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid var(--line);padding:8px 40px}
nav a{color:var(--accent);text-decoration:none;margin-right:18px;font-size:14px}
main{max-width:1240px;margin:0 auto;padding:4px 40px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 24px 20px;margin:20px 0}
h2{margin:0 0 10px;font-size:20px} h2 a{color:var(--line);text-decoration:none;margin-left:6px}
h2:hover a{color:var(--accent)} h3{font-size:14px;margin:12px 0 6px;color:var(--muted);font-weight:600}
table{border-collapse:collapse;font-size:13.5px;margin:4px 0}
th,td{padding:4px 12px;border-bottom:1px solid var(--line);text-align:left}
thead th{background:#eff1f4;font-weight:600} tbody th{font-weight:500} tbody tr:hover{background:#f8f9fb}
.num{text-align:right} td.num{font-variant-numeric:tabular-nums;font-family:var(--mono)}
td.best{font-weight:700;color:var(--accent)} img.fig{max-width:100%;height:auto}
.row{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start} .note{color:var(--muted);font-size:13px}
details{margin:6px 0} summary{cursor:pointer;color:var(--muted);font-size:14px}
.scroll{max-height:420px;overflow:auto;display:inline-block}
.q{display:flex;flex-wrap:wrap;gap:10px;padding:12px 0;border-bottom:1px solid var(--line)} .q:last-child{border:0}
.tile{width:140px;font-size:12px;text-align:center} .sep{width:1px;background:var(--line);margin:0 4px}
.tile img{width:134px;height:134px;object-fit:contain;background:#eef0f3;border:3px solid var(--none);border-radius:6px}
.tile.query img{border-color:var(--accent)} .tile.ok img{border-color:var(--ok)} .tile.bad img{border-color:var(--bad)}
.cap{white-space:nowrap;overflow:hidden;text-overflow:ellipsis} .sub{color:var(--muted);font-family:var(--mono)}
.key span{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px}
.warn{margin-top:14px;background:#7a2e0e;border:1px solid #f0a15f;color:#ffe2cc;border-radius:6px;padding:8px 12px;
font-size:14px;max-width:900px} .warn b{color:#fff}
.cbar{position:relative;height:8px;margin:3px 3px 0;border-radius:2px}
.cbar i{position:absolute;top:-3px;bottom:-3px;width:2px;margin-left:-1px;background:#00e5ff}
.attn .sub{font-size:11px} .cbl{display:flex;justify-content:space-between;margin:0 3px;color:var(--muted);font-size:10px;font-family:var(--mono)}
"""

# Counts decoded images on load; the browser test reads these attributes from the dumped DOM.
SCRIPT = """<script>window.addEventListener("load",function(){var im=document.images,n=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}
document.body.dataset.imagesLoaded=n;document.body.dataset.imagesTotal=im.length;});</script>"""


def write_report(path: str, metrics: dict, extras: dict, cards: list[dict], title: str = "attnpipe evaluation") -> str:
    """Write the HTML report for one evaluation atomically (temp file + ``os.replace``) and return ``path``.

    Args:
        path: local file to write; its directory is created if needed.
        metrics: the content of ``metrics.json``; absent sections (``faiss``, ``lsh``, ``attention``, ``heads``) and
            absent keys are skipped, not errors.
        extras: optional ``sweep`` (list of ``{nprobe|efSearch, recall_vs_exact@10, qps}``) and ``entropy``
            (``{head: per-image normalized entropies}``).
        cards: query cards (``query_id, label, image, attention, box, results``); unreadable or missing images
            become placeholders.
    """
    metrics, extras = metrics or {}, extras or {}
    sections = [
        ("summary", "Summary", _summary(metrics)),
        ("curves", "Recall@k curves", _curves(metrics)),
        ("ann", "ANN trade-off", _ann(metrics.get("faiss"), extras.get("sweep"))),
        ("lsh", "LSH", _lsh(metrics.get("lsh"))),
        ("attention", "Attention", _attention(metrics.get("attention"), extras.get("entropy"))),
        ("heads", "Heads comparison", _heads(metrics.get("heads"))),
        ("queries", "Query grid", _grid(cards or [])),
    ]
    sections = [s for s in sections if s[2]]
    meta = {
        k: _fmt(v) if _isnum(v) else v if isinstance(v, str) else json.dumps(v, default=str)
        for k, v in (metrics.get("meta") or {}).items()
        if v is not None
    }
    model, warning = _model_facts(metrics.get("meta") or {})
    meta = {**model, **{k: v for k, v in meta.items() if k not in model}}
    facts = "".join(f'<span class="fact"><b>{_e(k)}</b>{_e(v)}</span>' for k, v in meta.items())
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}<a href="#{a}">#</a></h2>{h}</section>' for a, t, h in sections)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{CSS}</style></head>'
        f'<body><header><h1>{_e(title)}</h1><div class="ts">generated {stamp}</div>'
        f'<div class="facts">{facts}</div>{warning}</header><nav>{nav}</nav><main>{body}</main>{SCRIPT}</body></html>'
    )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": mode 0o666 & ~umask, unlike mkstemp's 0o600
            f.write(page)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _model_facts(meta: dict) -> tuple[dict[str, str], str]:
    """Header facts for the model and its weights, and a warning banner when the weights are random.

    Reads ``meta`` (``model``, ``pooling``, ``weights``, ``weights_fingerprint``); when the weights are not there it
    looks them up in the manifest of ``meta["embeddings"]`` (best effort: a missing dataset just leaves them out).
    """
    weights, fingerprint = meta.get("weights"), meta.get("weights_fingerprint")
    if weights is None and fingerprint is None and isinstance(meta.get("embeddings"), str):
        from attnpipe import store

        try:
            model = store.open_dataset(meta["embeddings"]).manifest.get("model") or {}
        except (OSError, ValueError, KeyError, RuntimeError):  # gone, not a dataset, damaged: no weights fact
            model = {}
        weights, fingerprint = model.get("weights"), model.get("weights_fingerprint")
    facts = {k: str(meta[k]) for k in ("model", "pooling") if meta.get(k) is not None}
    if weights is not None or fingerprint is not None:
        facts["weights"] = str(weights if weights is not None else fingerprint)
    random = weights == "none" or str(fingerprint or "").startswith("random:")
    if not random:
        return facts, ""
    facts["weights"] = "none (random init)"
    banner = (
        '<div class="warn" role="alert"><b>⚠ Random weights</b> (<code>model.weights=none</code>'
        f"{', ' + _e(fingerprint) if fingerprint else ''}): the backbone was never trained, so these numbers measure "
        "the pipeline, not a model. Encode with <code>--set model.weights=default</code> (torchvision's pretrained "
        "weights) or a trained head for meaningful retrieval quality and attention maps.</div>"
    )
    return facts, banner


def _fmt(v) -> str:
    if not _isnum(v):
        return "—"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"


def _ks(d: dict, family: str) -> list[int]:
    """The k of every ``family@k`` key with a number (``map@r`` and the like are not k's)."""
    pre = family + "@"
    return sorted(
        int(k[len(pre) :]) for k, v in d.items() if k.startswith(pre) and k[len(pre) :].isdigit() and _isnum(v)
    )


def _order(dicts: list[dict]) -> list[str]:
    """Metric names present in any of ``dicts``: @k families by k, then scalars, then anything else by name."""
    keys = {k for d in dicts for k in d if not k.startswith(ANN_ONLY)}
    out = [f"{f}@{k}" for f in FAMILIES for k in sorted({k for d in dicts for k in _ks(d, f)})]
    out += [k for k in SCALARS if k in keys]
    return out + sorted(keys - set(out))


def _table(head: list[str], rows: list[list], best: bool = False) -> str:
    """Rows are ``[name, value, ...]``; numbers right-aligned; with ``best`` the top value of each row is bold, and
    so is every value within :data:`BEST_RTOL` of it (ties computed two ways differ in the last bits)."""
    th = "".join(f"<th{' class=num' if i else ''}>{_e(h)}</th>" for i, h in enumerate(head))
    body = []
    for name, *vals in rows:
        nums = [v for v in vals if _isnum(v)]
        top = max(nums) if best and len(nums) > 1 else None
        tds = "".join(f'<td class="num{" best" if _is_best(v, top) else ""}">{_fmt(v)}</td>' for v in vals)
        body.append(f"<tr><th>{_e(name)}</th>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _is_best(v, top) -> bool:
    return top is not None and _isnum(v) and math.isclose(v, top, rel_tol=BEST_RTOL, abs_tol=1e-12)


def _pyplot():
    if "matplotlib.pyplot" not in sys.modules:  # never switch the backend under a process that already plots
        matplotlib.use("Agg")  # headless; must precede the first pyplot import
    import matplotlib.pyplot as plt

    return plt


def _fig(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})  # no URL in metadata
    _pyplot().close(fig)
    return f'<img class="fig" alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _systems(metrics: dict) -> list[tuple[str, dict]]:
    return [(s, metrics[s]) for s in SYSTEMS if isinstance(metrics.get(s), dict) and metrics[s]]


def _summary(metrics: dict) -> str:
    systems = _systems(metrics)
    if not systems:
        return ""
    rows = [[k, *(d.get(k) for _, d in systems)] for k in _order([d for _, d in systems])]
    return _table(["metric", *(s for s, _ in systems)], rows, best=True) + (
        '<p class="note">Best value per row in bold. faiss at the tuned search parameter; lsh = SimHash candidates '
        "re-ranked exactly.</p>"
    )


def _curves(metrics: dict) -> str:
    systems = _systems(metrics)
    fams = [f for f in ("recall", "precision") if any(_ks(d, f) for _, d in systems)]
    if not fams:
        return ""
    with matplotlib.rc_context(RC):
        fig, axes = _pyplot().subplots(1, len(fams), figsize=(4.8 * len(fams), 3.3), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            allks = sorted({k for _, d in systems for k in _ks(d, fam)})
            for name, d in systems:
                if ks := _ks(d, fam):
                    ax.plot(ks, [d[f"{fam}@{k}"] for k in ks], marker="o", color=COLORS[name], label=name, lw=2)
            ax.set_xscale("log")
            ax.set_xticks(allks, labels=[str(k) for k in allks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set(xlabel="k", ylabel=f"{fam}@k", ylim=(0, 1.02), title=f"{fam}@k")
            ax.legend()
        return _fig(fig)


def _ann(faiss: dict | None, sweep: list | None) -> str:
    parts = []
    pts = [p for p in sweep or [] if isinstance(p, dict)]
    param = next((k for k in ("nprobe", "efSearch") if any(k in p for p in pts)), None)
    rkey = next((k for p in pts for k in p if k.startswith("recall_vs_exact@")), None)
    pts = sorted(
        (p for p in pts if _isnum(p.get(rkey)) and _isnum(p.get("qps")) and p["qps"] > 0 and param in p),
        key=lambda p: p[param],
    )
    if pts:
        tuned = (faiss or {}).get(param)
        x, y = [p[rkey] for p in pts], [p["qps"] for p in pts]
        with matplotlib.rc_context(RC):
            fig, ax = _pyplot().subplots(figsize=(6.2, 3.6))
            ax.plot(x, y, "-o", color=PALETTE[0], lw=2, ms=5)
            for p in pts:
                ax.annotate(str(p[param]), (p[rkey], p["qps"]), xytext=(5, 5), textcoords="offset points", fontsize=8)
                if tuned is not None and p[param] == tuned:
                    ax.scatter(
                        [p[rkey]],
                        [p["qps"]],
                        s=170,
                        facecolors="none",
                        edgecolors=PALETTE[3],
                        lw=2,
                        zorder=3,
                        label=f"tuned {param}={tuned}",
                    )
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            comma = FuncFormatter(lambda v, _: f"{v:,.0f}")
            ax.yaxis.set_major_formatter(comma)  # label minor ticks too when QPS spans less than a decade
            ax.yaxis.set_minor_formatter(comma if max(y) < 10 * min(y) else NullFormatter())
            ax.set(xlabel=rkey, ylabel="queries / s (log)", title=f"recall vs QPS, annotated with {param}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
            parts.append(_fig(fig))
        rows = [[p[param], p[rkey], p["qps"]] for p in pts]
        parts.append("<h3>Sweep</h3>" + _table([str(param), str(rkey), "qps"], rows))
    if faiss:
        keys = [f"recall_vs_exact@{k}" for k in _ks(faiss, "recall_vs_exact")]
        keys += [k for k in ("qps", "latency_ms_p50", "latency_ms_p99", "nprobe", "efSearch") if k in faiss]
        if keys:
            rows = [[k, faiss[k]] for k in keys]
            parts.append("<h3>faiss at the tuned parameter</h3>" + _table(["metric", "value"], rows))
    fig = parts.pop(0) if parts and parts[0].startswith("<img") else ""
    return f'<div class="row">{fig}<div>{"".join(parts)}</div></div>' if fig or parts else ""


def _lsh(lsh: dict | None) -> str:
    lsh = lsh or {}
    keys = [k for k in lsh if k.startswith(("candidate_recall@", "mean_candidates"))]
    if not keys:
        return ""
    return _table(["lsh", "value"], [[k, lsh[k]] for k in sorted(keys)]) + (
        '<p class="note">candidate_recall@k: share of the exact top-k found among the LSH candidates; '
        "mean_candidates: candidates re-ranked per query.</p>"
    )


def _attention(att: dict | None, entropy: dict | None) -> str:
    heads = {h: v for h, v in ((att or {}).get("heads") or {}).items() if isinstance(v, dict)}
    parts = []
    ent = {h: np.asarray(v, np.float64).ravel() for h, v in (entropy or {}).items() if v is not None}
    ent = {h: np.clip(v[np.isfinite(v)], 0, 1) for h, v in ent.items()}
    if any(len(v) for v in ent.values()):
        with matplotlib.rc_context(RC):
            fig, ax = _pyplot().subplots(figsize=(6.2, 3.2))
            bins = np.linspace(0, 1, 41)
            for i, (h, v) in enumerate((h, v) for h, v in ent.items() if len(v)):
                c = PALETTE[i % len(PALETTE)]
                ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.18, color=c)
                label = f"{h} (n={len(v)}, median {np.median(v):.3f})"
                ax.hist(v, bins=bins, histtype="step", lw=2, color=c, label=label)
            ax.set(
                xlabel="normalized attention entropy (0 = one position, 1 = uniform)",
                ylabel="images",
                xlim=(0, 1),
                title="attention entropy per head",
            )
            ax.legend()
            parts.append(_fig(fig))
    if heads:
        overall = {h: info.get("overall") or {} for h, info in heads.items()}
        stats = [s for s in STATS if any(s in o for o in overall.values())]
        stats += sorted({s for o in overall.values() for s in o} - set(stats))
        rows = [[h, info.get("count"), *(overall[h].get(s) for s in stats)] for h, info in heads.items()]
        parts.append("<h3>Overall, per head</h3>" + _table(["head", "count", *stats], rows))
        for h, info in heads.items():
            per = info.get("per_label") or {}
            if per:
                rows = [[lab, per[lab].get("count"), *(per[lab].get(s) for s in stats)] for lab in sorted(per, key=str)]
                parts.append(
                    f"<details><summary>{_e(h)}: per label ({len(per)} labels)</summary>"
                    f'<div class="scroll">{_table(["label", "count", *stats], rows)}</div></details>'
                )
    return "".join(parts)


def _heads(heads: dict | None) -> str:
    heads = {h: d for h, d in (heads or {}).items() if isinstance(d, dict) and d}
    if not heads:
        return ""
    rows = [[k, *(d.get(k) for d in heads.values())] for k in _order(list(heads.values()))]
    return _table(["metric", *heads], rows, best=True) + '<p class="note">Exact search, same queries.</p>'
