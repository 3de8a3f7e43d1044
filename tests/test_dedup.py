"""Near-duplicate detection end to end: planted resized + re-encoded copies are grouped with their originals."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from attnpipe.data.sample import make_sample
from attnpipe.encode import encode
from attnpipe.index.build import build_index
from tests.conftest import fast_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_planted_copies_are_grouped(ray_session, tmp_path):
    make_sample(str(tmp_path / "orig"), fmt="folder", n=40, num_shards=1, image_size=128, prefix="orig")
    shard = tmp_path / "orig" / "orig-00000"
    originals = sorted(shard.glob("*/*.jpg"))[::8][:5]
    os.makedirs(tmp_path / "copies" / "dups")
    planted = {}
    for path in originals:
        copy = tmp_path / "copies" / "dups" / f"copy-{path.stem}.jpg"
        Image.open(path).convert("RGB").resize((112, 112), Image.BICUBIC).save(copy, quality=85)
        planted[f"copies/dups/copy-{path.stem}"] = f"orig-00000/{path.parent.name}/{path.stem}"
    emb = str(tmp_path / "emb")
    # max pooling separates unrelated images best under random weights (sparse, position-specific maxima)
    encode(
        [str(tmp_path / "orig"), str(tmp_path / "copies")], emb, fast_config("model.pooling=max", "data.image_size=96")
    )
    manifest = build_index(emb, str(tmp_path / "index"), lsh="minhash", dedup_threshold=0.92, minhash_perm=256)
    groups = pq.read_table(os.path.join(manifest["path"], "lsh", "near_duplicates.parquet")).to_pylist()
    group_of = {r["id"]: r["group"] for r in groups}
    for copy, orig in planted.items():
        assert copy in group_of and group_of.get(orig) == group_of[copy], (copy, orig, groups)
    members: dict[int, list[str]] = {}
    for r in groups:
        members.setdefault(r["group"], []).append(r["id"])
    assert all(len(m) == 2 for m in members.values()), members  # no unrelated image pulled in
    assert manifest["lsh"]["minhash"]["groups"] == len(planted)


def test_search_by_image_encodes_with_the_datasets_model(ray_session, tmp_path):
    from attnpipe.cli import main
    from attnpipe.index.search import SearchIndex
    from attnpipe.query import search_image

    make_sample(str(tmp_path / "data"), fmt="folder", n=12, num_shards=1, image_size=64, prefix="img")
    emb = str(tmp_path / "emb")
    encode([str(tmp_path / "data")], emb, fast_config("model.pooling=gem"))
    build_index(emb, str(tmp_path / "index"), lsh="none")
    query = sorted((tmp_path / "data" / "img-00000").glob("*/*.jpg"))[3]
    hits = search_image(SearchIndex.load(str(tmp_path / "index")), str(query), k=3)
    assert hits[0][0] == f"img-00000/{query.parent.name}/{query.stem}" and hits[0][1] > 0.999, hits
    assert main(["search", "--index", str(tmp_path / "index"), "--image", str(tmp_path / "nope.jpg")]) == 2
