"""The HTML report: self-contained (no external references), every image decodes, sections follow the inputs; and a
real headless Chromium render when one is installed."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from attnpipe.evaluate.report import write_report

KS = (1, 5, 10, 100)
SECTIONS = ("Summary", "Recall@k curves", "ANN trade-off", "LSH", "Attention", "Heads comparison", "Query grid")
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
DATA_PNG = re.compile(r'<img\b[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')
ATTR = re.compile(r'\b(?:src|href|srcset|action|poster|data|xlink:href)\s*=\s*"([^"]*)"', re.IGNORECASE)


def _ranking(rng: np.random.Generator) -> dict:
    d = {}
    for k in KS:
        for name in ("precision", "recall", "hit_rate", "map", "ndcg"):
            d[f"{name}@{k}"] = float(rng.uniform(0.2, 1.0))
    d.update(
        {
            "map": float(rng.random()),
            "map@r": float(rng.random()),
            "r_precision": float(rng.random()),
            "mrr": float(rng.random()),
        }
    )
    return d


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _inputs(seed: int = 0) -> tuple[dict, dict, list[dict]]:
    rng = np.random.default_rng(seed)
    faiss = _ranking(rng) | {f"recall_vs_exact@{k}": float(rng.uniform(0.8, 1)) for k in KS}
    faiss |= {"qps": 12345.6, "latency_ms_p50": 0.42, "latency_ms_p99": 1.7, "nprobe": 8}
    lsh = _ranking(rng) | {"candidate_recall@10": 0.91, "mean_candidates": 417.5}
    labels = ["cat", "dog", "car"]

    def head() -> dict:
        per = {lab: {"count": 10} | {s: float(rng.random()) for s in STATS} for lab in labels}
        return {"count": 30, "overall": {s: float(rng.random()) for s in STATS}, "per_label": per}

    metrics = {
        "meta": {
            "embeddings": "/data/emb",
            "index": "/data/index",
            "version": "v2",
            "queries": 1000,
            "gallery": 10000,
            "model": "resnet18",
            "pooling": "attn",
            "weights": "none",
            "factory": "IVF64,Flat",
            "nprobe": 8,
            "leave_one_out": True,
        },
        "exact": _ranking(rng),
        "faiss": faiss,
        "lsh": lsh,
        "attention": {"heads": {"attn": head(), "mha": head()}},
        "heads": {"attn": _ranking(rng), "avg": _ranking(rng)},
    }
    sweep = [
        {"nprobe": p, "recall_vs_exact@10": 0.6 + 0.06 * i, "qps": 40000 / (i + 1)}
        for i, p in enumerate((1, 2, 4, 8, 16, 32))
    ]
    extras = {"sweep": sweep, "entropy": {"attn": rng.beta(5, 2, 300), "mha": rng.beta(2, 3, 300)}}
    cards = []
    for i in range(4):
        results = [
            {
                "id": f"shard-0/{i}-{j}",
                "score": float(0.9 - 0.1 * j),
                "relevant": [True, False, None][j % 3],
                "image": _jpeg(rng, 40 + 8 * j, 32) if j != 2 else None,
            }
            for j in range(5)
        ]
        cards.append(
            {
                "query_id": f"shard-0/q{i}",
                "label": labels[i % 3] if i else None,
                "image": _jpeg(rng, 64, 48) if i != 3 else None,
                "attention": rng.random((7, 7)).astype(np.float32),
                "box": [0.2, 0.25, 0.7, 0.8] if i < 2 else None,
                "results": results,
            }
        )
    return metrics, extras, cards


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "url(" not in text and "@import" not in text
    for value in ATTR.findall(text):
        assert value.startswith(("data:", "#")), f"external reference {value[:60]!r}"
    assert 'src="/' not in text and "file:" not in text


def _decoded_images(text: str) -> list[Image.Image]:
    out = []
    for b64 in DATA_PNG.findall(text):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        out.append(img)
    return out


def test_full_report(tmp_path):
    metrics, extras, cards = _inputs()
    path = str(tmp_path / "sub" / "report.html")
    assert write_report(path, metrics, extras, cards, title="my eval") == path
    text = _read(path)
    _check_self_contained(text)
    imgs = _decoded_images(text)
    # 3 figures + per card: query, overlay, 5 results
    assert len(imgs) == text.count("<img") == 3 + 4 * 7
    assert all(im.format == "PNG" and im.width > 0 for im in imgs)
    for heading in SECTIONS:
        assert f">{heading}<" in text
    for name in (
        "precision@1",
        "recall@100",
        "ndcg@10",
        "map@r",
        "mrr",
        "r_precision",
        "recall_vs_exact@10",
        "latency_ms_p99",
        "candidate_recall@10",
        "mean_candidates",
        "pointing_game",
        "box_mass",
        "my eval",
        "IVF64,Flat",
        "shard-0/q1",
        "shard-0/2-4",
    ):
        assert name in text, name
    assert f"{metrics['exact']['map@r']:.4f}" in text  # numbers at 4 decimals
    assert "Random weights" in text and text.count('class="cbar"') == 4
    assert "12,345.6" in text and "10,000" in text
    positions = [text.index(f">{h}<") for h in SECTIONS]
    assert positions == sorted(positions)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "report.html"]  # temp file replaced


def test_overlay_is_a_heat_map_of_the_image(tmp_path):
    """The attention tile keeps the query thumbnail's size and differs from it (the heat-map is blended in)."""
    cards = _inputs()[2]
    imgs = _decoded_images(_read(write_report(str(tmp_path / "r.html"), {}, {}, cards[:1])))
    query, overlay = imgs[0], imgs[1]
    assert query.size == overlay.size == (128, 96)  # 64x48 scaled to fit 128 px
    diff = np.abs(np.asarray(query, np.int16) - np.asarray(overlay, np.int16))
    assert diff.mean() > 10


