"""The encode stage end to end on a real local Ray: every shard format, broken members, every pooling head."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pytest

from attnpipe import store
from attnpipe.data.shards import discover
from attnpipe.encode import encode
from attnpipe.models.pooling import list_poolings
from tests.conftest import fast_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

BAD_REASONS = {
    "bad-truncated": "truncated",
    "bad-empty": "empty",
    "bad-noise": "not an image",
    "bad-text": "not an image",
    "bad-bomb": "decompression bomb",
}


@pytest.fixture(scope="module")
def encoded(ray_session, sample_inputs, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("enc") / "emb")
    inputs = [sample_inputs[k] for k in ("tar", "folder", "parquet", "broken")]
    summary = encode(inputs, out, fast_config())
    assert summary["rows"] == 24 + 10 + 14 + 7
    return out


def test_one_row_per_input_with_errors_and_reasons(encoded):
    table = store.read_embeddings(encoded)
    assert table.num_rows == 24 + 10 + 14 + 7
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    rows = {r["id"]: r for r in table.select(["id", "status", "error", "embedding"]).to_pylist()}
    for key, reason in BAD_REASONS.items():
        row = rows[f"shard-broken/{key}"]
        assert row["status"] == "error" and reason in row["error"], row
        assert row["embedding"] is None
    good = [r for r in rows.values() if not r["id"].startswith("shard-broken/bad-")]
    assert all(r["status"] == "ok" and r["error"] is None for r in good)


def test_embeddings_normalized_and_attention_sums_to_one(encoded):
    table = store.read_embeddings(encoded, filter=pc.field("status") == "ok")
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    attn = np.stack(table.column("attention").to_numpy(zero_copy_only=False)).astype(np.float32)
    h, w = table.column("attn_h")[0].as_py(), table.column("attn_w")[0].as_py()
    assert attn.shape[1] == h * w == 4  # resnet18 at 64 px: a 2x2 map
    np.testing.assert_allclose(attn.sum(1), 1.0, atol=5e-3)  # stored as float16
    assert (attn >= 0).all()
    entropy = table.column("attn_entropy").to_numpy()
    assert ((entropy >= 0) & (entropy <= 1)).all()
    assert not np.allclose(emb[0], emb[1])


def test_labels_and_boxes_from_every_format(encoded):
    table = store.read_embeddings(encoded, filter=pc.field("status") == "ok")
    for shard in ("tar-00000", "folder-00000", "parquet-00000"):
        rows = table.filter(pc.field("shard") == shard).to_pylist()
        assert rows, shard
        assert all(r["label"] for r in rows), shard
        assert all(r["box"] is not None and 0 <= r["box"][0] < r["box"][2] <= 1 for r in rows), shard


def test_manifest_and_metadata(encoded, sample_inputs):
    manifest = store.read_manifest(encoded)
    names = [s["name"] for s in manifest["shards"]]
    assert names == sorted(names) and "shard-broken" in names
    assert sum(s["rows"] for s in manifest["shards"]) == 55
    for s in manifest["shards"]:
        assert s["fingerprint"] and s["parts"]
        for p in s["parts"]:
            assert p.startswith(f"part-{s['name']}-") and os.path.isfile(os.path.join(encoded, p))
    numbers = manifest["part_numbers"]
    assert set(numbers) == {p for s in manifest["shards"] for p in s["parts"]}
    assert sorted(numbers.values()) == list(range(len(numbers))) == list(range(manifest["next_part_number"]))
    meta = store.dataset_metadata(encoded)
    assert meta["attnpipe.schema_version"] == store.SCHEMA_VERSION == "2"
    assert meta["attnpipe.model"] == "resnet18" and meta["attnpipe.embedding_dim"] == "512"
    assert os.path.isfile(os.path.join(encoded, store.CONFIG_FILE))
    assert not [f for f in os.listdir(os.path.dirname(encoded)) if ".staging-" in f]


def test_same_input_same_embeddings(ray_session, sample_inputs, encoded, tmp_path):
    """Deterministic init: a second run (new actors) reproduces the embeddings."""
    out = str(tmp_path / "again")
    encode([sample_inputs["folder"]], out, fast_config())
    ids, X = store.load_vectors(out)
    ids0, X0 = store.load_vectors(encoded)
    ref = dict(zip(ids0, X0))
    np.testing.assert_allclose(X, np.stack([ref[i] for i in ids]), atol=2e-2)


def _decoded_batch(inputs: list[str], cfg) -> dict[str, np.ndarray]:
    """Every row of ``inputs`` as the encoder actors receive it: read units -> Arrow -> Ray's numpy batch -> decoded."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from attnpipe.data.decode import decode_batch
    from attnpipe.encode import _read_batch, plan_units

    table = _read_batch(pa.Table.from_pylist(plan_units(discover(inputs), cfg)), cfg.data.max_bytes)
    batch = BlockAccessor.for_block(table).to_numpy()  # the conversion map_batches(batch_format="numpy") does
    return decode_batch(batch, size=cfg.data.image_size, max_pixels=cfg.data.max_pixels)


