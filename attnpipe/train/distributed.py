"""``train.workers > 0``: the same :func:`~attnpipe.train.fit.fit` under Ray Train's ``TorchTrainer`` (Train V2 API).

The driver puts the :class:`~attnpipe.train.fit.Job` (decoded images, split, resume state) into the object store
once; each worker fetches it, computes the feature maps of its own slice (on its GPU when it has one), and trains a
DDP-wrapped model; ``ray.train.report`` carries each epoch's metrics (every rank reports, as Train requires). Workers
take one GPU each when the cluster has at least ``train.workers`` GPUs, otherwise they are CPU workers.

Rank 0 writes the checkpoints and the artifact itself, in the same format as the single-process path, so ``--out``
must be on storage the rank-0 worker can write and the driver can read (any path on one machine; a shared filesystem
on a multi-node cluster, as Ray Train asks of its own ``storage_path``). Progress lines are printed by the rank-0
worker; Ray forwards them to the driver's stderr with the worker's prefix.

Example::

    run_distributed(job, ray_address=None)   # blocks until training ends; raises TrainingFailedError on failure
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from attnpipe.train.checkpoint import checkpoint_dir
from attnpipe.train.fit import Job, fit, stderr_progress


def run_distributed(
    job: Job, ray_address: str | None = None, progress: Callable[[str], None] = stderr_progress
) -> dict:
    """Run ``job`` on ``job.cfg.train.workers`` Ray Train workers; returns the last reported metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from attnpipe.runtime import init_ray

    init_ray(ray_address)
    workers = job.cfg.train.workers
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    storage = os.path.abspath(checkpoint_dir(job.out))
    name = f"ray-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": ray.put(job), "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    try:
        result = trainer.fit()
    finally:
        shutil.rmtree(os.path.join(storage, name), ignore_errors=True)  # Ray Train's run state; ours is state.pt
    return dict(result.metrics or {})


def _worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    job = ray.get(config["job"])
    fit(
        job,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),
        ray.train.report,
        config["progress"],
    )
