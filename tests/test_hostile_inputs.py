"""Hostile shards: a bad member costs one row, a bad shard one shard, and ids stay unique whatever the keys.

Reader-level tests call ``discover`` / ``read_units`` / ``read_unit`` directly (no Ray); one encode run on a real
local Ray mixes every kind of shard.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attnpipe.data.readers import read_unit
from attnpipe.data.sample import make_sample
from attnpipe.data.shards import assign_keys, content_hash, discover, read_units
from tests.conftest import fast_config


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rows(paths, folder_chunk: int = 512) -> list[dict]:
    units = read_units(discover([str(p) for p in paths]), folder_chunk)
    return [r for u in units for r in read_unit(u, 1 << 30).to_pylist()]


def _assert_unique(rows):
    dupes = [i for i, n in Counter(r["id"] for r in rows).items() if n > 1]
    assert not dupes, dupes


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _parquet(path, keys, row_group_size: int = 64, **extra) -> None:
    cols = {"key": keys, "image": [_png(i) for i in range(len(keys))], **extra}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


# --- a shard that cannot be read costs that shard -------------------------------------------------------------


def test_parquet_without_image_column_is_one_error_row_naming_the_file(tmp_path):
    path = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(6)], "pixels": [b"x"] * 6}), path, row_group_size=2)
    assert len(read_units(discover([str(path)]))) == 3
    rows = _rows([path])
    assert [r["id"] for r in rows] == ["noimg/__shard__"]  # one row, not one per row group
    assert str(path) in rows[0]["error"] and "no 'image' column" in rows[0]["error"]


def test_parquet_image_column_of_ints_is_one_error_row(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image": [1, 2, 3]}), path)
    (row,) = _rows([path])
    assert row["id"] == "ints/__shard__" and "column 'image' has type int64" in row["error"]
    assert str(path) in row["error"]


def test_parquet_with_cut_footer_is_discovered_and_costs_one_row(tmp_path):
    _parquet(tmp_path / "full.parquet", ["a", "b", "c"])
    data = (tmp_path / "full.parquet").read_bytes()
    os.remove(tmp_path / "full.parquet")
    (tmp_path / "cut.parquet").write_bytes(data[:-30])
    shards = discover([str(tmp_path)])  # discovery and fingerprints do not open the footer's promises
    assert [s.name for s in shards] == ["cut"] and shards[0].fingerprint.startswith("blake2b:")
    (row,) = _rows([tmp_path / "cut.parquet"])
    assert row["id"] == "cut/__shard__" and str(tmp_path / "cut.parquet") in row["error"]
    assert "Parquet" in row["error"] or "parquet" in row["error"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzipped_tar_is_read_whole_without_a_false_cut_off_row(tmp_path, suffix):
    make_sample(str(tmp_path / "s"), fmt="tar", n=5, num_shards=1, image_size=32)
    raw = (tmp_path / "s" / "shard-00000.tar").read_bytes()
    (tmp_path / f"web{suffix}").write_bytes(gzip.compress(raw))
    (shard,) = discover([str(tmp_path / f"web{suffix}")])
    assert (shard.name, shard.format) == ("web", "tar")
    rows = _rows([tmp_path / f"web{suffix}"])
    assert [r["id"] for r in rows] == [f"web/{i:06d}" for i in range(5)]
    assert all(r["error"] is None and r["label"] for r in rows)
    # cut inside the compressed stream: the rows before the cut, then the shard's error row
    (tmp_path / f"cut{suffix}").write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) * 2 // 3])
    rows = _rows([tmp_path / f"cut{suffix}"])
    assert rows[-1]["id"] == "cut/__shard__" and "truncated" in rows[-1]["error"]
    assert str(tmp_path / f"cut{suffix}") in rows[-1]["error"]
    assert sum(r["error"] is None for r in rows) >= 1


def test_tar_cut_at_any_block_or_not_a_tar_reports_the_shard(tmp_path):
    make_sample(str(tmp_path / "s"), fmt="tar", n=3, num_shards=1, image_size=32)
    raw = (tmp_path / "s" / "shard-00000.tar").read_bytes()
    with tarfile.open(tmp_path / "s" / "shard-00000.tar") as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())  # the end-of-archive marker
    assert raw[end : end + 1024] == b"\0" * 1024
    for cut in range(0, end + 1024, 512):  # every block boundary up to a missing last zero block
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        rows = _rows([tmp_path / "cut.tar"])
        assert rows[-1]["id"] == "cut/__shard__", (cut, rows[-1])
        _assert_unique(rows)
    (tmp_path / "cut.tar").write_bytes(b"<html>this is a web page, not a tar</html>\n" * 40)
    (row,) = _rows([tmp_path / "cut.tar"])
    assert row["id"] == "cut/__shard__" and "not a readable tar archive" in row["error"]


def test_folder_entries_that_are_not_files_are_error_rows(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "good.png").write_bytes(_png())
    os.symlink(root / "nowhere.png", root / "dangling.png")
    os.symlink(root / "loop.png", root / "loop.png")
    os.mkfifo(root / "fifo.jpg")  # opening it would block until a writer comes: it must never be opened
    (root / "dir.jpg").mkdir()
    (shard,) = discover([str(root)])  # hashing the folder does not block on the fifo either
    assert content_hash(shard) == shard.fingerprint
    rows = {r["key"]: r for r in _rows([root])}
    assert set(rows) == {"good", "dangling", "loop", "fifo", "dir"}
    assert rows["good"]["error"] is None
    assert "broken symlink" in rows["dangling"]["error"] and "broken symlink" in rows["loop"]["error"]
    assert "not a regular file" in rows["fifo"]["error"] and "a directory" in rows["dir"]["error"]
    assert all(str(root / f"{k}.") in r["error"] for k, r in rows.items() if k != "good")


def test_read_unit_never_raises(tmp_path):
    rows = read_unit({"format": "zip", "shard": "z", "uri": str(tmp_path / "z.zip"), "part": 0}, 1 << 20).to_pylist()
    assert [r["id"] for r in rows] == ["z/__shard__"] and "KeyError" in rows[0]["error"]
    gone = {"format": "parquet", "shard": "p", "uri": str(tmp_path / "gone.parquet"), "part": 2}
    (row,) = read_unit(gone, 1 << 20).to_pylist()
    assert row["id"] == "p/__shard__#2" and "gone.parquet (row group 2)" in row["error"]


# --- ids are unique, always -----------------------------------------------------------------------------------


def test_assign_keys_rule():
    got = assign_keys(["a", "b", "a", "a#2", "__shard__", "a", "__shard__"], "s")
    assert [k for k, _ in got] == [
        "a",
        "b",
        "__dup__#a#2",
        "a#2",
        "__reserved__/__shard__",
        "a#3",
        "__reserved__/__shard__#2",
    ]
    errors = [e for _, e in got]
    assert errors[:2] == [None, None] and errors[3] is None
    assert errors[2] == "duplicate key 'a' in s (repeat 2)" and errors[5] == "duplicate key 'a' in s (repeat 3)"
    assert "reserved" in errors[4]
    rng = np.random.default_rng(7)  # fuzz: any key multiset gives unique ids, and first occurrences keep theirs
    for _ in range(300):
        keys = [str(rng.choice(["a", "b", "a#2", "a#3", "__x", "__dup__#a#2", "b#2#2", "b#2"])) for _ in range(12)]
        got = assign_keys(keys, "s")
        assert len({k for k, _ in got}) == len(keys)
        for i, (k, e) in enumerate(got):
            assert (e is None) == (k == keys[i] and keys.index(keys[i]) == i and not keys[i].startswith("__"))


def test_tar_repeated_keys_keep_every_member_with_unique_ids(tmp_path):
    path = tmp_path / "rep.tar"
    members = [("a.png", _png(1)), ("a.cls", b"cat"), ("b.png", _png(2)), ("a.png", _png(3))]
    members += [("c.png", _png(4)), ("c.png", _png(5)), ("__shard__.png", _png(6))]
    _write_tar(path, members)
    rows = _rows([path])
    _assert_unique(rows)
    assert [r["id"] for r in rows] == ["rep/a", "rep/b", "rep/a#2", "rep/c", "rep/c#2", "rep/__reserved__/__shard__"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["rep/a"]["error"] is None and by_id["rep/a"]["label"] == "cat"
    assert by_id["rep/a#2"]["error"] == "duplicate key 'a' in rep (repeat 2)" and by_id["rep/a#2"]["data"] is None
    assert by_id["rep/c#2"]["error"] == "duplicate key 'c' in rep (repeat 2)"
    assert "reserved" in by_id["rep/__reserved__/__shard__"]["error"]


def test_parquet_repeated_keys_within_and_across_row_groups(tmp_path):
    path = tmp_path / "dup.parquet"
    keys = ["a", "a", "b", "c", "a", "b", None, "00000006"]  # groups of 2: repeats within and across groups
    _parquet(path, keys, row_group_size=2)
    assert len(read_units(discover([str(path)]))) == 4
    rows = _rows([path])
    _assert_unique(rows)
    assert [r["id"] for r in rows] == [
        "dup/a", "dup/a#2", "dup/b", "dup/c", "dup/a#3", "dup/b#2", "dup/00000006", "dup/00000006#2"
    ]  # fmt: skip
    errors = {r["id"]: r["error"] for r in rows}
    assert errors["dup/a#3"] == "duplicate key 'a' in dup (repeat 3)"
    assert errors["dup/00000006#2"] == "duplicate key '00000006' in dup (repeat 2)"
    assert [errors[i] for i in ("dup/a", "dup/b", "dup/c", "dup/00000006")] == [None] * 4


def test_folder_stems_shared_by_two_files_across_read_units(tmp_path):
    root = tmp_path / "fold"
    (root / "cat").mkdir(parents=True)
    for name in ("a.bmp", "a.c.jpg", "a.jpg", "a.png", "b.gif"):
        Image.open(io.BytesIO(_png())).save(root / "cat" / name)
    for chunk in (1, 2, 512):  # the pair is split across units, or not: same ids
        rows = _rows([root], folder_chunk=chunk)
        _assert_unique(rows)
        assert [r["id"] for r in rows] == ["fold/cat/a", "fold/cat/a.c", "fold/cat/a#2", "fold/cat/a#3", "fold/cat/b"]
        assert [r["error"] is None for r in rows] == [True, True, False, False, True]
        assert rows[2]["error"] == "duplicate key 'cat/a' in fold (repeat 2)"


# --- one encode run over all of it ----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_encode_over_hostile_shards_keeps_going(tmp_path, ray_session):
    from attnpipe.encode import encode

    data = tmp_path / "data"
    make_sample(str(data), fmt="tar", n=6, num_shards=1, image_size=48, prefix="good")
    make_sample(str(tmp_path / "g"), fmt="tar", n=4, num_shards=1, image_size=48, prefix="zipped", seed=1)
    (data / "zipped.tar.gz").write_bytes(gzip.compress((tmp_path / "g" / "zipped-00000.tar").read_bytes()))
    _write_tar(data / "reptar.tar", [("x.png", _png(1)), ("y.png", _png(2)), ("x.png", _png(3))])
    pq.write_table(pa.table({"key": ["p", "q"], "pixels": [b"1", b"2"]}), data / "noimage.parquet")
    _parquet(tmp_path / "whole.parquet", ["m", "n"])
    (data / "cutfooter.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-25])
    _parquet(data / "reppq.parquet", ["k", "k", "j", "k"], row_group_size=2)

    summary = encode([str(data)], str(tmp_path / "emb"), fast_config())
    rows = pq.read_table(str(tmp_path / "emb"), columns=["id", "shard", "status", "error"]).to_pylist()
    _assert_unique(rows)
    by_id = {r["id"]: r for r in rows}
    assert summary["rows"] == len(rows) == 6 + 4 + 3 + 1 + 1 + 4
    assert {i for i in by_id if i.startswith("good-00000/")} == {f"good-00000/{i:06d}" for i in range(6)}
    assert all(by_id[f"good-00000/{i:06d}"]["status"] == "ok" for i in range(6))  # the good shard, whole
    assert [r["status"] for r in rows if r["shard"] == "zipped"] == ["ok"] * 4
    assert [by_id[i]["status"] for i in ("reptar/x", "reptar/y", "reptar/x#2")] == ["ok", "ok", "error"]
    assert [by_id[i]["status"] for i in ("reppq/k", "reppq/k#2", "reppq/j", "reppq/k#3")] == [
        "ok",
        "error",
        "ok",
        "error",
    ]
    for shard in ("noimage", "cutfooter"):
        row = by_id[f"{shard}/__shard__"]
        assert row["status"] == "error" and f"{shard}.parquet" in row["error"]
