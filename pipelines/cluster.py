"""Joining or starting Ray, and waiting for the workers a job needs.

``pfstorer run``, ``manifest validate`` and ``restore-batch`` either join a cluster (the
``ray_address`` setting, or ``RAY_ADDRESS`` as ``ray job submit`` sets it) or start a private Ray
on 127.0.0.1. A cluster may start with a 0-CPU head and grow (autoscaling, or pods joining late):
a job asks the autoscaler for what it needs and waits, saying so, up to ``worker_wait_s``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from pfstorer.errors import PFStorerError
from pfstorer.ray_env import prepare_ray

__all__ = ["check_capacity", "cluster_address", "ensure_ray", "using_ray", "wait_for_workers"]

SAY_EVERY_S = 10.0


def cluster_address(settings: Any | None = None) -> str | None:
    """The cluster to join: ``settings.ray_address``, else ``$RAY_ADDRESS``; None: start one here
    (with ``address="local"``: a Ray of its own, never one it happens to find on the machine)."""
    return getattr(settings, "ray_address", None) or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(settings: Any) -> bool:
    """Join :func:`cluster_address` or start a local Ray on 127.0.0.1; True if this call
    initialised Ray (the caller shuts it down). On a cluster, workers' logs go to the driver's
    output, so ``ray job logs`` shows their tracebacks. Token authentication is on either way
    (:func:`pfstorer.ray_env.prepare_ray`)."""
    address = cluster_address(settings)
    prepare_ray(local=not address)
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


def shutdown_ray() -> None:
    """Disconnect from Ray (and stop it, if this process started it)."""
    import ray

    ray.shutdown()


@contextlib.contextmanager
def using_ray(settings: Any) -> Iterator[None]:
    """Ray for the length of a command: :func:`ensure_ray`, then shut down if started here."""
    started = ensure_ray(settings)
    try:
        yield
    finally:
        if started:
            shutdown_ray()


def wait_for_workers(
    cpus: float,
    gpus: float = 0.0,
    *,
    timeout_s: float,
    poll_s: float = 1.0,
    bundles: list[dict[str, float]] | None = None,
) -> float:
    """Block until the cluster has ``cpus`` CPUs and ``gpus`` GPUs in all, asking the autoscaler
    for ``bundles`` (default: one bundle of everything); return the seconds waited.

    Says what it waits for on stderr every few seconds; raises :class:`PFStorerError` with what
    the cluster has after ``timeout_s``.
    """
    import ray

    t0 = time.monotonic()
    said = None
    asked = False
    try:
        while True:
            have = ray.cluster_resources()
            have_cpus, have_gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
            if have_cpus >= cpus and have_gpus >= gpus:
                return time.monotonic() - t0
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                raise PFStorerError(
                    f"the Ray cluster has {have_cpus:g} CPUs and {have_gpus:g} GPUs after {waited:.0f} s "
                    f"of waiting; this job needs {cpus:g} CPUs and {gpus:g} GPUs: add worker nodes, ask for "
                    "fewer (--workers, --cpus-per-worker) or wait longer (setting worker_wait_s)"
                )
            if not asked:
                _request(bundles or [{"CPU": cpus, "GPU": gpus}])
                asked = True
            if said is None or time.monotonic() - said >= SAY_EVERY_S:
                print(
                    f"waiting for workers to join: {have_cpus:g}/{cpus:g} CPUs, {have_gpus:g}/{gpus:g} GPUs "
                    f"({waited:.0f} s of at most {timeout_s:.0f} s)",
                    file=sys.stderr, flush=True,
                )
                said = time.monotonic()
            time.sleep(poll_s)
    finally:
        if asked:
            _request([])  # the job's own tasks and placement groups hold the nodes from here


def _request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for ``bundles`` ([]: withdraw); a cluster without one ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])
    except Exception:  # no autoscaler (a fixed cluster): joining nodes are all we can wait for
        pass


def check_capacity(settings: Any) -> None:
    """Make sure the Ray in use can hold the run's Train workers (``workers`` x
    ``cpus_per_worker``/``gpus_per_worker``): a joined cluster is waited for (it may grow), a
    Ray started on this machine is refused at once (it cannot)."""
    import ray

    cpus = settings.workers * settings.cpus_per_worker
    gpus = settings.workers * settings.gpus_per_worker
    if cluster_address(settings):
        bundle = {"CPU": settings.cpus_per_worker, "GPU": settings.gpus_per_worker}
        wait_for_workers(cpus, gpus, timeout_s=settings.worker_wait_s, bundles=[bundle] * settings.workers)
        return
    have = ray.cluster_resources().get("CPU", 0)
    if cpus > have:
        raise PFStorerError(
            f"{settings.workers} workers x {settings.cpus_per_worker:g} CPUs need {cpus:g} CPUs; "
            f"this machine's Ray has {have:g}: lower --workers or --cpus-per-worker"
        )
