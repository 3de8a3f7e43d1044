"""Damage at rest is caught before use and named; no command deletes what it did not write (issue 10, items 4-5).

One small real dataset (tar shards, random-weight resnet18) built by ``reindex``; then bytes flipped inside a part,
a non-UTF-8 ``CURRENT``, a user's file in ``eval --out``, a foreign ``part-*.parquet`` beside the parts.
"""

from __future__ import annotations

import json
import os

import pytest

from attnpipe import store
from attnpipe.cli import main
from attnpipe.data.sample import make_sample
from attnpipe.reindex import reindex
from tests.conftest import FAST, fast_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
SETS = [a for kv in FAST for a in ("--set", kv)]


@pytest.fixture()
def built(ray_session, tmp_path):
    data, emb, index = (str(tmp_path / p) for p in ("data", "emb", "index"))
    make_sample(data, fmt="tar", n=24, num_shards=3, image_size=64)
    reindex([data], emb, index, fast_config())
    return data, emb, index


def _flip(path: str, n: int = 32) -> None:
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    with open(path, "wb") as f:
        f.write(raw)


def test_flipped_part_is_named_by_eval_and_search_then_reindex_repairs_it(built, tmp_path, capsys):
    data, emb, index = built
    part = store.open_dataset(emb).parts()[1]
    some_id = store.read_part(emb, part, ["id"]).column("id")[0].as_py()
    _flip(os.path.join(emb, part.file))  # search reads only the part holding the id it is asked for

    assert main(["eval", "--embeddings", emb, "--index", index, "--out", str(tmp_path / "ev")]) == 2
    assert part.file in capsys.readouterr().err
    assert main(["search", "--index", index, "--id", some_id]) == 2
    assert part.file in capsys.readouterr().err
    assert main(["verify", emb, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["problems"]) == 1 and part.file in report["problems"][0]

    assert main(["reindex", "--input", data, "--embeddings", emb, "--index", index, *SETS, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["changed"] == [part.shard] and summary["encoded_images"] == part.rows
    assert main(["eval", "--embeddings", emb, "--index", index, "--out", str(tmp_path / "ev"), "--json"]) == 0
    ids = store.read_embeddings(emb, ["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    assert main(["verify", emb]) == 0 and main(["verify", index]) == 0


def test_outputs_replace_only_what_attnpipe_wrote(built, tmp_path, capsys):
    data, emb, index = built
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    assert main(["eval", "--embeddings", emb, "--index", index, "--out", str(mine)]) == 2
    assert "not an attnpipe output" in capsys.readouterr().err
    assert os.listdir(mine) == ["notes.txt"]

    ev = tmp_path / "ev"
    assert main(["eval", "--embeddings", emb, "--index", index, "--out", str(ev)]) == 0
    (ev / "my-notes.txt").write_text("added by the user")
    assert main(["eval", "--embeddings", emb, "--index", index, "--out", str(ev)]) == 0
    assert (ev / "my-notes.txt").read_text() == "added by the user"  # replaced the listed files only
    assert {"metrics.json", "report.html"} <= set(os.listdir(ev))

    foreign = os.path.join(emb, "part-00000-x.snappy.parquet")
    with open(foreign, "wb") as f:
        f.write(b"written by Spark")
    make_sample(data, fmt="tar", n=8, num_shards=1, image_size=64, seed=5, prefix="extra")
    assert reindex([data], emb, index, fast_config())["added"] == ["extra-00000"]
    with open(foreign, "rb") as f:
        assert f.read() == b"written by Spark"
    assert main(["verify", emb, "--clean"]) == 0
    assert os.path.exists(foreign)


def test_damaged_current_is_named_and_reindex_recovers(built, capsys):
    data, emb, index = built
    with open(os.path.join(index, "CURRENT"), "wb") as f:
        f.write(b"\xff\xfe\x00v1")
    assert main(["search", "--index", index, "--id", "x"]) == 2
    assert "CURRENT" in capsys.readouterr().err
    summary = reindex([data], emb, index, fast_config())
    assert summary["version"] == "v1" and summary["encoded_images"] == 0
    with open(os.path.join(index, "CURRENT")) as f:
        assert f.read().startswith("v1 sha256=")


def test_leftovers_of_a_killed_encode_are_listed_and_cleaned(ray_session, sample_inputs, tmp_path, capsys):
    from attnpipe.encode import encode

    out = str(tmp_path / "emb")
    with pytest.raises(RuntimeError, match="injected"):
        encode([sample_inputs["tar"]], out, fast_config("encode.rows_per_file=8"), _crash_after_shards=1)
    assert main(["verify", out, "--json"]) == 1  # never published: no manifest yet
    report = json.loads(capsys.readouterr().out)
    assert report["leftovers"] and "unfinished run" in report["leftovers"][0]
    main(["verify", out, "--clean"])
    assert not [n for n in os.listdir(out) if n.startswith("part-") or n == "_staging"]
