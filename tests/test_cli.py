"""The `attnpipe run` demo end to end (sample -> encode -> index -> eval), CLI fail-fast behaviour, and the CLI's
conventions: a light --help, --version, shown defaults, --json on stdout vs log lines on stderr, -v/-q."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import attnpipe
from attnpipe.cli import build_parser, main


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_demo_end_to_end(ray_session, tmp_path, capsys):
    assert main(["run", "--json", "--workdir", str(tmp_path), "--n", "60", "--set", "data.image_size=64"]) == 0
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


HEAVY = ("torch", "torchvision", "ray", "faiss")


@pytest.mark.parametrize("argv", [["--help"], ["index", "--help"], ["encode", "--help"], ["--version"]])
def test_help_and_version_import_neither_torch_nor_ray(argv):
    """A fresh interpreter runs the CLI; what it imported is read back from ``sys.modules`` at exit."""
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('LOADED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)))\n"
        "from attnpipe.cli import main\n"
        f"main({argv!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = next(line for line in proc.stdout.splitlines() if line.startswith("LOADED="))
    assert loaded == "LOADED=", loaded
    if argv == ["--version"]:
        assert proc.stdout.startswith(f"attnpipe {attnpipe.__version__}")
    else:
        assert "-v, --verbose" in proc.stdout and ("--json" in proc.stdout or argv == ["--help"])


def test_every_command_shows_defaults_and_takes_json_and_verbosity():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"sample", "encode", "index", "search", "eval", "reindex", "train", "run"} <= set(sub.choices)
    for name, p in sub.choices.items():
        opts = p._option_string_actions
        assert {"--json", "-v", "-q"} <= set(opts), name
    text = " ".join(sub.choices["index"].format_help().split())  # argparse wraps lines at the terminal width
    assert "(default: 0.95)" in text and "default: simhash" in text and "(default: 128)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 400)" in " ".join(sub.choices["sample"].format_help().split())


def test_json_only_with_json_and_log_lines_on_stderr(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "a"), "--n", "4", "--shards", "1", "--image-size", "32"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "wrote 4 images in 1 tar shards" in out.err
    assert main(["sample", "--json", "--out", str(tmp_path / "b"), "--n", "4", "--shards", "1"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["images"] == 4 and len(summary["shards"]) == 1 and "wrote" not in out.err
    assert main(["-q", "sample", "--out", str(tmp_path / "c"), "--n", "4", "--shards", "1"]) == 0
    assert capsys.readouterr().err == ""  # -q: warnings and errors only
    assert main(["sample", "-q", "--out", str(tmp_path / "d"), "--n", "4", "--shards", "1"]) == 0
    assert capsys.readouterr().err == ""  # also after the command
    assert main(["-q", "index", "--embeddings", str(tmp_path), "--out", str(tmp_path / "i")]) == 2
    assert "not an attnpipe embeddings dataset" in capsys.readouterr().err  # errors survive -q


JOBS = {  # jobs/<script>.py -> the attnpipe command it runs
    "build_index": "index",
    "dedup": "dedup",
    "encode": "encode",
    "evaluate": "eval",
    "pipeline": "run",
    "reindex": "reindex",
    "train_head": "train",
    "verify": "verify",
}
REPO = Path(__file__).resolve().parents[1]


def test_every_ray_job_script_runs_its_command():
    """Each thin wrapper in jobs/ runs as a script (what ``ray job submit -- python jobs/X.py`` does) and reaches
    its command's parser; the jobs themselves run under ``ray job submit`` in test_job_submit.py/test_cluster.py."""
    assert sorted(p.stem for p in (REPO / "jobs").glob("*.py")) == sorted(JOBS)  # a new job needs an entry here
    for script, command in JOBS.items():
        args = [sys.executable, f"jobs/{script}.py", "--help"]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        assert proc.stdout.startswith(f"usage: attnpipe {command} "), (script, proc.stdout[:300])
