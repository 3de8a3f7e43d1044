"""attnpipe.data.sample: counts, keys, labels, boxes, determinism, object placement, broken members, bad args."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from attnpipe.data.sample import BROKEN_KINDS, CLASS_COLORS, CLASS_NAMES, FORMATS, make_broken_shard, make_sample

N, SHARDS, SIZE, CLASSES = 30, 4, 64, 8


def read_shard(path: str, fmt: str) -> list[dict]:
    """Members of one shard as dicts with key, name, data, label (None if unlabeled) and box, in stored order."""
    rows: list[dict] = []
    if fmt == "tar":
        with tarfile.open(path) as tar:
            names = tar.getnames()
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in names:
            key, ext = name.split(".", 1)
            if ext in ("jpg", "png"):
                meta = json.loads(files[f"{key}.json"]) if f"{key}.json" in files else None
                label = files[f"{key}.cls"].decode("utf-8") if f"{key}.cls" in files else None
                assert (meta is None) == (label is None) and (meta is None or meta["label"] == label)
                rows.append({"key": key, "name": name, "data": files[name], "label": label, "meta": meta})
        # WebDataset grouping: each key's members adjacent, image first, then .cls and .json for labeled ones.
        sidecars = {r["key"]: [f"{r['key']}.cls", f"{r['key']}.json"] if r["label"] else [] for r in rows}
        expected = [m for r in rows for m in [r["name"], *sidecars[r["key"]]]]
        assert names == expected
    elif fmt == "folder":
        for label in sorted(os.listdir(path)):
            for name in sorted(os.listdir(os.path.join(path, label))):
                key, ext = name.split(".", 1)
                if ext == "json":
                    continue
                with open(os.path.join(path, label, name), "rb") as f:
                    data = f.read()
                meta = None
                if label != "broken":
                    with open(os.path.join(path, label, f"{key}.json")) as f:
                        meta = json.load(f)
                    assert meta["label"] == label
                labeled = None if meta is None else label
                rows.append({"key": key, "name": name, "data": data, "label": labeled, "meta": meta})
    else:
        table = pq.read_table(path)
        assert table.column_names == ["key", "image", "label", "json"]
        for r in table.to_pylist():
            meta = None if r["json"] is None else json.loads(r["json"])
            assert (meta is None) == (r["label"] is None)
            rows.append({"key": r["key"], "name": r["key"], "data": r["image"], "label": r["label"], "meta": meta})
    for r in rows:
        r["box"] = None if r["meta"] is None else r["meta"]["box"]
    return rows


@pytest.fixture(scope="module", params=FORMATS)
def sample(request, tmp_path_factory) -> tuple[str, str, list[str]]:
    out = str(tmp_path_factory.mktemp(f"sample-{request.param}"))
    return request.param, out, make_sample(out, request.param, n=N, num_shards=SHARDS, image_size=SIZE, classes=CLASSES)


def all_rows(fmt: str, paths: list[str]) -> list[dict]:
    return [r for p in paths for r in read_shard(p, fmt)]


def test_layout_counts_keys_labels(sample):
    fmt, out, paths = sample
    suffix = {"tar": ".tar", "parquet": ".parquet", "folder": ""}[fmt]
    assert paths == [os.path.join(out, f"shard-{i:05d}{suffix}") for i in range(SHARDS)]
    sizes = [len(read_shard(p, fmt)) for p in paths]
    assert sizes == [8, 8, 7, 7]  # even split, later shards smaller
    rows = all_rows(fmt, paths)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == [f"{i:06d}" for i in range(N)]
    assert all(r["name"] in (r["key"], f"{r['key']}.jpg") for r in rows)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == set(CLASS_NAMES[:CLASSES]) and max(counts.values()) - min(counts.values()) <= 1


def test_boxes_and_decoding(sample):
    fmt, _, paths = sample
    for r in all_rows(fmt, paths):
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert 0.25 - 1 / SIZE <= x1 - x0 <= 0.5 + 1 / SIZE and abs((x1 - x0) - (y1 - y0)) < 1e-9
        img = Image.open(io.BytesIO(r["data"]))
        assert img.format == "JPEG" and img.size == (SIZE, SIZE)
        img.load()


def test_object_is_at_its_box(sample):
    fmt, _, paths = sample
    ratios = []
    for r in all_rows(fmt, paths):
        pixels = np.asarray(Image.open(io.BytesIO(r["data"])).convert("RGB"), dtype=np.float64)  # (H, W, 3)
        dist = np.linalg.norm(pixels - np.array(CLASS_COLORS[r["label"]]), axis=-1)  # (H, W)
        x0, y0, x1, y1 = (round(v * SIZE) for v in r["box"])
        inside = np.zeros_like(dist, dtype=bool)
        inside[y0:y1, x0:x1] = True
        # Shapes fill 50% (triangle, diamond, star) to 100% (square) of their box, so the in-box mean mixes in
        # background; over 1200 generated images the worst ratio was 0.71 and the mean ~0.45.
        ratios.append(dist[inside].mean() / dist[~inside].mean())
        assert ratios[-1] < 0.75, (r["key"], r["label"])
        near = dist < 60  # jitter (up to 35) + JPEG error
        assert near.sum() > 0.25 * inside.sum() and near[~inside].sum() < 0.15 * near.sum(), (r["key"], r["label"])
    assert np.mean(ratios) < 0.55


def shard_bytes(path: str) -> dict[str, bytes]:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic(tmp_path, fmt):
    a = make_sample(str(tmp_path / "a"), fmt, n=10, num_shards=2, image_size=32)
    b = make_sample(str(tmp_path / "b"), fmt, n=10, num_shards=2, image_size=32)
    again = make_sample(str(tmp_path / "a"), fmt, n=10, num_shards=2, image_size=32)  # overwrite in place
    c = make_sample(str(tmp_path / "c"), fmt, n=10, num_shards=2, image_size=32, seed=1)
    assert shard_bytes(a[0]) == shard_bytes(b[0]) == shard_bytes(again[0])
    assert shard_bytes(a[0]) != shard_bytes(c[0])
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "a"))


def test_parquet_row_groups(tmp_path):
    (path,) = make_sample(str(tmp_path), "parquet", n=130, num_shards=1, image_size=16)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 130 and meta.num_row_groups == 3


def expected_pil_kind(data: bytes, monkeypatch) -> str:
    """What PIL actually does with the bytes, in make_broken_shard's vocabulary (header read lazily, no bomb guard)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return "empty" if not data else ("text" if data.isascii() else "noise")
    finally:
        monkeypatch.undo()
    if img.size == (30000, 30000):
        return "bomb"
    try:
        img.load()
    except OSError:
        return "truncated"
    return "ok"


