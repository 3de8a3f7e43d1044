"""Shared fixtures: one local Ray for the whole session, and small sample datasets made by attnpipe itself."""

from __future__ import annotations

import os

import pytest

from attnpipe.config import load_config

# Small, fast settings for encoding in tests: real torchvision model with random weights.
FAST = ("model.backbone=resnet18", "data.image_size=64", "encode.batch_size=16", "encode.decode_batch_size=16")


def fast_config(*overrides: str):
    return load_config(None, [*FAST, *overrides])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session; the AWS environment points at it.

    Started before Ray (``ray_session`` depends on it) so Ray workers inherit the same AWS settings.
    """
    from tests import _s3_server

    server = _s3_server.start(str(tmp_path_factory.mktemp("s3")))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A real local Ray instance shared by every test that needs one (started once, stopped at the end)."""
    import ray

    from attnpipe.runtime import init_ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory) -> dict[str, str]:
    """The three shard formats plus a shard of broken members; keys are format names and 'broken'."""
    from attnpipe.data.sample import make_broken_shard, make_sample

    root = tmp_path_factory.mktemp("inputs")
    out = {}
    for fmt, n, shards in (("tar", 24, 2), ("folder", 10, 1), ("parquet", 14, 1)):
        make_sample(str(root / fmt), fmt=fmt, n=n, num_shards=shards, image_size=64, prefix=fmt)
        out[fmt] = str(root / fmt)
    os.makedirs(root / "broken")
    make_broken_shard(str(root / "broken"), fmt="tar", image_size=64)
    out["broken"] = str(root / "broken")
    return out
