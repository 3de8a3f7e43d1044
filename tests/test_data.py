"""Shard discovery, the three readers, and decoding of good and broken images (no Ray needed)."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attnpipe.data.decode import DecodeError, decode_batch, decode_image
from attnpipe.data.readers import read_unit
from attnpipe.data.sample import make_broken_shard, make_sample
from attnpipe.data.shards import InputError, discover, read_units


def _rows(shards, max_bytes=1 << 30):
    return pa.concat_tables([read_unit(u, max_bytes) for u in read_units(shards, folder_chunk=4)]).to_pylist()


@pytest.mark.parametrize("fmt", ["tar", "folder", "parquet"])
def test_every_format_reads_every_image_with_label_and_box(tmp_path, fmt):
    make_sample(str(tmp_path), fmt=fmt, n=9, num_shards=2, image_size=48)
    shards = discover([str(tmp_path)])
    assert [s.format for s in shards] == [fmt, fmt]
    rows = _rows(shards)
    assert len(rows) == 9 and len({r["id"] for r in rows}) == 9
    assert all(r["id"] == f"{r['shard']}/{r['key']}" for r in rows)
    assert all(r["label"] and r["error"] is None and r["data"] for r in rows)
    assert all(0 <= r["box"][0] < r["box"][2] <= 1 for r in rows)


def test_flat_folder_without_labels(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(tmp_path / f"img{i}.png")
    (shard,) = discover([str(tmp_path)])
    assert shard.format == "folder" and shard.name == tmp_path.name
    rows = _rows([shard])
    assert [r["key"] for r in rows] == ["img0", "img1", "img2"] and all(r["label"] is None for r in rows)


def test_parquet_struct_image_column_and_missing_keys(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    img = pa.array([{"bytes": buf.getvalue(), "path": "a.png"}, {"bytes": None, "path": None}])
    pq.write_table(pa.table({"image": img, "label": ["x", "y"]}), tmp_path / "hf.parquet")
    rows = _rows(discover([str(tmp_path / "hf.parquet")]))
    assert [r["id"] for r in rows] == ["hf/00000000", "hf/00000001"]
    assert rows[0]["data"] and rows[0]["error"] is None
    assert rows[1]["error"] == "image column is null" and rows[1]["label"] == "y"


def test_tar_edge_cases(tmp_path):
    path = tmp_path / "edge.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.cls", b"cat"), ("b.jpg", b"x" * 100), ("b.cls", b"dog")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = {r["key"]: r for r in _rows(discover([str(path)]), max_bytes=50)}
    assert "no image member" in rows["a"]["error"] and rows["a"]["label"] == "cat"
    assert "over data.max_bytes=50" in rows["b"]["error"]


def test_truncated_tar_keeps_earlier_rows_and_reports_the_break(tmp_path):
    make_sample(str(tmp_path / "s"), fmt="tar", n=6, num_shards=1, image_size=48)
    full = (tmp_path / "s" / "shard-00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2 + 100])
    rows = _rows(discover([str(tmp_path / "cut.tar")]))
    assert any(r["error"] is None for r in rows)
    errors = [r["error"] for r in rows if r["error"]]
    assert errors and ("truncated" in errors[-1] or "corrupt" in errors[-1]), errors


def test_discovery_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="holds no shards"):
        discover([str(tmp_path)])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="not a shard"):
        discover([str(tmp_path / "notes.txt")])
    make_sample(str(tmp_path / "a"), fmt="tar", n=2, num_shards=1)
    make_sample(str(tmp_path / "b"), fmt="tar", n=2, num_shards=1)
    with pytest.raises(InputError, match="unique"):
        discover([str(tmp_path / "a"), str(tmp_path / "b")])


def test_fingerprint_changes_with_content(tmp_path):
    make_sample(str(tmp_path), fmt="tar", n=4, num_shards=1, image_size=48)
    before = discover([str(tmp_path)])[0].fingerprint
    path = tmp_path / "shard-00000.tar"
    data = bytearray(path.read_bytes())
    data[-20000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert discover([str(tmp_path)])[0].fingerprint != before


def test_decode_good_and_broken(tmp_path):
    path, kinds = make_broken_shard(str(tmp_path), fmt="tar", image_size=64)
    rows = _rows(discover([path]))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = decode_batch(batch, size=32, max_pixels=10_000_000)
    by_key = dict(zip(out["key"], zip(out["status"], out["error"])))
    for key, kind in kinds.items():
        status, error = by_key[key]
        assert (status == "ok") == (kind == "ok"), (key, error)
    assert out["pixels"].shape == (len(rows), 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert "data" not in out


def test_decode_image_resizes_and_converts():
    buf = io.BytesIO()
    Image.new("L", (300, 100), 200).save(buf, format="PNG")
    px = decode_image(buf.getvalue(), size=40, max_pixels=10**6)
    assert px.shape == (40, 40, 3) and (px == 200).all()
    with pytest.raises(DecodeError, match="max_pixels=100"):
        decode_image(buf.getvalue(), size=40, max_pixels=100)
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", size=40, max_pixels=100)


def test_read_chunks_cover_folder(tmp_path):
    make_sample(str(tmp_path), fmt="folder", n=10, num_shards=1, image_size=32)
    units = read_units(discover([str(tmp_path)]), folder_chunk=3)
    assert [len(u["files"]) for u in units] == [3, 3, 3, 1]
    assert os.path.isdir(units[0]["uri"])


def test_fingerprint_is_a_content_hash_reused_when_stat_is_unchanged(tmp_path):
    make_sample(str(tmp_path / "t"), fmt="tar", n=4, num_shards=2, image_size=48)
    make_sample(str(tmp_path / "f"), fmt="folder", n=4, num_shards=1, image_size=48, prefix="fold")
    first = {s.name: s for s in discover([str(tmp_path / "t"), str(tmp_path / "f")])}
    assert all(s.fingerprint.startswith("blake2b:") for s in first.values())
    known = {name: s.to_json() for name, s in first.items()}
    known["shard-00000"]["fingerprint"] = "blake2b:remembered"  # reused: size+mtime unchanged, no re-hash
    again = {s.name: s for s in discover([str(tmp_path / "t"), str(tmp_path / "f")], known)}
    assert again["shard-00000"].fingerprint == "blake2b:remembered"
    assert again["shard-00001"].fingerprint == first["shard-00001"].fingerprint
    # a rewrite with identical bytes changes mtime, is re-hashed, and keeps its fingerprint
    path = tmp_path / "t" / "shard-00001.tar"
    os.utime(path, ns=(1, 1))
    touched = {s.name: s for s in discover([str(tmp_path / "t")], known)}
    assert touched["shard-00001"].stat != first["shard-00001"].stat
    assert touched["shard-00001"].fingerprint == first["shard-00001"].fingerprint
    # a folder member rewritten in place changes the folder's content hash
    member = next(p for p in sorted((tmp_path / "f").rglob("*.jpg")))
    member.write_bytes(member.read_bytes()[:-10] + b"0123456789")
    folder = discover([str(tmp_path / "f")], known)[0]
    assert folder.fingerprint != first[folder.name].fingerprint
