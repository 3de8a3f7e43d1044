"""The whole pipeline on object storage only: sample -> encode -> index -> search -> eval -> reindex on s3:// paths.

A real S3 server (SeaweedFS, the ``s3_server`` fixture) and the real CLI; nothing may land on the local disk in
place of S3 (the working directory stays empty; the index cache goes to its own directory).
"""

from __future__ import annotations

import json
import os

import pytest

from attnpipe import fs, store
from attnpipe.cli import main
from attnpipe.data.sample import make_sample_anywhere
from tests.conftest import FAST

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
SETS = [a for kv in FAST for a in ("--set", kv)]


def _run(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pipeline_on_s3_only(ray_session, s3_server, tmp_path, monkeypatch, capsys):
    bucket = s3_server.make_bucket("e2e-pipeline")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
    data, emb, index, ev = (f"{bucket}/{p}" for p in ("data", "emb", "index", "eval"))

    _run(capsys, "sample", "--out", data, "--n", "24", "--shards", "2", "--image-size", "64")
    assert fs.listdir(data) == ["shard-00000.tar", "shard-00001.tar"]
    summary = _run(capsys, "encode", "--input", data, "--out", emb, *SETS)
    assert (summary["rows"], summary["ok"], summary["resumed_shards"]) == (24, 24, 0)
    manifest = store.read_manifest(emb)
    assert all(p in manifest["checksums"] for s in manifest["shards"] for p in s["parts"])

    built = _run(capsys, "index", "--embeddings", emb, "--out", index)
    assert (built["version"], built["count"]) == ("v1", 24)
    assert fs.read_text(f"{index}/CURRENT").startswith("v1 sha256=")
    some_id = store.load_vectors(emb)[0][5]
    hits = _run(capsys, "search", "--index", index, "--id", some_id, "-k", "3")
    assert hits[0]["id"] == some_id

    _run(capsys, "eval", "--embeddings", emb, "--index", index, "--out", ev, "--num-queries", "8")
    assert {"metrics.json", "report.html", "_attnpipe.json"} <= set(fs.listdir(ev))

    make_sample_anywhere(data, n=8, num_shards=1, image_size=64, seed=3, prefix="extra")
    result = _run(capsys, "reindex", "--input", data, "--embeddings", emb, "--index", index, *SETS)
    assert (result["added"], result["changed"], result["version"], result["vectors"]) == (["extra-00000"], [], "v2", 32)
    ids = store.read_embeddings(emb, ["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 32

    assert os.listdir(work) == []  # nothing written locally in place of S3
    leftovers = [n for n in fs.listdir(emb) if n.startswith("part-")]
    assert set(leftovers) == set(store.part_numbers(store.read_manifest(emb)))


def test_endpoint_from_uri_parameters(s3_server, monkeypatch):
    """pyarrow's URI query parameters work without any AWS environment (and win over it)."""
    bucket = s3_server.make_bucket("uri-params")
    for k in s3_server.env():
        monkeypatch.delenv(k, raising=False)
    q = f"?endpoint_override=127.0.0.1:{s3_server.port}&scheme=http&access_key=attnpipe-test-key"
    q += "&secret_key=attnpipe-test-secret&region=us-east-1"
    uri = f"{bucket}/params{q}"
    fs.write_json(fs.join(uri, "a.json"), {"x": 1})
    assert fs.read_json(fs.join(uri, "a.json")) == {"x": 1}
    assert fs.listdir(uri) == ["a.json"]
    assert fs.display(fs.join(uri, "a.json")) == f"{bucket}/params/a.json"  # keys never printed
