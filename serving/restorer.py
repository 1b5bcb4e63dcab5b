"""The model deployment: one base per replica, people's adapters hot-loaded into device slots.

``Restorer.restore`` takes a photo's encoded bytes and the multiplexed model id
``"tenant/identity"``, waits for its start in the replica's fair queue, decodes it, acquires the
person's adapter (index -> sha256-verified bytes -> host RAM -> device slot,
:mod:`serving.adapters`) and restores it, alone or in a cross-request batch
(:mod:`serving.batching`), stopping at the request's deadline or when the caller goes away.
Adapters whose person left the index are swept from host RAM and device slots.

The deployment is in the shape of Ray Serve's model-multiplexing example: ``__init__``, the
multiplexed adapter getter, ``restore``, ``ready`` and ``check_health``. Which people a replica
holds is :mod:`serving.resident`; how admitted requests run is :mod:`serving.runner`.

No tenant can slow another (:mod:`serving.fair_share`): each running request computes in its own
thread and the model passes between them at every tile batch, to the tenant that has used the
least model time; a tenant's own requests run one after another. A request's errors come back
as a :class:`~serving.messages.Refused` answer, never as an exception (:mod:`serving.messages`).

Outputs are those of ``pfstorer restore`` bit for bit for the same image, adapter, seed, steps,
scale, colour fix, ``--tile`` = ``serve.tile_size``, device and torch thread count (each replica
uses ``max(1, floor(its CPUs))`` threads) - with the default ``serve.max_batch_size`` of 1. Above
1, ``@serve.batch`` gathers waiting requests, people mixed, into one ``restore_batch`` call
(:mod:`serving.batching`); a row of a batch may then differ from its lone restore by float
rounding (1e-5 before the 8-bit PNG), which is why batching is opt-in.
"""

import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import Any

import torch
from ray import serve

from pfstorer.deadline import Deadline
from pfstorer.errors import PFStorerError
from pfstorer.settings import Settings
from serving.adapters import ResidentAdapter
from serving.api import check_budget, check_output, check_steps, status_of
from serving.batching import BatchItem
from serving.fair_share import FairShare, ModelThreads, RunQueue
from serving.messages import Refused, RestoreRequest, Restored
from serving.resident import ResidentAdapters
from serving.runner import Runner

log = logging.getLogger("ray.serve")  # Serve's documented logger: replica log files, with request ids

__all__ = ["Restorer"]


def _assigned_cpus() -> float:
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        return 1.0