def test_every_pooling_head_in_the_encoder_actor(sample_inputs):
    """The actor class map_batches runs, called in-process: every head gives unit-norm embeddings, valid attention
    maps and its own name in the schema metadata (one head through Ray: the next test)."""
    from attnpipe.encode import EncodeActor

    batch = _decoded_batch([sample_inputs["parquet"]], fast_config())
    assert (batch["status"] == "ok").all() and len(batch["id"]) == 14
    seen = {}
    for head in list_poolings():
        table = EncodeActor(fast_config(f"model.pooling={head}").to_dict())(dict(batch))
        assert table.num_rows == 14 and table.column("id").to_pylist() == list(batch["id"]), head
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        assert meta["attnpipe.pooling"] == head and meta["attnpipe.model"] == "resnet18", meta
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        assert emb.shape[1] == int(meta["attnpipe.embedding_dim"]), head
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5, err_msg=head)
        attn = np.stack(table.column("attention").to_numpy(zero_copy_only=False)).astype(np.float32)
        assert attn.shape == (14, 4) and (table.column("attn_h").to_numpy() == 2).all(), head  # 2x2 at 64 px
        np.testing.assert_allclose(attn.sum(1), 1.0, atol=5e-3, err_msg=head)  # stored as float16
        assert (attn >= 0).all(), head
        seen[head] = emb
    assert seen["avgmax"].shape[1] == 2 * seen["avg"].shape[1]  # the concat of avg and max
    assert not np.allclose(seen["avg"], seen["max"])  # the head is really applied, not one fixed pooling


def test_non_default_pooling_head_through_ray(ray_session, sample_inputs, tmp_path):
    out = str(tmp_path / "avgmax")
    summary = encode([sample_inputs["parquet"]], out, fast_config("model.pooling=avgmax"))
    assert summary["ok"] == 14
    _, X = store.load_vectors(out)
    assert X.shape == (14, 1024)  # avgmax concatenates avg and max: twice resnet18's 512 channels
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    meta = store.dataset_metadata(out)
    assert meta["attnpipe.pooling"] == "avgmax" and meta["attnpipe.embedding_dim"] == "1024"


def test_failed_run_leaves_previous_output_untouched_and_resumes(ray_session, sample_inputs, tmp_path):
    out = str(tmp_path / "emb")
    encode([sample_inputs["parquet"]], out, fast_config())
    before = store.read_manifest(out)
    rows_before = store.read_embeddings(out, ["id"]).column("id").to_pylist()
    with pytest.raises(Exception, match="injected"):
        encode([sample_inputs["tar"]], out, fast_config(), overwrite=True, _crash_after_shards=1)
    assert store.read_manifest(out) == before  # the commit point did not move
    assert store.read_embeddings(out, ["id"]).column("id").to_pylist() == rows_before
    summary = encode([sample_inputs["tar"]], out, fast_config(), overwrite=True)
    assert summary["resumed_shards"] == 1 and summary["shards"] == 2
    ids = store.read_embeddings(out, ["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24 and all(i.startswith("tar-") for i in ids)
    listed = {p for s in store.read_manifest(out)["shards"] for p in s["parts"]}
    assert {n for n in os.listdir(out) if n.startswith("part-")} == listed  # the crashed run's leftovers are gone
    assert "_staging" not in os.listdir(out)
    assert os.listdir(tmp_path) == ["emb"]


def test_fail_fast_before_ray_work(tmp_path, sample_inputs):
    from attnpipe.data.shards import InputError

    with pytest.raises(InputError, match="does not exist"):
        encode([str(tmp_path / "missing")], str(tmp_path / "o"), fast_config())
    os.makedirs(tmp_path / "exists")
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an attnpipe embeddings dataset"):
        encode([sample_inputs["tar"]], str(tmp_path / "exists"), fast_config())
    assert os.listdir(tmp_path / "exists") == ["notes.txt"]
    assert len(discover([sample_inputs["tar"]])) == 2
