"""Where Ray comes from: the one place that reads ``RAY_ADDRESS`` and starts or joins a Ray instance.

``--ray-address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for its drivers) joins an existing cluster;
without either, attnpipe starts its own local instance explicitly instead of joining whatever head happens to run
on the machine.
"""

from __future__ import annotations

import logging
import os

import ray

from attnpipe.fs import AWS_ENV


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Start or join Ray once per process; a no-op when Ray is already initialized (tests, notebooks)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.WARNING if quiet else logging.INFO
    env = {k: os.environ[k] for k in AWS_ENV if os.environ.get(k)}
    # Workers get the driver's AWS settings (endpoint, keys, region), as every S3 tool reads them. A driver started
    # by `ray job submit` already runs in its job's runtime_env (set env_vars there: README "Running on a cluster").
    runtime_env = {"env_vars": env} if env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    if address and address != "local":
        ray.init(address=address, logging_level=level, runtime_env=runtime_env)
    else:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=level, runtime_env=runtime_env
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