class Restorer:
    """One base model per replica; people's adapters hot-loaded into fixed device slots.

    Call it through a handle with ``.options(multiplexed_model_id="tenant/identity")`` (``""``:
    base only). The ingress resolves identities inside the caller's tenant before calling, so
    this deployment trusts the model id it is given (it is not routed to HTTP).
    """

    def __init__(self, settings: Settings) -> None:
        from pfstorer.model import load_base
        from registry import AdapterRegistry

        self.settings = settings
        s = settings.serve
        self.threads = max(1, int(_assigned_cpus()))
        torch.set_num_threads(self.threads)
        want = settings.device
        self.device = "cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.model = load_base(settings.base, weights=settings.base_weights, device=self.device)
        self.fingerprint = self.model.fingerprint  # computed once, here
        self.compile_mode = s.compile_mode(self.device)
        if self.compile_mode is not None:  # compiled on the first request; tiles padded to one shape
            self.model.compile_denoiser(mode=self.compile_mode)
        self.limits = settings.limits.restores(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels)
        self._io = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pfstorer-io")
        share = FairShare(credit_s=s.fair_credit_s)
        # one thread per running request (and slot copies); FairShare lets one compute at a time
        model_threads = ModelThreads(share, s.max_ongoing_requests + 2)
        registry = AdapterRegistry.from_settings(settings, read_only=True, index_max_age_s=s.index_max_age_s)
        self.adapters = ResidentAdapters(settings, self.model, registry, on_model=model_threads.run, io=self._io_call)
        self.runner = Runner(settings, self.model, self.adapters, model_threads, RunQueue(share, s.adapter_slots),
                             limits=self.limits, io=self._io_call)
        self.requests = 0

        async def load_resident(model_id: str) -> ResidentAdapter:
            return await self.adapters.load(model_id)

        # max_num_models_per_replica comes from the settings, so the multiplexed getter is made
        # here (Serve detects multiplexed functions stored on the instance).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.adapter_slots)(load_resident)
        self.adapters.bind(load_resident, self.get_adapter)

    async def _io_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _start_sweeper(self) -> None:
        self.adapters.ensure_sweeper(lambda: self.runner.queue.people)

    async def restore(self, data: bytes, request: RestoreRequest) -> Restored | Refused:
        """Restore one photo (its encoded bytes) for the person of the multiplexed model id.

        A problem of the request itself (a corrupt photo, an unknown person, its deadline) is
        answered with :class:`Refused`; exceptions are the server's faults.
        """
        try:
            return await self._restore(data, request)
        except PFStorerError as exc:
            return Refused(status_of(exc), str(exc))

    async def _restore(self, data: bytes, request: RestoreRequest) -> Restored:
        from pfstorer.images import MEDIA_TYPES, encode_image, probe_image

        self._start_sweeper()
        self.requests += 1
        s = self.settings.serve
        deadline = Deadline(request.deadline_s)
        key = serve.get_multiplexed_model_id() or ""
        # what the request leaves open, the base decides; the tiles are the server's
        o = request.options
        chosen = self.model.config.sampling.override(sampler=o.sampler, steps=o.steps, t_start=o.t_start,
                                                     color_fix=o.color_fix)
        options = o.model_copy(update={**chosen.model_dump(), "tile": s.tile_size, "overlap": None})
        # the header is enough to refuse: the pixels are decoded once the request starts
        h, w = await self._io_call(functools.partial(probe_image, data, limits=self.limits, name="image"))
        out_h, out_w = check_output(h, w, options.scale, self.limits.min_side)
        check_steps(chosen.steps, s.max_steps)
        check_budget(out_h * out_w, chosen.steps, s.max_pixel_steps)
        image = None
        if self.runner.batching:  # a batch is formed by image size: decode now
            image = await self._io_call(self.runner.decode, data)
        job = BatchItem(key, None, image, options, time.perf_counter(), deadline, tenant=request.tenant, data=data)
        if key:
            job.entry = await self.adapters.prefetch(key)  # host RAM warmed outside the turn
        try:
            done = await self.runner.submit(job)
        except asyncio.CancelledError:  # the caller went away: its share of the work stops
            deadline.cancel()
            raise
        fmt = request.format.upper()
        body = await self._io_call(encode_image, done.image, fmt, request.quality or s.output_quality)
        return Restored(body=body, media_type=MEDIA_TYPES[fmt], adapter=done.adapter, base=self.fingerprint,
                        steps=chosen.steps, queue_s=done.queue_s, compute_s=done.compute_s)

    def check_health(self) -> None:
        """Ray Serve's replica health check (every ``health_check_period_s``): a replica whose
        device failed is replaced. A missing adapter index is not a reason: that is readiness,
        and a new replica would not find the index either."""
        if self.runner.device_failed is not None:
            raise RuntimeError(f"the replica's {self.device} failed: {self.runner.device_failed}")

    async def ready(self) -> dict[str, Any]:
        """Model loaded (the constructor ran) and the adapter index present and readable."""
        self._start_sweeper()
        try:
            await self._io_call(self.adapters.registry.index.check)
        except Exception as exc:
            err = PFStorerError(f"adapter index {self.settings.index_url} is not readable: {exc}")
            err.status = 503
            raise err from None
        return {
            "ready": True,
            "base": self.fingerprint,
            "preset": self.model.config.name,
            "device": self.device,
            "adapter_slots": self.adapters.pool.size,
            "torch_threads": self.threads,
            "max_batch_size": self.settings.serve.max_batch_size,
            "compile": self.compile_mode,
        }

    async def sweep(self) -> dict[str, int]:
        """Forget now the adapters whose person left the index (it also runs every
        ``serve.sweep_interval_s``); returns how many were dropped from host RAM and device slots."""
        return await self.adapters.sweep(lambda: self.runner.queue.people)

    async def get_stats(self) -> dict[str, Any]:
        """Counters for benchmarks and debugging (not routed to HTTP)."""
        a, r = self.adapters, self.runner
        return {
            "requests": self.requests,
            "adapters": a.stats.summary(),
            "resident": len(a.resident()),
            "free_slots": a.pool.free,
            "host_cached": len(a.host),
            "host_cached_bytes": a.host.nbytes,
            "affinity_lock": {"granted": a.turns.granted, "reordered": a.turns.reordered},
            "fair_share": {"handovers": r.threads.share.handovers, "running": r.queue.running,
                           "waiting": r.queue.waiting},
            "batches": r.batch_stats.summary(),
            "forgotten": dict(a.forgotten),
            "stopped": dict(r.stopped),
            "torch_threads": self.threads,
        }