@pytest.mark.parametrize(
    "drop",
    [
        ("lsh",),
        ("faiss", "sweep"),
        ("sweep",),
        ("faiss", "lsh", "heads"),
        ("attention", "meta", "entropy"),
        ("exact", "faiss", "lsh", "heads", "attention", "meta"),
    ],
)
def test_missing_sections(tmp_path, drop):
    metrics, extras, cards = _inputs(1)
    for key in drop:
        metrics.pop(key, None)
        extras.pop(key, None)
    text = _read(write_report(str(tmp_path / "r.html"), metrics, extras, cards))
    _check_self_contained(text)
    assert ">Query grid<" in text
    if "lsh" in drop:
        assert ">LSH<" not in text and "candidate_recall@10" not in text
    if "faiss" in drop and "sweep" in drop:
        assert ">ANN trade-off<" not in text and "recall_vs_exact" not in text
    elif "faiss" in drop:  # the sweep alone still plots, with no tuned point to highlight
        assert "<h3>Sweep</h3>" in text and "faiss at the tuned parameter" not in text
    if "exact" in drop:
        assert ">Summary<" not in text and ">Recall@k curves<" not in text
    if drop == ("sweep",):  # a Flat index has no sweep: the tuned-point table stays, the plot goes
        assert ">ANN trade-off<" in text and "latency_ms_p50" in text and "<h3>Sweep</h3>" not in text
    if "attention" in drop and "entropy" in drop:
        assert ">Attention<" not in text


def test_tolerates_odd_inputs(tmp_path):
    """Missing keys, NaN, unreadable image bytes, a bad attention array, an efSearch sweep, a pixel box."""
    metrics = {
        "exact": {"precision@1": float("nan"), "mrr": 0.5},
        "faiss": {"qps": 10.0, "efSearch": 64},
        "attention": {"heads": {"attn": {"overall": {"entropy": 0.5}}}},
    }
    extras = {
        "sweep": [
            {"efSearch": 16, "recall_vs_exact@10": 0.7, "qps": 900.0},
            {"efSearch": 64, "recall_vs_exact@10": 0.95, "qps": 300.0},
        ],
        "entropy": {"attn": np.array([0.1, np.nan, 0.5]), "empty": np.array([])},
    }
    cards = [
        {"query_id": "q", "image": b"not an image", "attention": np.zeros(3), "results": []},
        {
            "query_id": "p",
            "image": _jpeg(np.random.default_rng(0), 50, 50),
            "attention": np.ones((4, 4)),
            "box": [5, 5, 40, 40],
            "results": [{"id": "x", "score": None, "relevant": None, "image": b""}],
        },
        {},
    ]
    text = _read(write_report(str(tmp_path / "r.html"), metrics, extras, cards))
    _check_self_contained(text)
    assert "efSearch" in text and "—" in text and len(_decoded_images(text)) >= 8


