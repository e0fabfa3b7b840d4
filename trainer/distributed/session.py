"""The Ray a run uses: the one this process is connected to, a cluster, or an embedded Ray
bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os

import ray

from trainer.config import DistributedConfig

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only():
    """Ray processes started inside bind 127.0.0.1 (restored on exit).

    Ray advertises the machine's network address even for a local instance; the setting it
    uses on Windows/macOS (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the Ray processes
    it starts and, already imported, by this one) makes it use the loopback address instead.
    Both are restored when Ray is shut down. Token authentication stays on: ``RAY_AUTH_MODE``
    is left as it is, and unset it is Ray's default for a cluster that ``ray.init`` starts
    (token in ``~/.ray/auth_token``, generated when missing; tests/deployment/test_ray_auth.py).
    """
    from ray._private import ray_constants

    old_env = os.environ.get(LOOPBACK_ENV)
    old_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = old_env


@contextlib.contextmanager
def local_ray(num_cpus: int, **init_kwargs):
    """An embedded Ray on this machine only (:func:`loopback_only`), shut down on exit."""
    with loopback_only():
        ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def ray_session(dist_cfg: DistributedConfig):
    """Use the Ray this process is connected to; else connect to ``ray_address`` (or the
    ``RAY_ADDRESS`` of a submitted job); else start an embedded Ray on 127.0.0.1 with this
    machine's CPUs. Disconnects (and stops the embedded Ray) on exit if it connected."""
    if ray.is_initialized():
        yield
        return
    address = dist_cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    cpus = os.cpu_count() or 1
    logger.info("starting an embedded Ray with %d CPUs on 127.0.0.1", cpus)
    with local_ray(cpus, log_to_driver=True):
        yield