@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_shard(tmp_path, fmt, monkeypatch):
    path, kinds = make_broken_shard(str(tmp_path), fmt)
    assert os.path.basename(path) == "shard-broken" + {"tar": ".tar", "parquet": ".parquet", "folder": ""}[fmt]
    assert kinds == {
        "bad-truncated": "truncated",
        "bad-empty": "empty",
        "bad-noise": "noise",
        "bad-text": "text",
        "bad-bomb": "bomb",
        "good-0": "ok",
        "good-1": "ok",
    }
    assert set(kinds.values()) == set(BROKEN_KINDS)
    rows = {r["key"]: r for r in read_shard(path, fmt)}
    assert rows.keys() == kinds.keys()
    for key, kind in kinds.items():
        r = rows[key]
        assert expected_pil_kind(r["data"], monkeypatch) == kind, key
        assert (r["label"] is None) == (kind != "ok")
        if fmt != "parquet":
            assert r["name"] == key + (".png" if kind == "bomb" else ".jpg")
    assert rows["good-0"]["label"] == rows["good-1"]["label"] == CLASS_NAMES[0]
    assert 0 <= rows["good-0"]["box"][0] < rows["good-0"]["box"][2] <= 1
    bomb = rows["bad-bomb"]["data"]
    assert len(bomb) < 100_000 and bomb.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(Image.DecompressionBombError):  # PIL's default guard fires at open, before decoding
        Image.open(io.BytesIO(bomb))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert Image.open(io.BytesIO(bomb)).size == (30000, 30000)
    assert len(rows["bad-empty"]["data"]) == 0 and len(rows["bad-noise"]["data"]) == 2000


def test_make_sample_broken_flag(tmp_path):
    paths = make_sample(str(tmp_path), "tar", n=4, num_shards=1, image_size=32, broken=True)
    assert [os.path.basename(p) for p in paths] == ["shard-00000.tar", "shard-broken.tar"]
    assert len(read_shard(paths[1], "tar")) == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "zip"},
        {"n": 0},
        {"num_shards": 0},
        {"n": 3, "num_shards": 4},
        {"classes": 0},
        {"classes": len(CLASS_NAMES) + 1},
        {"image_size": 8},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_sample(str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_format_lists_formats(tmp_path):
    with pytest.raises(ValueError, match="folder.*tar.*parquet"):
        make_sample(str(tmp_path), fmt="webdataset")
    with pytest.raises(ValueError, match="folder.*tar.*parquet"):
        make_broken_shard(str(tmp_path), fmt="zip")


def test_class_list():
    assert len(CLASS_NAMES) >= 8 and CLASS_NAMES[:4] == ("red_circle", "green_square", "blue_triangle", "yellow_cross")