def test_empty_inputs(tmp_path):
    text = _read(write_report(str(tmp_path / "r.html"), {}, {}, []))
    assert "<h1>attnpipe evaluation</h1>" in text and "<section" not in text


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
def test_renders_in_headless_browser(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (make test installs it when it can)")
    version = subprocess.run([browser, "--version"], capture_output=True, text=True, timeout=30, check=False)
    if version.returncode != 0:  # e.g. Ubuntu's snap stub without snapd: an environment problem, not a report one
        pytest.skip(f"{browser} does not start: {version.stderr.strip()[-200:]}")
    metrics, extras, cards = _inputs()
    report = write_report(str(tmp_path / "report.html"), metrics, extras, cards)
    n_img = _read(report).count("<img")

    def run(*extra: str, profile: str) -> subprocess.CompletedProcess:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / profile}",
        ]
        return subprocess.run(
            [browser, *flags, *extra, f"file://{report}"], capture_output=True, text=True, timeout=60, check=False
        )

    shot = tmp_path / "shot.png"
    proc = run(f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars", profile="p1")
    assert shot.exists(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.width == 1280
    px = np.asarray(img, np.float32)
    assert px.std() > 20
    assert len(np.unique(np.asarray(img.resize((320, 1000)).quantize(64)))) >= 8  # many distinct colours

    proc = run("--dump-dom", "--virtual-time-budget=5000", profile="p2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', proc.stdout)
    total = re.search(r'data-images-total="(\d+)"', proc.stdout)
    assert loaded and total, proc.stdout[:500]
    assert int(total.group(1)) == n_img > 5
    assert int(loaded.group(1)) == n_img


def _overlay_pixels(tmp_path, attention, name: str) -> np.ndarray:
    """The attention tile of one card on a flat grey image, as an array."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="PNG")
    card = {"query_id": "s/q", "image": buf.getvalue(), "attention": attention, "results": []}
    return np.asarray(_decoded_images(_read(write_report(str(tmp_path / name), {}, {}, [card])))[1], np.float32)


def test_uniform_attention_looks_uniform_and_a_peak_does_not(tmp_path):
    """Fixed 0..max scale in uniform levels: a uniform map and a 1% ripple are flat; a real peak has contrast (a
    min-max stretch turned the ripple into a hot spot)."""
    rng = np.random.default_rng(0)
    uniform = np.full((7, 7), 1 / 49, np.float32)
    ripple = uniform * (1 + 0.01 * rng.standard_normal((7, 7)).astype(np.float32))
    peaked = uniform.copy()
    peaked[3, 3] = 0.5
    flat, rippled, hot = (_overlay_pixels(tmp_path, a, f"{i}.html") for i, a in enumerate((uniform, ripple, peaked)))
    assert flat.std(axis=(0, 1)).max() < 1.0
    assert rippled.std(axis=(0, 1)).max() < 6.0 and np.abs(rippled - flat).mean() < 8.0
    assert (
        np.ptp(hot, axis=(0, 1)).max() > 100 and np.ptp(flat, axis=(0, 1)).max() < 5
    )  # the peak cell is bright (50% blend), the rest dark
    # a uniform map sits at the top of its scale (vmax = 1 uniform level): bright, not black
    assert flat.mean() > 150


def test_cards_show_entropy_peak_and_a_colour_bar(tmp_path):
    metrics, extras, cards = _inputs()
    cards[0] |= {"attn_entropy": 0.8123, "attn_peak": 0.0456}  # the runner's fields win over recomputation
    cards[1]["attention"] = np.full((4, 4), 1 / 16, np.float32)
    cards[1]["results"][0]["attn_entropy"] = 0.5
    text = _read(write_report(str(tmp_path / "r.html"), metrics, extras, cards))
    _check_self_contained(text)
    assert "H 0.812 · peak 0.046" in text
    assert "H 1.000 · peak 0.062" in text  # computed from the map: uniform over 16 positions
    assert text.count('class="cbar"') == 4 and "1× unif." in text  # uniform card: its scale tops at 1
    assert "· H 0.50" in text
    assert "4 queries from 1 shard: shard-0" in text


@pytest.mark.parametrize(
    "meta, random",
    [
        ({"model": "resnet18", "pooling": "attn", "weights": "none"}, True),
        ({"model": "resnet18", "weights_fingerprint": "random:resnet18:seed=0"}, True),
        ({"model": "resnet18", "weights": "default", "weights_fingerprint": "torchvision:IMAGENET1K_V1"}, False),
        ({"model": "resnet18", "embeddings": "/nonexistent/emb"}, False),  # weights unknown: no claim either way
    ],
)
def test_header_names_the_weights_and_warns_when_random(tmp_path, meta, random):
    text = _read(write_report(str(tmp_path / "r.html"), {"meta": meta}, {}, []))
    header = text[text.index("<header>") : text.index("</header>")]
    assert "resnet18" in header
    assert ("Random weights" in header) is random and ("none (random init)" in header) is random
    if meta.get("weights") == "default":
        assert "<b>weights</b>default" in header


def test_best_marking_tolerates_float_noise(tmp_path):
    metrics = {
        "exact": {"precision@1": 0.5, "map@r": 0.3},
        "faiss": {"precision@1": 0.5 + 1e-12, "map@r": 0.2999},
        "lsh": {"precision@1": 0.49, "map@r": 0.1},
    }
    text = _read(write_report(str(tmp_path / "r.html"), metrics, {}, []))
    row = re.search(r"<tr><th>precision@1</th>(.*?)</tr>", text).group(1)
    assert row.count('class="num best"') == 2  # exact and faiss tie; lsh does not
    row = re.search(r"<tr><th>map@r</th>(.*?)</tr>", text).group(1)
    assert row.count('class="num best"') == 1
