"""One real local Ray for the whole test session (Train, Data and Serve tests share it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """Ray on 127.0.0.1, token auth on, with 4 logical CPUs (2 real cores): room for Serve replicas and Train workers."""
    from pfstorer.ray_env import prepare_ray

    prepare_ray(local=True)
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
