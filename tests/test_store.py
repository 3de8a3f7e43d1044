"""The embeddings dataset's commit protocol without Ray: runs, shard commits, resume, refusal, what gets deleted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from attnpipe import store


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "status": ["ok"] * len(ids)})


def _vectors(path: str, n: int = 40) -> None:
    X = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    store.write_vectors(path, [f"s/{i:03d}" for i in range(n)], X, num_shards=2)


def test_resume_skips_committed_shards_and_publish_cleans_up(tmp_path):
    out = str(tmp_path / "emb")
    run = store.start_run(out, {"inputs": {"a": "f1", "b": "f2"}})
    rec = store.write_part(out, run.token, "a", _table(["a/1", "a/2"]))
    run.commit_shard({"name": "a", "parts": [rec["file"]], "rows": 2, "ok": 2}, [rec])
    orphan = store.write_part(out, run.token, "b", _table(["b/1"]))["file"]  # written, never committed (a kill)

    again = store.start_run(out, {"inputs": {"a": "f1", "b": "f2"}})  # the same command: resumed
    assert again.token == run.token and set(again.resumed) == {"a"}
    with pytest.raises(store.RunMismatch, match="inputs.b"):
        store.start_run(out, {"inputs": {"a": "f1", "b": "CHANGED"}})
    rec_b = store.write_part(out, again.token, "b", _table(["b/1"]))
    again.commit_shard({"name": "b", "parts": [rec_b["file"]], "rows": 1, "ok": 1}, [rec_b])
    entries = [r["entry"] for r in again.committed().values()]
    manifest = again.publish(entries, {"model": {}})
    assert set(manifest["checksums"]) == {rec["file"], rec_b["file"]}
    assert orphan not in os.listdir(out) and "_staging" not in os.listdir(out)
    assert store.read_manifest(out)["self_sha256"] == manifest["self_sha256"]


def test_discarding_a_run_never_deletes_a_listed_part_or_a_foreign_file(tmp_path):
    out = str(tmp_path / "emb")
    _vectors(out)
    listed = set(store.part_numbers(store.read_manifest(out)))
    foreign = tmp_path / "emb" / "part-00000-x.snappy.parquet"
    foreign.write_bytes(b"spark")
    os.makedirs(tmp_path / "emb" / "_staging" / "deadbeef" / "shards")  # a half-deleted staging area
    token = next(iter(listed)).split("-")[-2]
    os.makedirs(tmp_path / "emb" / "_staging" / token)  # a stale staging dir of the run that published
    store.start_run(out, {"other": 1}, replace=True)
    assert listed <= set(os.listdir(out)) and foreign.exists()
    assert len(store.load_vectors(out)[0]) == 40
    assert store.clean_dataset(out) and foreign.exists() and listed <= set(os.listdir(out))


def test_manifest_edit_is_caught(tmp_path):
    out = str(tmp_path / "emb")
    _vectors(out)
    path = tmp_path / "emb" / "_manifest.json"
    path.write_text(path.read_text().replace('"rows": 20', '"rows": 21', 1))
    with pytest.raises(store.DamagedData, match="does not match its recorded checksum"):
        store.open_dataset(out)


def test_vectors_are_stored_plain_and_everything_else_compressed(tmp_path):
    import pyarrow.parquet as pq

    out = str(tmp_path / "emb")
    _vectors(out)
    part = store.open_dataset(out).parts()[0]
    meta = pq.ParquetFile(os.path.join(out, part.file)).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    vector = columns["embedding"]  # one FIXED_LEN_BYTE_ARRAY per row: no list levels to decode
    assert vector.physical_type == "FIXED_LEN_BYTE_ARRAY" and vector.compression == "UNCOMPRESSED"
    assert "RLE_DICTIONARY" not in vector.encodings and not vector.is_stats_set
    assert columns["id"].compression == "ZSTD" and "RLE_DICTIONARY" in columns["id"].encodings
    table = store.read_part(out, part)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)  # readers see the logical schema
    assert table.schema.field("attention").type == pa.list_(pa.float16(), 1)


def test_vector_storage_round_trips_nulls_offsets_and_v1_files(tmp_path):
    import pyarrow.parquet as pq

    from attnpipe.store.schema import fixed_list, from_storage, schema, to_storage

    sch = schema(8, 6)
    rng = np.random.default_rng(1)
    valid = rng.random(50) < 0.7
    table = pa.table(
        {
            "embedding": fixed_list(rng.random((50, 8)).astype(np.float32), valid, sch.field("embedding").type),
            "attention": fixed_list(rng.random((50, 6)).astype(np.float16), valid, sch.field("attention").type),
            "n": pa.array(range(50)),
        }
    )
    chunked = pa.concat_tables([table.slice(17, 20), table.slice(0, 17), table.slice(37)])  # chunks with offsets
    for i, t in enumerate((table, chunked)):
        pq.write_table(to_storage(t), tmp_path / f"v2-{i}.parquet")
        back = from_storage(pq.read_table(tmp_path / f"v2-{i}.parquet"))
        assert back.combine_chunks().equals(t.combine_chunks())
        assert back.column("embedding").null_count == int((~valid).sum())
    pq.write_table(table, tmp_path / "v1.parquet")  # schema v1: lists on disk, no tag
    assert from_storage(pq.read_table(tmp_path / "v1.parquet")).equals(table)


def test_iter_parts_reads_ahead_in_order_and_names_a_damaged_part(tmp_path):
    out = str(tmp_path / "emb")
    _vectors(out, n=60)
    ds = store.open_dataset(out)
    parts = ds.parts()
    got = list(store.iter_parts(out, parts, ["id", "embedding"], ok_only=True))
    assert [p.file for p, _ in got] == [p.file for p in parts]
    for part, table in got:
        assert table.equals(store.read_part(out, part, ["id", "embedding"], ok_only=True))

    victim = Path(out) / parts[-1].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    seen = []
    with pytest.raises(store.DamagedData, match=parts[-1].file):
        for part, _ in store.iter_parts(out, parts):
            seen.append(part.file)
    assert seen == [p.file for p in parts[:-1]]  # every part before the damaged one was handed over
