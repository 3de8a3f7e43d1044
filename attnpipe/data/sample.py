"""Synthetic labeled image shards for demos and tests, in every shard format attnpipe reads.

Each image is a textured background (seeded low-frequency noise, a soft gradient and pixel noise) with ONE
coloured shape of its class at a random position and scale; its box travels with it so attention statistics can
measure whether attention lands on the object. Output is byte-identical for a given seed. ``make_broken_shard``
writes deliberately bad members (truncated, empty, noise, text, a decompression bomb) to exercise reader
error handling.

Example::

    paths = make_sample("/tmp/sample", fmt="parquet", n=200, num_shards=2, broken=True)
    # ['/tmp/sample/shard-00000.parquet', '/tmp/sample/shard-00001.parquet', '/tmp/sample/shard-broken.parquet']
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, UnidentifiedImageError

FORMATS = ("folder", "tar", "parquet")

# name -> nominal RGB; the shape is the name's suffix. Order is fixed: ``classes=k`` takes the first k.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "red_circle": (220, 40, 40),
    "green_square": (40, 180, 60),
    "blue_triangle": (40, 80, 220),
    "yellow_cross": (240, 220, 40),
    "magenta_diamond": (220, 50, 200),
    "cyan_hexagon": (40, 210, 220),
    "orange_star": (250, 140, 20),
    "white_pentagon": (245, 245, 245),
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASS_COLORS)

BROKEN_KINDS = ("ok", "truncated", "empty", "noise", "text", "bomb")
_BOMB_SIDE = 30_000
_JPEG_QUALITY = 90
_PARQUET_SCHEMA = pa.schema({"key": pa.string(), "image": pa.binary(), "label": pa.string(), "json": pa.string()})

# (key, extension, payload, label, box); label and box are None for broken members.
_Record = tuple[str, str, bytes, str | None, list[float] | None]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    angles = np.pi / points * np.arange(2 * points) - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


# Polygons in arbitrary units; _render stretches their bounding box onto the object box so boxes are tight.
_POLYGONS = {
    "circle": _star(32, 1.0)[::2],  # a 32-gon is a circle at these sizes
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0, 1), (0.5, 0), (1, 1)],
    "cross": [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1), (1, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": [(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)],
    "star": _star(5, 0.6),  # a fat star: fills half its box, like the triangle
    "pentagon": _star(5, 1.0)[::2],
}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Muted (greyish, 20..200) so every class colour stands out; texture so the image is not trivially uniform.
    grid = (max(2, size // 12), max(2, size // 12))
    coarse = 128.0 + rng.normal(0.0, 25.0, (*grid, 1)) + rng.normal(0.0, 8.0, (*grid, 3))  # mostly luminance
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    blobs = np.asarray(smooth, dtype=np.float32) - 128.0
    ramp = np.linspace(-30.0, 30.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None]
    base = rng.uniform(80, 130) + rng.uniform(-10, 10, 3)
    img = base + gradient + blobs + rng.normal(0.0, 8.0, (size, size, 3))  # (H, W, 3)
    return np.clip(img, 20, 200).astype(np.uint8)


def _render(rng: np.random.Generator, label: str, size: int, key: str) -> _Record:
    img = Image.fromarray(_background(rng, size))
    side = round(rng.uniform(0.25, 0.5) * size)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    color = tuple(int(c) for c in np.clip(np.array(CLASS_COLORS[label]) + rng.integers(-20, 21, 3), 0, 255))
    pts = np.array(_POLYGONS[label.split("_", 1)[1]], dtype=np.float64)
    pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0)) * (side - 1) + [x0, y0]  # onto inclusive pixel corners
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    box = [v / size for v in (x0, y0, x0 + side, y0 + side)]
    return key, "jpg", buf.getvalue(), label, box


def _png_bomb() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    # 1-bit greyscale. All 30000 rows would compress to ~109 kB even at level 9, so the IDAT holds only the
    # first 64 rows: the header is what a reader must reject on, before any decode.
    ihdr = struct.pack(">IIBBBBB", _BOMB_SIDE, _BOMB_SIDE, 1, 0, 0, 0, 0)
    rows = (b"\x00" * (1 + _BOMB_SIDE // 8)) * 64
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def _noise(rng: np.random.Generator) -> bytes:
    while True:  # redraw in the rare case the bytes pass a format check (TGA has no magic number)
        data = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
        try:
            Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError):
            return data


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _meta(label: str, box: list[float] | None) -> str:
    return json.dumps({"label": label, "box": box})


def _write_shard(out: str, name: str, fmt: str, records: list[_Record]) -> str:
    if fmt == "tar":
        path = os.path.join(out, name + ".tar")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, payload, label, box in records:
                members = [(ext, payload)]
                if label is not None:
                    members += [("cls", label.encode("utf-8")), ("json", _meta(label, box).encode())]
                for suffix, data in members:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime=0: byte-identical reruns
                    tar.addfile(info, io.BytesIO(data))
        _write_atomic(path, buf.getvalue())
    elif fmt == "folder":
        path = os.path.join(out, name)
        for key, ext, payload, label, box in records:
            folder = os.path.join(path, label if label is not None else "broken")
            os.makedirs(folder, exist_ok=True)
            _write_atomic(os.path.join(folder, f"{key}.{ext}"), payload)
            if label is not None:
                _write_atomic(os.path.join(folder, f"{key}.json"), _meta(label, box).encode())
    else:
        path = os.path.join(out, name + ".parquet")
        keys, _, images, labels, boxes = (list(col) for col in zip(*records))
        metas = [None if lab is None else _meta(lab, box) for lab, box in zip(labels, boxes)]
        table = pa.table({"key": keys, "image": images, "label": labels, "json": metas}, schema=_PARQUET_SCHEMA)
        pq.write_table(table, path + ".tmp", row_group_size=64)
        os.replace(path + ".tmp", path)
    return path


def make_broken_shard(out: str, fmt: str = "tar", image_size: int = 64, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Write one shard of deliberately broken members plus two good ones.

    Broken members carry no label (tar: no ``.cls``/``.json``; folder: under ``broken/``; parquet: null label).
    The bomb is a valid PNG header declaring 30000 x 30000 pixels, under 1 kB on disk.

    Returns:
        (shard path, {key: expected kind}) with kinds from ``BROKEN_KINDS``; good members are ``'ok'``.

    Raises:
        ValueError: unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # stream separate from make_sample's images
    label = CLASS_NAMES[0]
    truncated = _render(rng, label, image_size, "")[2]
    text = ("this is not an image\n" * 20).encode("utf-8")
    records: list[_Record] = [
        ("bad-truncated", "jpg", truncated[: int(len(truncated) * 0.4)], None, None),
        ("bad-empty", "jpg", b"", None, None),
        ("bad-noise", "jpg", _noise(rng), None, None),
        ("bad-text", "jpg", text, None, None),
        ("bad-bomb", "png", _png_bomb(), None, None),
    ]
    records += [_render(rng, label, image_size, f"good-{i}") for i in range(2)]
    kinds = {r[0]: ("ok" if r[3] is not None else r[0].removeprefix("bad-")) for r in records}
    return _write_shard(out, "shard-broken", fmt, records), kinds


def make_sample(
    out: str,
    fmt: str = "tar",
    n: int = 200,
    num_shards: int = 2,
    image_size: int = 96,
    seed: int = 0,
    broken: bool = False,
    classes: int = 4,
    prefix: str = "shard",
) -> list[str]:
    """Write ``n`` synthetic labeled images as ``num_shards`` shards ``out/shard-00000...`` in format ``fmt``.

    Classes are the first ``classes`` of ``CLASS_NAMES``, balanced (round-robin, then shuffled with ``seed``).
    Keys are ``%06d`` over the whole dataset; shard sizes differ by at most one, earlier shards first.
    Existing files of the same names are overwritten. ``prefix`` names the shards (``<prefix>-00000``), so several
    samples can be encoded together with unique ids.

    Returns:
        The shard paths written, in order; with ``broken=True`` the ``shard-broken`` shard comes last.

    Raises:
        ValueError: unknown ``fmt``; ``n``, ``num_shards`` or ``classes`` below 1; more shards than images;
            more classes than ``CLASS_NAMES``; ``image_size`` below 16.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if n < 1 or not 1 <= num_shards <= n:  # more shards than images would leave some empty
        raise ValueError(f"need n >= 1 and 1 <= num_shards <= n, got n={n}, num_shards={num_shards}")
    if not 1 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must be in 1..{len(CLASS_NAMES)} (available: {', '.join(CLASS_NAMES)})")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    os.makedirs(out, exist_ok=True)
    names = CLASS_NAMES[:classes]
    labels = [names[i] for i in np.random.default_rng([seed, 0]).permutation(np.arange(n) % classes)]
    sizes = [n // num_shards + (i < n % num_shards) for i in range(num_shards)]
    paths, start = [], 0
    for shard, size in enumerate(sizes):
        # One generator per image: any shard can be regenerated alone with identical bytes.
        idxs = range(start, start + size)
        records = [_render(np.random.default_rng([seed, 2, i]), labels[i], image_size, f"{i:06d}") for i in idxs]
        paths.append(_write_shard(out, f"{prefix}-{shard:05d}", fmt, records))
        start += size
    if broken:
        paths.append(make_broken_shard(out, fmt, image_size=image_size, seed=seed)[0])
    return paths


def make_sample_anywhere(out: str, **kwargs) -> list[str]:
    """:func:`make_sample` to a local path or an object-store URI (made locally, then uploaded)."""
    import tempfile

    from attnpipe import fs

    if fs.is_local(out):
        return make_sample(fs.resolve(out)[1], **kwargs)
    with tempfile.TemporaryDirectory(prefix="attnpipe-sample-") as local:
        paths = make_sample(local, **kwargs)
        fs.upload_dir(local, out)
    return [fs.join(out, os.path.relpath(p, local)) for p in paths]
