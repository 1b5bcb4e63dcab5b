"""The model deployment: one base per replica, people's adapters hot-loaded into device slots.

``Restorer.restore`` takes a photo's encoded bytes and the multiplexed model id
``"tenant/identity"``, waits for its start in the replica's fair queue, decodes it, acquires the
person's adapter (index -> sha256-verified bytes -> host RAM -> device slot,
:mod:`serving.adapters`) and restores it, alone or in a cross-request batch
(:mod:`serving.batching`), stopping at the request's deadline or when the caller goes away.
Adapters whose person left the index are swept from host RAM and device slots.

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
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from ray import serve

from pfstorer.deadline import CancelledError, Deadline, DeadlineExceededError
from pfstorer.errors import AdapterMismatchError, PFStorerError
from pfstorer.settings import Settings
from registry.adapter_cache import HostAdapterCache, LoadStats
from serving.adapters import AdapterNotFound, AffinityLock, ResidentAdapter, SlotPool
from serving.api import check_budget, check_output, check_steps, status_of
from serving.batching import BatchItem, BatchStats, batch_signature, plan_runs
from serving.fair_share import FairShare, Lease, RunQueue
from serving.messages import Refused, Restored
from serving.metrics import AdapterMetrics
from serving.serve_compat import announce_loaded_models, clear_multiplexed_model_id, loaded_models

log = logging.getLogger("ray.serve")  # Serve's documented logger: replica log files, with request ids

__all__ = ["Restorer"]


def _assigned_cpus() -> float:
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        return 1.0


def device_failure(exc: BaseException) -> str | None:
    """What broke the device, if ``exc`` leaves it unusable (a CUDA error: the context stays
    poisoned, every later call fails too); None for errors of one request, out-of-memory included."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    text = str(exc)
    if type(exc).__name__ == "AcceleratorError" or "CUDA error" in text or "CUBLAS_STATUS" in text:
        return (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    return None


class Restorer:
    """One base model per replica; people's adapters hot-loaded into fixed device slots.

    Call it through a handle with ``.options(multiplexed_model_id="tenant/identity")`` (``""``:
    base only). The ingress resolves identities inside the caller's tenant before calling, so
    this deployment trusts the model id it is given (it is not routed to HTTP).

    Device slots: ``serve.adapter_slots`` for people plus one that stays zero (alpha = 0: the
    base model exactly), for base-only rows of a batch that also has people.
    """

    def __init__(self, settings: Settings) -> None:
        from pfstorer.images import ImageLimits
        from pfstorer.model import load_base
        from pfstorer.personalization import AdapterSlots
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
        self.slots = AdapterSlots.for_model(self.model, s.adapter_slots + 1)
        self.base_slot = s.adapter_slots  # never loaded: always zero
        self.pool = SlotPool(s.adapter_slots)
        self.batching = s.max_batch_size > 1
        self.batch_stats = BatchStats()
        self._restore_batched.set_max_batch_size(s.max_batch_size)
        self._restore_batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.stats = LoadStats()
        self.metrics = AdapterMetrics()
        self.host = HostAdapterCache(s.host_cache_adapters, self.stats)
        # read-only: MLflow stays off the request path
        self.registry = AdapterRegistry.from_settings(settings, read_only=True,
                                                      index_max_age_s=settings.serve.index_max_age_s)
        self.turns = AffinityLock(self._is_resident, max_skips=max(4, 2 * s.adapter_slots))
        self.share = FairShare(credit_s=s.fair_credit_s)
        self.queue = RunQueue(self.share, s.adapter_slots)
        # one thread per running request (and slot copies); FairShare lets one compute at a time
        self._torch = concurrent.futures.ThreadPoolExecutor(
            s.max_ongoing_requests + 2, thread_name_prefix="pfstorer-torch")
        self._io = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pfstorer-io")
        self._sweeper: asyncio.Task[None] | None = None
        self._fetched: dict[str, tuple[str, float]] = {}  # key -> (source, ms) of this turn's read
        self.requests = 0
        self.stopped = {"deadline": 0, "cancelled": 0}  # restores stopped before their end
        self.limits = ImageLimits(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels)
        self.forgotten = {"host": 0, "device": 0}  # adapters dropped because they left the index
        self.device_failed: str | None = None  # set by a CUDA error: check_health fails from then on

        async def load_resident(model_id: str) -> ResidentAdapter:
            return await self._load_resident(model_id)

        # max_num_models_per_replica comes from the settings, so the multiplexed loader is made
        # here (Serve detects multiplexed functions stored on the instance).
        self._multiplex_fn = load_resident
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.adapter_slots)(load_resident)

    # -- helpers ----------------------------------------------------------------------------
    async def _io_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _on_model(self, fn: Callable[[Lease], Any], tenants: Iterable[str],
                        deadline: Deadline | None = None) -> Any:
        """Run ``fn(lease)`` in a model thread holding the model for ``tenants`` (the lease is
        the work's checkpoint between tile batches). If the request is cancelled, cancel
        ``deadline`` (the work stops at its next tile batch) and still wait for the thread, so
        nothing outlives the request that started it."""

        def work() -> Any:
            with self.share.lease(tenants, deadline) as lease:
                return fn(lease)

        fut = asyncio.get_running_loop().run_in_executor(self._torch, work)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if deadline is not None:
                deadline.cancel()
            with contextlib.suppress(BaseException):
                await fut
            raise

    def _resident(self) -> dict[str, Any]:
        """The people in device slots (the multiplexed loader's LRU; empty before the first)."""
        return loaded_models(self._multiplex_fn) or {}

    def _is_resident(self, key: str) -> bool:
        return key in self._resident()

    async def _load_slot(self, slot: int, tensors: Any, key: str) -> None:
        """Copy an adapter into a device slot (on the model, as its tenant's work)."""
        await self._on_model(lambda _: self.slots.load(slot, tensors), [key.split("/", 1)[0]])

    def _entry(self, key: str) -> Any:
        from registry import parse_model_key

        try:
            tenant, identity = parse_model_key(key)
        except PFStorerError:
            raise AdapterNotFound() from None
        entry = self.registry.resolve(tenant, identity)
        if entry is None:
            raise AdapterNotFound()
        if entry.base_fingerprint and entry.base_fingerprint != self.fingerprint:
            raise AdapterMismatchError(
                f"the adapter of {entry.label} was trained on base {entry.base_fingerprint}, "
                f"but this server runs base {self.fingerprint} ({self.model.config.name})"
            )
        return entry

    def _verified(self, entry: Any) -> tuple[Any, str]:
        """Host-RAM tier lookup; a miss reads the store (sha256-verified, safetensors only)."""

        return self.host.get(
            entry.sha256, entry.key, lambda: self.registry.load_adapter(entry, self.model)
        )

    def _record_slot_load(self, key: str, t0: float) -> None:
        """Count a copy into a device slot as cold (this request read the adapter from the
        store) or warm (from host RAM); the time includes that read."""
        source, fetch_ms = self._fetched.pop(key, ("host", 0.0))
        kind = "store" if source == "store" else "host"
        ms = fetch_ms + (time.perf_counter() - t0) * 1e3
        self.stats.record(f"load_from_{kind}", ms)
        self.metrics.record(key, kind, ms / 1e3)

    async def _load_resident(self, key: str) -> ResidentAdapter:
        """The ``@serve.multiplexed`` loader: person -> a device slot (in-place copy)."""
        t0 = time.perf_counter()
        entry = await self._io_call(self._entry, key)
        adapter, _ = await self._io_call(self._verified, entry)
        slot = self.pool.take()
        try:
            await self._load_slot(slot, adapter.tensors, key)
        except BaseException:
            self.pool.give(slot)
            raise
        self._record_slot_load(key, t0)
        return ResidentAdapter(key=key, slot=slot, pool=self.pool, sha256=entry.sha256, label=entry.label)

    async def _acquire(self, key: str, entry: Any) -> ResidentAdapter:
        """The person's adapter in a device slot, current version (called holding the turn)."""
        for _ in range(3):
            was_resident = self._is_resident(key)
            resident: ResidentAdapter = await self.get_adapter(key)  # LRU: may evict and load
            if resident.released:  # evicted under us (not expected while holding the turn)
                continue
            if resident.sha256 != entry.sha256:  # new version published, or wiped by the sweeper
                t0 = time.perf_counter()
                adapter, _ = await self._io_call(self._verified, entry)
                await self._load_slot(resident.slot, adapter.tensors, key)
                resident.sha256, resident.label = entry.sha256, entry.label
                self._record_slot_load(key, t0)
            elif was_resident:
                self._fetched.pop(key, None)
                self.stats.record("device_hit")
                self.metrics.record(key, "device")
            self.metrics.holding(len(self._resident()), self.host.nbytes)
            return resident
        raise RuntimeError(f"could not keep an adapter slot for {key}")

    def _restore_sync(
        self, images_u8: list[torch.Tensor], slots: list[int] | None, seeds: list[int], strengths: list[float],
        p: dict[str, Any], lease: Lease,
    ) -> torch.Tensor:
        """Rows of one shape and parameters; row i with device slot ``slots[i]`` (None: all base).
        ``lease`` is checked before every tile batch: the deadline, and the model's fair share."""
        from pfstorer.sampling import restore_batch

        # uint8 in, uint8 out, as `pfstorer restore` does: the same bits as the offline CLI
        return restore_batch(
            self.model,
            torch.stack(images_u8),
            adapters=self.slots if slots is not None else None,
            slots=slots,
            seeds=seeds,
            strength=strengths,
            scale=float(p["scale"]),
            steps=int(p["steps"]),
            sampler=p["sampler"],
            t_start=int(p["t_start"]),
            tile=self.settings.serve.tile_size,
            tile_batch=self.settings.serve.tile_batch,
            color_fix=p["color_fix"],
            deadline=lease,
        )

    # -- forgetting (faces are biometric data) ---------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.serve.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("adapter sweep failed")

    def _current(self, keys: set[str]) -> dict[str, str]:
        """``tenant/identity`` -> sha256 in the index, for the people this replica holds only
        (lookups by key through the index's cache: a replica never reads whole tenants)."""
        out = {}
        for key in keys:
            tenant, _, identity = key.partition("/")
            entry = self.registry.index.get(tenant, identity)
            if entry is not None:
                out[key] = entry.sha256
        return out

    async def sweep(self) -> dict[str, int]:
        """Drop adapters whose person left the index (forgotten) from host RAM and device slots
        (slot tensors zeroed); returns counts. Runs every ``serve.sweep_interval_s`` on each replica."""
        held = set(self.host.keys()) | set(self._resident())
        current = await self._io_call(self._current, held)
        host = self.host.discard(lambda key, sha: current.get(key) == sha)
        wiped = 0
        resident = self._resident()
        if any(k not in current for k in list(resident)):
            async with self.turns.turn(""):
                # a running request's person is wiped at the next sweep, once it has ended
                for key in [k for k in list(resident) if k not in current and k not in self.queue.people]:
                    adapter = resident.pop(key, None)
                    if adapter is None:
                        continue
                    slot = adapter.slot
                    await self._on_model(lambda _, slot=slot: self.slots.clear(slot), [""])
                    adapter.sha256 = adapter.label = None
                    adapter.release()
                    wiped += 1
                announce_loaded_models(self._multiplex_fn)
        self.forgotten["host"] += host
        self.forgotten["device"] += wiped
        return {"host": host, "device": wiped}

    # -- batches --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # sizes set per replica in __init__
    async def _restore_batched(self, jobs: list[BatchItem]) -> list[dict[str, Any]]:
        """Run a batch of requests as few ``restore_batch`` calls as :func:`plan_runs` allows.

        Returns one dict per job (an ``"error"`` entry for a job that failed: its person's
        adapter could not be loaded, say), so one bad request never fails the others.
        """
        keys = [j.key for j in jobs]
        runs = plan_runs([(batch_signature(j.image.shape, j.params), j.key) for j in jobs], self.pool.size)
        self.batch_stats.record(keys, runs)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for run in runs:
            members = [jobs[i] for i in run]
            try:
                outs = await self._run(members)
            except Exception as exc:
                outs = [{"error": exc}] * len(members)
            for i, out in zip(run, outs, strict=True):
                results[i] = out
        return results

    async def _run(self, jobs: list[BatchItem]) -> list[dict[str, Any]]:
        """Rows of one signature with at most ``adapter_slots`` people, in one call.

        The run waits for its start (:class:`RunQueue`), acquires its people's slots holding
        the replica's turn, then computes in its own thread, sharing the model tile batch by tile
        batch with the other running requests. Its people stay in their slots until it ends:
        every acquisition first makes the running requests' people the most recently used, and
        they never outnumber the slots, so the LRU evicts somebody else."""
        entries = {j.key: j.entry for j in jobs if j.key}  # the newest entry of each person
        tenants = {j.tenant for j in jobs}
        failed: dict[str, Exception] = {}
        async with self.queue.start(tenants, entries):
            t1 = time.perf_counter()
            async with self.turns.turn(jobs[0].key):
                for key in self.queue.people - entries.keys():
                    if self._is_resident(key):
                        await self.get_adapter(key)  # resident: only its place in the LRU changes
                residents: dict[str, ResidentAdapter] = {}
                for key, entry in entries.items():
                    try:
                        residents[key] = await self._acquire(key, entry)
                    except Exception as exc:  # this person's rows fail, the others run
                        failed[key] = exc
            if any(r.released for r in residents.values()):
                raise RuntimeError("an adapter slot was evicted while its batch was being formed")
            rows = [j for j in jobs if j.key not in failed]
            images = None
            if rows:
                for j in rows:  # decoded only now: a waiting request holds its encoded bytes alone
                    if j.image is None:
                        j.image = await self._io_call(self._decode, j.data)
                slots = [residents[j.key].slot if j.key else self.base_slot for j in rows]
                deadline = Deadline.any_of([j.deadline for j in rows])
                work = functools.partial(
                    self._restore_sync,
                    [j.image for j in rows],
                    slots if residents else None,
                    [int(j.params["seed"]) for j in rows],
                    [float(j.params.get("strength", 1.0)) for j in rows],
                    rows[0].params,
                )
                try:
                    images = await self._on_model(work, {j.tenant for j in rows}, deadline)
                except (DeadlineExceededError, CancelledError) as exc:
                    self.stopped["cancelled" if isinstance(exc, CancelledError) else "deadline"] += 1
                    raise
                except PFStorerError:
                    raise
                except Exception as exc:
                    self.device_failed = self.device_failed or device_failure(exc)
                    raise
            t2 = time.perf_counter()
        row = iter(images if images is not None else ())
        out: list[dict[str, Any]] = []
        for j in jobs:
            if j.key in failed:
                out.append({"error": failed[j.key]})
                continue
            out.append({
                "image": next(row),
                "adapter": residents[j.key].label if j.key else "none",
                "queue_s": t1 - j.since,
                "compute_s": t2 - t1,
            })  # fmt: skip
        return out

    def _decode(self, data: bytes) -> torch.Tensor:
        from pfstorer.images import decode_image

        # straight to uint8: the photo crossed the object store encoded
        return decode_image(data, limits=self.limits, dtype=torch.uint8)

    async def _in_batch(self, job: BatchItem) -> dict[str, Any]:
        """Queue ``job`` for the next batch, outside its multiplexed model id (people mix)."""
        context = contextvars.copy_context()
        context.run(clear_multiplexed_model_id)
        task = asyncio.get_running_loop().create_task(self._restore_batched(job), context=context)
        return await task

    # -- API ------------------------------------------------------------------------------------
    async def restore(self, data: bytes, params: dict[str, Any]) -> Restored | Refused:
        """Restore one photo (its encoded bytes) for the person of the multiplexed model id.

        ``params["tenant"]``: whose request it is (the fair share); ``params["deadline_s"]``:
        seconds left for the work (the Gateway's request deadline); ``format``/``quality``: the
        output encoding. A problem of the request itself (a corrupt photo, an unknown person,
        its deadline) is answered with :class:`Refused`; exceptions are the server's faults.
        """
        try:
            return await self._restore(data, params)
        except PFStorerError as exc:
            return Refused(status_of(exc), str(exc))

    async def _restore(self, data: bytes, params: dict[str, Any]) -> Restored:
        from pfstorer.images import MEDIA_TYPES, encode_image, probe_image

        self._ensure_sweeper()
        self.requests += 1
        s = self.settings.serve
        deadline = Deadline(params.get("deadline_s"))
        key = serve.get_multiplexed_model_id() or ""
        # what the request leaves open, the base decides
        chosen = self.model.config.sampling.override(
            sampler=params.get("sampler"), steps=params.get("steps"), t_start=params.get("t_start"))
        params = {**params, **chosen.model_dump()}
        # the header is enough to refuse: the pixels are decoded once the request starts
        h, w = await self._io_call(functools.partial(probe_image, data, limits=self.limits, name="image"))
        out_h, out_w = check_output(h, w, params["scale"], self.limits.min_side)
        check_steps(chosen.steps, s.max_steps)
        check_budget(out_h * out_w, chosen.steps, s.max_pixel_steps)
        image = None
        if self.batching:  # a batch is formed by image size: decode now
            image = await self._io_call(self._decode, data)
        job = BatchItem(key, None, image, params, time.perf_counter(), deadline,
                        tenant=str(params.get("tenant") or ""), data=data)
        if key:
            job.entry = await self._io_call(self._entry, key)
            tf = time.perf_counter()
            _, source = await self._io_call(self._verified, job.entry)  # warm host RAM outside the turn
            if source == "store":
                self._fetched[key] = (source, (time.perf_counter() - tf) * 1e3)
        try:
            if self.batching:
                result = await self._in_batch(job)
            else:
                (result,) = await self._run([job])
        except asyncio.CancelledError:  # the caller went away: its share of the work stops
            deadline.cancel()
            raise
        if "error" in result:
            raise result["error"]
        fmt = str(params.get("format") or "png").upper()
        quality = int(params.get("quality") or s.output_quality)
        body = await self._io_call(encode_image, result["image"], fmt, quality)
        return Restored(body=body, media_type=MEDIA_TYPES[fmt], adapter=result["adapter"], base=self.fingerprint,
                        steps=params["steps"], queue_s=result["queue_s"], compute_s=result["compute_s"])

    def check_health(self) -> None:
        """Ray Serve's replica health check (every ``health_check_period_s``): a replica whose
        device failed is replaced. A missing adapter index is not a reason: that is readiness,
        and a new replica would not find the index either."""
        if self.device_failed is not None:
            raise RuntimeError(f"the replica's {self.device} failed: {self.device_failed}")

    async def ready(self) -> dict[str, Any]:
        """Model loaded (the constructor ran) and the adapter index present and readable."""
        self._ensure_sweeper()
        try:
            await self._io_call(self.registry.index.check)
        except Exception as exc:
            err = PFStorerError(f"adapter index {self.settings.index_url} is not readable: {exc}")
            err.status = 503
            raise err from None
        return {
            "ready": True,
            "base": self.fingerprint,
            "preset": self.model.config.name,
            "device": self.device,
            "adapter_slots": self.pool.size,
            "torch_threads": self.threads,
            "max_batch_size": self.settings.serve.max_batch_size,
            "compile": self.compile_mode,
        }

    async def get_stats(self) -> dict[str, Any]:
        """Counters for benchmarks and debugging (not routed to HTTP)."""
        return {
            "requests": self.requests,
            "adapters": self.stats.summary(),
            "resident": len(self._resident()),
            "free_slots": self.pool.free,
            "host_cached": len(self.host),
            "host_cached_bytes": self.host.nbytes,
            "affinity_lock": {"granted": self.turns.granted, "reordered": self.turns.reordered},
            "fair_share": {"handovers": self.share.handovers, "running": self.queue.running,
                           "waiting": self.queue.waiting},
            "batches": self.batch_stats.summary(),
            "forgotten": dict(self.forgotten),
            "stopped": dict(self.stopped),
            "torch_threads": self.threads,
        }
