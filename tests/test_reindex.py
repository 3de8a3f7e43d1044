"""Scheduled re-indexing on a real local Ray: change detection, partial re-encoding, incremental index updates,
retention, the lock, and kill -9 at any moment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from attnpipe import store
from attnpipe.cli import main
from attnpipe.config import ConfigError
from attnpipe.data.sample import make_sample
from attnpipe.encode import HOLD_ENV
from attnpipe.index.layout import current_version, versions
from attnpipe.index.search import SearchIndex
from attnpipe.lock import LockHeld, exclusive, read_owner
from attnpipe.reindex import KILL_ENV, LOCK, reindex
from tests.conftest import FAST, fast_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _shard_ids(index: SearchIndex) -> set[str]:
    return {i.split("/", 1)[0] for i in index.id_map[1]}


def test_reindex_added_changed_removed(ray_session, tmp_path):
    """5 shards x 300 images -> v1; then +1 shard, 1 rewritten in place, 1 deleted -> only 2 shards encoded."""
    data, emb, root = tmp_path / "data", str(tmp_path / "emb"), str(tmp_path / "index")
    make_sample(str(data), fmt="tar", n=1500, num_shards=5, image_size=48, seed=0)
    cfg = fast_config("data.image_size=32")
    first = reindex([str(data)], emb, root, cfg, factory="IVF16,Flat")
    assert first["added"] == [f"shard-{i:05d}" for i in range(5)] and first["version"] == "v1"
    assert first["vectors"] == 1500 and first["encoded_images"] == 1500 and first["index_update"] == "full"
    before = {r["id"]: r["embedding"] for r in store.read_embeddings(emb, ["id", "embedding"]).to_pylist()}

    make_sample(str(tmp_path / "new"), fmt="tar", n=300, num_shards=1, image_size=48, seed=5, prefix="extra")
    shutil.move(tmp_path / "new" / "extra-00000.tar", data / "extra-00000.tar")
    make_sample(str(tmp_path / "other"), fmt="tar", n=300, num_shards=1, image_size=48, seed=9)
    shutil.copy(tmp_path / "other" / "shard-00000.tar", data / "shard-00001.tar")  # same name, new content
    os.remove(data / "shard-00004.tar")
    second = reindex([str(data)], emb, root, cfg, factory="IVF16,Flat")
    assert (second["added"], second["changed"], second["removed"]) == (
        ["extra-00000"],
        ["shard-00001"],
        ["shard-00004"],
    )
    assert second["unchanged"] == ["shard-00000", "shard-00002", "shard-00003"]
    assert second["encoded_images"] == 600 and second["index_update"] == "incremental"
    assert second["version"] == "v2" and second["vectors"] == 1500

    live = SearchIndex.load(root)
    assert live.indexes[0].ntotal == 1500 and len(live.id_map[0]) == 1500
    assert _shard_ids(live) == {"extra-00000", "shard-00000", "shard-00001", "shard-00002", "shard-00003"}
    assert live.manifest["update"] == {
        "mode": "incremental",
        "base": "v1",
        "added_parts": 2,
        "removed_parts": 2,
        "added_vectors": 600,
        "removed_vectors": 600,
    }
    assert live.manifest["faiss"]["recall@10"] >= 0.9  # re-measured on the new version
    assert "shard-00004" in _shard_ids(SearchIndex.load(root, "v1"))  # the previous version is still there
    assert live.search_id("extra-00000/000007", 1)[0][0] == "extra-00000/000007"

    after = {r["id"]: r["embedding"] for r in store.read_embeddings(emb, ["id", "embedding"]).to_pylist()}
    assert len(after) == 1500 and not any(i.startswith("shard-00004/") for i in after)  # no orphan, no duplicate
    assert all(after[i] == before[i] for i in after if i.startswith("shard-00002/"))  # untouched: not re-encoded
    rewritten = {i for i in after if i.startswith("shard-00001/")}  # re-encoded from its new content (new keys)
    assert len(rewritten) == 300 and rewritten != {i for i in before if i.startswith("shard-00001/")}

    third = reindex([str(data)], emb, root, cfg, factory="IVF16,Flat")
    assert third["encoded_images"] == 0 and third["index_update"] == "none" and third["version"] == "v2"
    assert third["unchanged"] == sorted(second["added"] + second["changed"] + second["unchanged"])


@pytest.fixture()
def small(tmp_path):
    data = tmp_path / "data"
    make_sample(str(data), fmt="tar", n=120, num_shards=3, image_size=48, seed=0)
    return data, str(tmp_path / "emb"), str(tmp_path / "index")


def _cli(data, emb: str, root: str, *extra: str) -> list[str]:
    sets = [a for s in (*FAST, "data.image_size=32") for a in ("--set", s)]
    paths = ["--input", str(data), "--embeddings", emb, "--index", root]
    return ["reindex", "--json", *paths, "--lsh", "both", *sets, *extra]


def _spawn(args: list[str], **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.Popen(
        [sys.executable, "-m", "attnpipe.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        start_new_session=True,
    )


def _change(data) -> None:
    make_sample(str(data.parent / "more"), fmt="tar", n=40, num_shards=1, image_size=48, seed=3, prefix="more")
    shutil.move(data.parent / "more" / "more-00000.tar", data / "more-00000.tar")
    os.remove(data / "shard-00002.tar")


def test_sigkill_mid_encode_keeps_live_version_and_lock_refuses_a_second_run(ray_session, small):
    data, emb, root = small
    assert main(_cli(data, emb, root)) == 0
    _change(data)
    proc = _spawn(_cli(data, emb, root), **{HOLD_ENV: "1"})  # it pauses after its first shard commit: mid-encode
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "reindex: encoding" in line:  # the lock is held, encoding is in flight
            break
    try:
        assert any("reindex: encoding" in s for s in seen), "".join(seen)
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):  # a concurrent second reindex is refused
            reindex([str(data)], emb, root, fast_config("data.image_size=32"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    assert current_version(root) == "v1"
    live = SearchIndex.load(root)
    doomed = next(i for i in live.id_map[1] if i.startswith("shard-00002/"))  # its shard is being removed
    assert live.count == 120 and live.search_id(doomed, 1)[0][0] == doomed
    assert len(store.load_vectors(emb)[0]) == 120  # the dataset is the old one, whole

    done = reindex([str(data)], emb, root, fast_config("data.image_size=32"))  # takes the stale lock
    assert (done["added"], done["removed"], done["version"], done["vectors"]) == (
        ["more-00000"],
        ["shard-00002"],
        "v2",
        120,
    )
    assert done["index_update"] == "incremental"  # no --lsh given: the live version's "both" is kept
    assert not [d for d in os.listdir(root) if "staging" in d] and not os.path.exists(os.path.join(root, LOCK))
    assert not [f for f in os.listdir(emb) if f.startswith(".staging")]
    assert _shard_ids(SearchIndex.load(root)) == {"shard-00000", "shard-00001", "more-00000"}


def test_sigkill_after_embeddings_commit_index_catches_up(ray_session, small, capsys):
    """Killed between the embeddings commit and the index publish: the rerun encodes nothing and updates the index."""
    data, emb, root = small
    assert main(_cli(data, emb, root)) == 0
    _change(data)
    proc = _spawn(_cli(data, emb, root), **{KILL_ENV: "embeddings-committed"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert current_version(root) == "v1" and SearchIndex.load(root).count == 120
    assert {s["name"] for s in store.read_manifest(emb)["shards"]} == {"shard-00000", "shard-00001", "more-00000"}

    capsys.readouterr()
    assert main(_cli(data, emb, root)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded_images"] == 0 and summary["added"] == [] and summary["index_update"] == "incremental"
    assert summary["version"] == "v2" and summary["vectors"] == 120
    live = SearchIndex.load(root)
    assert _shard_ids(live) == {"shard-00000", "shard-00001", "more-00000"}
    hashes = np.load(os.path.join(live.manifest["path"], "lsh", "minhash.npy"))  # carried over + new, in id order
    assert len(hashes) == 120 and "simhash" in live.manifest["lsh"]


def test_model_change_needs_force_and_retention(ray_session, small, capsys):
    data, emb, root = small
    cfg = fast_config("data.image_size=32")
    reindex([str(data)], emb, root, cfg, keep=2)
    with pytest.raises(ConfigError, match=r"image_size=32 \(now 48\).*--force"):
        reindex([str(data)], emb, root, fast_config("data.image_size=48"))
    assert main(_cli(data, emb, root, "--set", "data.image_size=48")) == 2
    assert "--force" in capsys.readouterr().err
    forced = reindex([str(data)], emb, root, fast_config("data.image_size=48"), force=True, keep=2)
    assert forced["changed"] == ["shard-00000", "shard-00001", "shard-00002"] and forced["encoded_images"] == 120
    assert forced["index_update"] == "full" and forced["version"] == "v2"
    os.remove(data / "shard-00001.tar")
    third = reindex([str(data)], emb, root, fast_config("data.image_size=48"), keep=2)
    assert third["version"] == "v3" and third["pruned"] == ["v1"] and versions(root) == ["v2", "v3"]
    assert store.dataset_metadata(emb)["attnpipe.image_size"] == "48"


def test_lock_refuses_live_owner_and_takes_over_dead_one(tmp_path):
    path = str(tmp_path / "x.lock")
    held = pytest.raises(LockHeld, match=r"first \(pid \d+ on .*started")
    with exclusive(path, command="first"), held, exclusive(path, command="second"):
        pass
    assert not os.path.exists(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "token": "t"}, f)
    with exclusive(path, command="third") as owner:
        assert read_owner(path)["token"] == owner["token"]
    with open(path, "w") as f:  # another host, fresh heartbeat: alive as far as we can tell
        json.dump({"host": "elsewhere", "pid": 1, "started": "now", "token": "t"}, f)
    with pytest.raises(LockHeld), exclusive(path):
        pass
    os.utime(path, (1, 1))  # heartbeat long gone
    with exclusive(path, stale_after_s=60):
        pass


def test_cli_without_settings_reuses_the_config_saved_with_the_embeddings(ray_session, small, capsys):
    data, emb, root = small
    reindex([str(data)], emb, root, fast_config("data.image_size=32", "model.pooling=gem"))
    capsys.readouterr()
    assert main(["reindex", "--json", "--input", str(data), "--embeddings", emb, "--index", root]) == 0  # no --set
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert "using the config saved with the embeddings" in out.err
    assert summary["encoded_images"] == 0 and summary["index_update"] == "none" and summary["version"] == "v1"


def test_encode_overwrite_is_refused_while_a_reindex_holds_the_dataset(small, capsys):
    data, emb, _ = small
    os.makedirs(emb)
    with exclusive(os.path.join(emb, LOCK), command="attnpipe reindex (test)"):
        assert main(["encode", "--input", str(data), "--out", emb, "--overwrite"]) == 2
    assert "attnpipe reindex (test)" in capsys.readouterr().err and os.listdir(emb) == []


def test_missing_input_fails_before_creating_anything(tmp_path, capsys):
    emb, root = tmp_path / "emb", tmp_path / "index"
    args = ["reindex", "--input", str(tmp_path / "nope"), "--embeddings", str(emb), "--index", str(root)]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err and not emb.exists() and not root.exists()
