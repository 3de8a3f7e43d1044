"""cluster.yaml passes Ray's own cluster-config validation, offline.

`ray up` runs ``prepare_config`` (merge with the provider's defaults.yaml) then ``validate_config`` (ray-schema.json
plus cross-field checks) before it touches the cloud; both are pure functions, so the same pair runs here without
credentials or boto3. What comes after (``provider_cls.bootstrap_config``: key pairs, subnets, IAM) needs AWS and is
not covered.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _load() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load()


def test_validates_with_ray_schema(config: dict[str, Any]) -> None:
    prepared = _validate(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_has_a_gpu_worker_type_that_scales_to_zero(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    head = config["head_node_type"]
    gpu_workers = {name: t for name, t in types.items() if name != head and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_workers, f"no worker type with GPU resources in {sorted(types)}"
    for name, t in gpu_workers.items():
        assert t.get("min_workers", 0) == 0, f"{name} should scale to zero"
        assert t["max_workers"] >= 1, name
        assert t["max_workers"] <= config["max_workers"], name
    assert types[head].get("resources", {}).get("GPU", 0) == 0, "the head should not advertise GPUs"
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_setup_installs_the_mounted_repo(config: dict[str, Any]) -> None:
    assert config["file_mounts"].get("~/attnpipe") == ".", config["file_mounts"]
    commands = config["setup_commands"]
    assert any("pip install" in c and "~/attnpipe" in c for c in commands), commands
    # The Ray on the nodes must be the one `ray up` runs with, or the head rejects the client.
    import ray

    assert any(f"ray[data,default]=={ray.__version__}" in c for c in commands), commands


def test_every_node_starts_with_token_auth(config: dict[str, Any]) -> None:
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), (key, config[key])


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda c: c.update(not_a_ray_key=1), jsonschema.ValidationError, "'not_a_ray_key' was unexpected"),
        (
            lambda c: c["available_node_types"]["gpu_worker"].update(resource={"GPU": 1}),
            jsonschema.ValidationError,
            "'resource' was unexpected",
        ),
        (lambda c: c.update(idle_timeout_minutes=-1), jsonschema.ValidationError, "less than the minimum"),
        (lambda c: c.update(head_node_type="no_such_type"), ValueError, "head_node_type"),
        (
            lambda c: c.update(max_workers=0) or c["available_node_types"]["gpu_worker"].update(min_workers=1),
            ValueError,
            "sum of `min_workers`",
        ),
    ],
    ids=["unknown-top-level-key", "misspelt-node-type-key", "negative-idle-timeout", "bad-head-type", "min>max"],
)
def test_corrupted_copies_fail_validation(config: dict[str, Any], corrupt, error, match: str) -> None:
    # Proves the validator runs and is strict, so test_validates_with_ray_schema means something.
    bad = copy.deepcopy(config)
    corrupt(bad)
    with pytest.raises(error, match=match):
        _validate(bad)


def _header_submit_command() -> list[str]:
    """The `ray job submit` example in cluster.yaml's header comment, as argv (continuation lines joined)."""
    lines = [ln.removeprefix("#").strip() for ln in CLUSTER_YAML.read_text().splitlines() if ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if "ray job submit" in ln)
    text = ""
    for ln in lines[start:]:
        text += " " + ln.removesuffix("\\")
        if not ln.endswith("\\"):
            break
    return shlex.split(text)


def test_header_submits_a_gpu_encode_between_s3_uris() -> None:
    # The documented command is a real one: attnpipe's own parser and config loader accept it, it reads and writes
    # S3, and it asks for GPUs (what makes the autoscaler start gpu_worker nodes from zero).
    from attnpipe.cli import build_parser
    from attnpipe.config import EncodeConfig, load_config

    argv = _header_submit_command()
    entry = argv[argv.index("--") + 1 :]
    assert entry[:2] == ["python", "jobs/encode.py"], entry
    assert (CLUSTER_YAML.parent / entry[1]).is_file()
    args = build_parser().parse_args(["encode", *entry[2:]])
    assert all(u.startswith("s3://") for u in [*args.input, args.out]), (args.input, args.out)
    if "device" not in EncodeConfig.__dataclass_fields__:
        pytest.skip("encode.device is not a config key yet (being added)")
    cfg = load_config(args.config, args.overrides)
    assert cfg.encode.device == "cuda"
