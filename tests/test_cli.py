"""The `attnpipe run` demo end to end (sample -> encode -> index -> eval) and CLI fail-fast behaviour."""

from __future__ import annotations

import json

import pytest

from attnpipe.cli import main


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_demo_end_to_end(ray_session, tmp_path, capsys):
    assert main(["run", "--workdir", str(tmp_path), "--n", "60", "--set", "data.image_size=64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["embeddings"]["rows"] == 67 and out["embeddings"]["error"] == 5  # 60 + 7 in the broken shard
    assert out["index"]["count"] == 62 and out["index"]["version"] == "v1"
    assert {"exact", "faiss", "lsh"} <= set(out["eval"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    overall = metrics["attention"]["heads"]["attn"]["overall"]
    assert {"entropy", "box_mass", "pointing_game", "effective_area"} <= set(overall)
    assert set(metrics["attention"]["heads"]["attn"]["per_label"]) >= {"red_circle", "green_square"}
    assert (tmp_path / "eval" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["encode", "--input", "/nope", "--out", "/tmp/x"], "does not exist"),
        (["encode", "--input", "/tmp", "--out", "/tmp/x", "--set", "model.pooling=median"], "model.pooling"),
        (["index", "--embeddings", "/tmp", "--out", "/tmp/i"], "not an attnpipe embeddings dataset"),
        (["eval", "--embeddings", "/tmp", "--index", "/tmp", "--out", "/tmp/e", "--k", "0,x"], "--k expects"),
        (["search", "--index", "/tmp", "--id", "a/b"], "no CURRENT"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
