"""The Ray Serve application: a FastAPI ingress (``Gateway``) in front of the model (``Restorer``).

::

    HTTP ─► Serve proxy ─► Gateway (FastAPI)                       Restorer (one base per replica)
                           auth: API key -> tenant                  @serve.multiplexed "tenant/identity"
                           limits: body, pixels, type, bomb         host-RAM LRU -> device slots
                           identity -> index (404 if not the        AffinityScheduler: one restore
                           caller's) ─► handle.options(                at a time, same person first
                           multiplexed_model_id="t/i") ───────────► restore_batch(...) -> PNG
                           503 + Retry-After on BackPressureError

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/restore`` - multipart ``image`` + form fields ``identity`` (none: base model only),
  ``scale``, ``steps``, ``seed``, ``strength``, ``color_fix``, ``sampler``, ``format``, ``quality``;
  answers PNG, JPEG or WebP (``format``, else ``Accept``) with headers
  ``X-PFStorer-Adapter: tenant/identity@version`` (or ``none``) and ``X-PFStorer-Base``.
- ``GET /v1/identities`` - the caller's tenant's people with an adapter.
- ``GET /healthz`` (liveness), ``GET /readyz`` (model loaded and adapter index readable).

Errors are JSON ``{"detail": "..."}``: 401 no/unknown key; 404 unknown identity (also another
tenant's - the same body); 408 body not sent within ``serve.body_timeout_s``; 409 adapter
trained on another base; 413 body or pixels over the limits (checked before reading/decoding) or
output pixels x steps over ``serve.max_pixel_steps``; 415 not an image; 400 corrupt image or bad
form; 422 bad parameter values; 429 + ``Retry-After`` when the tenant already has
``serve.max_tenant_requests`` in flight; 503 + ``Retry-After`` when the model's queue is full or
the adapter index is unreadable, 503 when a restore ran past ``serve.request_timeout_s`` (the work
is stopped between tile batches). A client that hangs up cancels its restore (logged, 499).

The Gateway reads only the photo's header (limits, budget); the encoded bytes cross to the model
replica, which decodes them straight to uint8 (ICC profiles converted to sRGB).

Outputs are those of ``pfstorer restore`` bit for bit for the same image, adapter, seed, steps,
scale, colour fix, ``--tile`` = ``serve.tile_size``, device and torch thread count (each replica
uses ``max(1, floor(its CPUs))`` threads) - with the default ``serve.max_batch_size`` of 1. Above
1, ``@serve.batch`` gathers waiting requests, people mixed, into one ``restore_batch`` call
(:mod:`serving.batching`); a row of a batch may then differ from its lone restore by float
rounding (1e-5 before the 8-bit PNG), which is why batching is opt-in.

``build_app(args)`` is the import path of the Serve config (``serving.app:build_app``); ``args``
are :class:`pfstorer.settings.Settings` overrides.
"""

import asyncio
import concurrent.futures
import contextlib
import collections
import contextvars
import dataclasses
import functools
import logging
import math
import time
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from pfstorer.deadline import CancelledError, Deadline, DeadlineExceededError
from pfstorer.errors import AdapterMismatchError, PFStorerError, TooLargeError
from pfstorer.settings import Settings
from serving.adapters import (
    NOT_FOUND_MESSAGE,
    AdapterNotFound,
    AffinityScheduler,
    HostAdapterCache,
    LoadStats,
    ResidentAdapter,
    SlotPool,
)
from serving.auth import ApiKeys, extract_key
from serving.batching import batch_signature, plan_runs
from serving.serve_compat import announce_loaded_models, clear_multiplexed_model_id, loaded_models

log = logging.getLogger("pfstorer.serving")

__all__ = [
    "APP_NAME",
    "Gateway",
    "RestoreParams",
    "Restorer",
    "api",
    "build_app",
    "build_application",
]

APP_NAME = "pfstorer"
MAX_STEPS = 1000
MAX_SCALE = 8.0
CLIENT_GONE = 499  # "client closed request": logged, never a 5xx
ADAPTER_HEADER = "X-PFStorer-Adapter"
BASE_HEADER = "X-PFStorer-Base"


# ---------------------------------------------------------------------------------------------
# API models
# ---------------------------------------------------------------------------------------------


class RestoreParams(BaseModel):
    """Form fields of ``POST /v1/restore`` (besides the ``image`` file)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored

    identity: str | None = Field(
        None,
        description="The person (of the caller's tenant) whose adapter to use; empty or absent: "
        "the base model only.",
        max_length=128,
    )
    scale: float = Field(1.0, gt=0, le=MAX_SCALE, description="Upscaling factor (super-resolution).")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="Denoising steps (default: the server's serve.default_steps, else the base's).",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed; the same seed gives the same PNG.")
    strength: float = Field(
        1.0, ge=0, le=1, description="How much of the person's adapter to apply (scales its gates alpha): "
        "0 is the base model bit for bit, 1 the adapter as trained.",
    )
    color_fix: Literal["wavelet", "adain", "none"] = Field(
        "wavelet", description="Match the input's colours after stitching the tiles."
    )
    sampler: Literal["ddim", "ddpm"] | None = Field(None, description="Diffusion sampler (default: the base's).")
    t_start: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="Timestep sampling starts from: below the schedule's length (1000) the LQ diffused "
        "to it, at 1000 pure noise (default: the base's).",
    )
    format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="Output format (default: from the Accept header, else png).",
    )
    quality: int | None = Field(
        None, ge=1, le=100, description="JPEG/WebP quality (default: the server's serve.output_quality).",
    )


class ErrorBody(BaseModel):
    detail: Any = Field(description="What went wrong (a sentence, or validation errors).")


class IdentityInfo(BaseModel):
    identity: str
    version: int = Field(description="Adapter version (MLflow registered-model version).")
    adapter: str = Field(description="tenant/identity@version, as in X-PFStorer-Adapter.")
    updated_at: str | None = None


class IdentityList(BaseModel):
    tenant: str
    identities: list[IdentityInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    detail: str | None = None
    base: str | None = Field(None, description="Base model fingerprint.")
    preset: str | None = None
    device: str | None = None
    adapter_slots: int | None = None
    torch_threads: int | None = None
    max_batch_size: int | None = Field(None, description="Requests restored together (1: alone).")
    compile: str | None = Field(None, description="torch.compile mode of the denoiser (None: eager).")
    busy: bool = False


def _restore_form_schema() -> dict[str, Any]:
    props: dict[str, Any] = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The photo (PNG, JPEG, WebP, AVIF, BMP or TIFF; HEIC with the heic extra).",
        }
    }
    for name, spec in RestoreParams.model_json_schema()["properties"].items():
        spec = dict(spec)
        spec.pop("title", None)
        if "anyOf" in spec:  # Optional[...] -> the non-null branch
            inner = next((s for s in spec.pop("anyOf") if s.get("type") != "null"), {})
            spec = {**inner, **spec}
        props[name] = spec
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": props}
                }
            },
        }
    }


def _err(status: int, description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


api = FastAPI(
    title="pfstorer",
    version="0.1.0",
    summary="Personalized face restoration (PFStorer, CVPR 2024) as a multi-tenant HTTP API.",
    description=(
        "Restore a degraded photo of a person with that person's own adapter on a shared base "
        "model. Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`; a key "
        "belongs to one tenant and reaches that tenant's people only."
    ),
    openapi_tags=[
        {"name": "restore", "description": "Restoration."},
        {"name": "identities", "description": "People with an adapter."},
        {"name": "health", "description": "Liveness and readiness probes."},
    ],
)
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key.")
_AUTH = [Depends(_bearer), Depends(_api_key)]  # parsed for the OpenAPI schema; checked below


def _json_error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _not_found() -> JSONResponse:
    return _json_error(404, NOT_FOUND_MESSAGE)


def check_budget(out_pixels: int, steps: int, limit: int) -> None:
    """Refuse a restore whose output pixels x denoising steps exceed ``limit`` (413)."""
    if out_pixels * steps > limit:
        raise TooLargeError(f"{out_pixels:,} output pixels x {steps} steps = {out_pixels * steps:,} is over the "
                            f"compute budget of {limit:,} pixel-steps per request (serve.max_pixel_steps)")


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception behind a Ray task error (``RayTaskError(cause)``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _error_response(exc: BaseException) -> JSONResponse:
    """A PFStorerError -> its HTTP answer (AdapterNotFound -> the one 404 body)."""
    if isinstance(exc, AdapterNotFound):
        return _not_found()
    status = 409 if isinstance(exc, AdapterMismatchError) else int(getattr(exc, "status", 400))
    return _json_error(status, str(exc))


# ---------------------------------------------------------------------------------------------
# the model deployment
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """One request waiting in the replica's batch queue."""

    key: str  # "tenant/identity", "" = base only
    entry: Any  # its adapter index entry (None for base only)
    image: torch.Tensor  # uint8 [3,H,W]
    params: dict[str, Any]
    since: float  # when the request reached the replica
    deadline: Deadline = dataclasses.field(default_factory=Deadline)


class BatchStats:
    """What the batch queue formed: batches, runs (one ``restore_batch`` call each), rows."""

    def __init__(self) -> None:
        self.batches = self.runs = self.rows = self.mixed_runs = self.largest_run = 0

    def record(self, keys: list[str], runs: list[list[int]]) -> None:
        self.batches += 1
        self.rows += len(keys)
        self.runs += len(runs)
        for run in runs:
            self.largest_run = max(self.largest_run, len(run))
            self.mixed_runs += len({keys[i] for i in run}) > 1

    def summary(self) -> dict[str, int]:
        return dict(vars(self))


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
        self.host = HostAdapterCache(s.host_cache_adapters, self.stats)
        # read-only: MLflow stays off the request path
        self.registry = AdapterRegistry.from_settings(settings, read_only=True,
                                                      index_max_age_s=settings.serve.index_max_age_s)
        self.scheduler = AffinityScheduler(self._is_resident, max_skips=max(4, 2 * s.adapter_slots))
        # every touch of the model or the slots happens on this one thread, in order
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pfstorer-torch")
        self._io = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pfstorer-io")
        self._sweeper: asyncio.Task[None] | None = None
        self._fetched: dict[str, tuple[str, float]] = {}  # key -> (source, ms) of this turn's read
        self.requests = 0
        self.stopped = {"deadline": 0, "cancelled": 0}  # restores stopped before their end
        self.limits = ImageLimits(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels)
        self.forgotten = {"host": 0, "device": 0}  # adapters dropped because they left the index

        async def load_resident(model_id: str) -> ResidentAdapter:
            return await self._load_resident(model_id)

        # max_num_models_per_replica comes from the settings, so the multiplexed loader is made
        # here (Serve detects multiplexed functions stored on the instance).
        self._multiplex_fn = load_resident
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.adapter_slots)(load_resident)

    # -- helpers ----------------------------------------------------------------------------
    async def _io_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _torch_call(self, fn: Any, *args: Any, deadline: Deadline | None = None) -> Any:
        """Run on the model thread; if the request is cancelled, cancel ``deadline`` (the work
        stops at its next tile batch) and still wait for it to finish, so the next holder of the
        turn never overlaps it."""
        fut = asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)
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
        self.stats.record(f"load_from_{kind}", fetch_ms + (time.perf_counter() - t0) * 1e3)

    async def _load_resident(self, key: str) -> ResidentAdapter:
        """The ``@serve.multiplexed`` loader: person -> a device slot (in-place copy)."""
        t0 = time.perf_counter()
        entry = await self._io_call(self._entry, key)
        adapter, _ = await self._io_call(self._verified, entry)
        slot = self.pool.take()
        try:
            await self._torch_call(self.slots.load, slot, adapter.tensors)
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
                await self._torch_call(self.slots.load, resident.slot, adapter.tensors)
                resident.sha256, resident.label = entry.sha256, entry.label
                self._record_slot_load(key, t0)
            elif was_resident:
                self._fetched.pop(key, None)
                self.stats.record("device_hit")
            return resident
        raise RuntimeError(f"could not keep an adapter slot for {key}")

    def _restore_sync(
        self, images_u8: list[torch.Tensor], slots: list[int] | None, seeds: list[int], strengths: list[float],
        p: dict[str, Any], deadline: Deadline,
    ) -> torch.Tensor:
        """Rows of one shape and parameters; row i with device slot ``slots[i]`` (None: all base)."""
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
            deadline=deadline,
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

    async def sweep(self) -> dict[str, int]:
        """Drop adapters whose person left the index (forgotten) from host RAM and device slots
        (slot tensors zeroed); returns counts. Runs every ``serve.sweep_interval_s`` on each replica."""
        entries = await self._io_call(self.registry.index.list)
        current = {e.key: e.sha256 for e in entries}
        host = self.host.discard(lambda key, sha: current.get(key) == sha)
        wiped = 0
        resident = self._resident()
        if any(k not in current for k in list(resident)):
            async with self.scheduler.turn(""):
                for key in [k for k in list(resident) if k not in current]:
                    adapter = resident.pop(key, None)
                    if adapter is None:
                        continue
                    await self._torch_call(self.slots.clear, adapter.slot)
                    adapter.sha256 = adapter.label = None
                    adapter.release()
                    wiped += 1
                announce_loaded_models(self._multiplex_fn)
        self.forgotten["host"] += host
        self.forgotten["device"] += wiped
        return {"host": host, "device": wiped}

    # -- batches --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # sizes set per replica in __init__
    async def _restore_batched(self, jobs: list[_Job]) -> list[dict[str, Any]]:
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

    async def _run(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """Rows of one signature with at most ``adapter_slots`` people, in one call, holding
        the turn from the first slot acquisition to the end (the slots stay pinned)."""
        entries = {j.key: j.entry for j in jobs if j.key}  # the newest entry of each person
        failed: dict[str, Exception] = {}
        async with self.scheduler.turn(jobs[0].key):
            t1 = time.perf_counter()
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
                slots = [residents[j.key].slot if j.key else self.base_slot for j in rows]
                deadline = Deadline.any_of([j.deadline for j in rows])
                try:
                    images = await self._torch_call(
                        self._restore_sync,
                        [j.image for j in rows],
                        slots if residents else None,
                        [int(j.params["seed"]) for j in rows],
                        [float(j.params.get("strength", 1.0)) for j in rows],
                        rows[0].params,
                        deadline,
                        deadline=deadline,
                    )
                except (DeadlineExceededError, CancelledError) as exc:
                    self.stopped["cancelled" if isinstance(exc, CancelledError) else "deadline"] += 1
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

    async def _in_batch(self, job: _Job) -> dict[str, Any]:
        """Queue ``job`` for the next batch, outside its multiplexed model id (people mix)."""
        context = contextvars.copy_context()
        context.run(clear_multiplexed_model_id)
        task = asyncio.get_running_loop().create_task(self._restore_batched(job), context=context)
        return await task

    # -- API ------------------------------------------------------------------------------------
    async def restore(self, data: bytes, params: dict[str, Any]) -> dict[str, Any]:
        """Restore one photo (its encoded bytes) for the person of the multiplexed model id.

        ``params["deadline_s"]``: seconds left for the work (the Gateway's request deadline);
        ``format``/``quality``: the output encoding. Returns the encoded image and timings.
        """
        from pfstorer.images import decode_image

        self._ensure_sweeper()
        self.requests += 1
        deadline = Deadline(params.get("deadline_s"))
        key = serve.get_multiplexed_model_id() or ""
        # straight to uint8 in an I/O thread: the photo crossed the object store encoded
        image_u8 = await self._io_call(functools.partial(decode_image, data, limits=self.limits, dtype=torch.uint8))
        # what the request leaves open, the base decides
        chosen = self.model.config.sampling.override(
            sampler=params.get("sampler"), steps=params.get("steps"), t_start=params.get("t_start"))
        params = {**params, **chosen.model_dump()}
        h, w = image_u8.shape[-2:]
        check_budget(round(h * params["scale"]) * round(w * params["scale"]), chosen.steps,
                     self.settings.serve.max_pixel_steps)
        job = _Job(key, None, image_u8, params, time.perf_counter(), deadline)
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
        from pfstorer.images import MEDIA_TYPES, encode_image

        fmt = str(params.get("format") or "png").upper()
        quality = int(params.get("quality") or self.settings.serve.output_quality)
        body = await self._io_call(encode_image, result.pop("image"), fmt, quality)
        return {"body": body, "media_type": MEDIA_TYPES[fmt], "base": self.fingerprint, "steps": params["steps"],
                **result}

    async def ready(self) -> dict[str, Any]:
        """Model loaded (the constructor ran) and the adapter index readable."""
        self._ensure_sweeper()
        try:
            await self._io_call(self.registry.index.refresh, True)
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
            "scheduler": {"granted": self.scheduler.granted, "reordered": self.scheduler.reordered},
            "batches": self.batch_stats.summary(),
            "forgotten": dict(self.forgotten),
            "stopped": dict(self.stopped),
            "torch_threads": self.threads,
        }


# ---------------------------------------------------------------------------------------------
# the ingress
# ---------------------------------------------------------------------------------------------


_ACCEPTED = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def _negotiate(accept: str | None) -> str:
    """png, jpeg or webp from an ``Accept`` header (highest q first, then order); png otherwise."""
    best, best_q = "png", 0.0
    for part in (accept or "").split(","):
        media, *opts = (x.strip() for x in part.split(";"))
        q = 1.0
        for o in opts:
            if o.startswith("q="):
                try:
                    q = float(o[2:])
                except ValueError:
                    q = 0.0
        fmt = _ACCEPTED.get(media.lower())
        if fmt is not None and q > best_q:
            best, best_q = fmt, q
    return best


async def _once(data: bytes):  # an async byte stream for the multipart parser
    yield data


@serve.ingress(api)
class Gateway:
    """HTTP ingress: auth, limits, tenant scoping, back-pressure; the model work is Restorer's."""

    def __init__(self, restorer: Any, settings: Settings) -> None:
        from pfstorer.images import ImageLimits
        from registry import AdapterRegistry

        self.restorer = restorer
        self.settings = settings
        self.keys = ApiKeys.configured(settings.serve.api_keys_file)
        # read-only: MLflow stays off the request path
        self.registry = AdapterRegistry.from_settings(settings, read_only=True,
                                                      index_max_age_s=settings.serve.index_max_age_s)
        s = settings.serve
        self.limits = ImageLimits(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels)
        self._latency_s = 1.0  # moving average of restore latency, for Retry-After
        self._inflight: collections.Counter[str] = collections.Counter()  # restores per tenant
        from pfstorer.presets import PRESETS

        preset = PRESETS.get(settings.base)  # a checkpoint base: the replica checks the budget itself
        self._preset_steps = preset.sampling.steps if preset is not None else 1

    # -- helpers ----------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str | None:
        return self.keys.tenant_for(extract_key(request.headers))

    @staticmethod
    def _unauthorized() -> JSONResponse:
        return _json_error(401, "missing or unknown API key", {"WWW-Authenticate": "Bearer"})

    def _retry_after(self) -> str:
        return str(int(min(60, max(1, math.ceil(self._latency_s)))))

    def _overloaded(self) -> JSONResponse:
        ra = self._retry_after()
        return _json_error(503, f"overloaded: too many requests queued; retry in {ra} s", {"Retry-After": ra})

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        """The body, within ``serve.max_upload_bytes`` and ``serve.body_timeout_s`` (408 after it:
        a stalled upload must not hold a request slot forever)."""
        from starlette.requests import ClientDisconnect

        limit = self.settings.serve.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return _json_error(400, "invalid Content-Length")
            if n > limit:  # refused before reading a byte
                return _json_error(413, f"request body is {n} bytes, over the limit of {limit}")
        body = bytearray()
        timeout = self.settings.serve.body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:  # chunked or lying uploads: stop reading
                        return _json_error(413, f"request body is over the limit of {limit} bytes")
        except TimeoutError:
            return _json_error(408, f"the request body did not arrive within {timeout:g} s", {"Connection": "close"})
        except ClientDisconnect:
            log.info("client disconnected during upload")
            return _json_error(CLIENT_GONE, "client disconnected during upload")
        return bytes(body)

    def _admit(self, tenant: str) -> JSONResponse | None:
        """Count the tenant's request in, or 429 if it already has its share in flight."""
        cap = self.settings.serve.max_tenant_requests
        if self._inflight[tenant] >= cap:
            ra = self._retry_after()
            return _json_error(429, f"too many requests in flight for this tenant (limit {cap}); retry in {ra} s",
                               {"Retry-After": ra})
        self._inflight[tenant] += 1
        return None

    def _release(self, tenant: str) -> None:
        self._inflight[tenant] -= 1
        if self._inflight[tenant] <= 0:
            del self._inflight[tenant]

    # -- endpoints ------------------------------------------------------------------------------
    @api.get("/healthz", tags=["health"], response_model=Health, summary="Liveness")
    async def healthz(self) -> Health:
        """The ingress is running (says nothing about the model: see /readyz)."""
        return Health(status="ok")

    @api.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        summary="Readiness",
        responses={503: {"model": Readiness, "description": "Model not loaded or index unreadable."}},
    )
    async def readyz(self) -> Any:
        """200 once a model replica has its base loaded and the adapter index is readable."""
        from ray.serve.exceptions import BackPressureError

        try:
            await asyncio.to_thread(self.registry.index.refresh, True)
        except Exception as exc:
            return JSONResponse(Readiness(ready=False, detail=f"adapter index unreadable: {exc}").model_dump(), 503)
        try:
            info = await asyncio.wait_for(self.restorer.ready.remote(), timeout=10)
        except BackPressureError:  # replicas exist and are busy: ready, just full
            return Readiness(ready=True, busy=True, detail="model replicas busy")
        except Exception as exc:
            detail = str(_unwrap(exc)) or type(exc).__name__
            return JSONResponse(Readiness(ready=False, detail=f"model not ready: {detail}").model_dump(), 503)
        return Readiness(**info)

    @api.get(
        "/v1/identities",
        tags=["identities"],
        response_model=IdentityList,
        dependencies=_AUTH,
        summary="People of the caller's tenant",
        responses={401: _err(401, "Missing or unknown API key.")},
    )
    async def identities(self, request: Request) -> Any:
        """Every person of the caller's tenant that has an adapter in the index."""
        tenant = self._tenant(request)
        if tenant is None:
            return self._unauthorized()
        entries = await asyncio.to_thread(self.registry.index.list, tenant)
        return IdentityList(
            tenant=tenant,
            identities=[
                IdentityInfo(
                    identity=e.identity,
                    version=e.version,
                    adapter=e.label,
                    updated_at=e.updated_at.isoformat() if e.updated_at else None,
                )
                for e in entries
            ],
        )

    @api.post(
        "/v1/restore",
        tags=["restore"],
        dependencies=_AUTH,
        summary="Restore a photo, with a person's adapter",
        response_class=Response,
        openapi_extra=_restore_form_schema(),
        responses={
            200: {
                "content": {m: {"schema": {"type": "string", "format": "binary"}}
                            for m in ("image/png", "image/jpeg", "image/webp")},
                "description": "The restored image: PNG, JPEG or WebP (the `format` field, else `Accept`).",
                "headers": {
                    ADAPTER_HEADER: {
                        "description": "Adapter used: tenant/identity@version, or none.",
                        "schema": {"type": "string"},
                    },
                    BASE_HEADER: {"description": "Base model fingerprint.", "schema": {"type": "string"}},
                },
            },
            400: _err(400, "Corrupt image or malformed form."),
            401: _err(401, "Missing or unknown API key."),
            404: _err(404, "Unknown identity (also: another tenant's)."),
            408: _err(408, "The request body did not arrive within serve.body_timeout_s."),
            409: _err(409, "The adapter was trained on a different base model."),
            413: _err(413, "Body or image over the size/pixel limits (refused before decoding), or output "
                      "pixels x steps over the compute budget (serve.max_pixel_steps)."),
            415: _err(415, "Not a supported image type (HEIC needs the heic extra), or not multipart/form-data."),
            422: _err(422, "Invalid parameter values or adapter."),
            429: {
                "model": ErrorBody,
                "description": "This tenant already has serve.max_tenant_requests restores in flight.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            },
            503: {
                "model": ErrorBody,
                "description": "Overloaded, the adapter index unreadable, or the restore ran past its "
                "deadline (serve.request_timeout_s) and was stopped.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            },
        },
    )
    async def restore(self, request: Request) -> Response:
        """Restore one photo. With ``identity``, the person's adapter (of the caller's tenant)
        is used; without, the base model alone. Images of any size are restored in tiles, within
        the server's compute budget and deadline."""
        tenant = self._tenant(request)  # before reading the body
        if tenant is None:
            return self._unauthorized()
        refused = self._admit(tenant)
        if refused is not None:
            return refused
        try:
            return await self._restore(request, tenant, time.monotonic())
        finally:
            self._release(tenant)

    async def _restore(self, request: Request, tenant: str, arrived: float) -> Response:
        from pfstorer.images import probe_image
        from pfstorer.sampling import MAX_OUTPUT_PIXELS
        from registry import is_safe_key, model_key
        from ray.serve.exceptions import BackPressureError
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return _json_error(415, "send multipart/form-data with an 'image' file field")
        body = await self._read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            form = await MultiPartParser(
                request.headers, _once(body), max_files=1, max_fields=16, max_part_size=64 * 1024
            ).parse()
        except (MultiPartException, ValueError, KeyError) as exc:
            return _json_error(400, f"malformed multipart body: {exc}")
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return _json_error(422, "the form needs an 'image' file field")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str) and v != ""}
            try:
                params = RestoreParams.model_validate(fields)
            except ValidationError as exc:
                errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
                return _json_error(422, errors)
            data = await upload.read()
        finally:
            await form.close()

        key = ""
        if params.identity:
            if not is_safe_key(params.identity):
                return _not_found()
            try:
                entry = await asyncio.to_thread(self.registry.resolve, tenant, params.identity)
            except Exception as exc:  # a damaged or missing index file: the server's problem, for now
                log.warning("adapter index unreadable: %s", exc)
                return _json_error(503, "the adapter index is not readable right now; retry later",
                                   {"Retry-After": self._retry_after()})
            if entry is None:  # nonexistent or another tenant's: the same answer
                return _not_found()
            key = model_key(tenant, params.identity)
        try:  # the header only: the photo crosses to the model encoded, and is decoded there
            h, w = await asyncio.to_thread(probe_image, data, limits=self.limits, name="image")
        except PFStorerError as exc:
            return _error_response(exc)
        s = self.settings.serve
        out_px = round(h * params.scale) * round(w * params.scale)
        if out_px > MAX_OUTPUT_PIXELS:
            return _json_error(413, f"output of {w}x{h} at scale {params.scale} would be too large")
        try:
            check_budget(out_px, params.steps or s.default_steps or self._preset_steps, s.max_pixel_steps)
        except PFStorerError as exc:
            return _error_response(exc)
        p = params.model_dump()
        p["steps"] = params.steps or s.default_steps
        p["format"] = params.format or _negotiate(request.headers.get("accept"))
        p["deadline_s"] = max(0.0, s.request_timeout_s - (time.monotonic() - arrived))
        t0 = time.perf_counter()
        response = self.restorer.options(multiplexed_model_id=key).restore.remote(data, p)
        try:
            result = await response
        except asyncio.CancelledError:  # the client hung up: stop the model's work too
            response.cancel()
            log.info("client disconnected; restore cancelled")
            raise
        except BackPressureError:
            return self._overloaded()
        except Exception as exc:
            cause = _unwrap(exc)
            if isinstance(cause, BackPressureError):
                return self._overloaded()
            if isinstance(cause, PFStorerError):
                return _error_response(cause)
            from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

            if isinstance(cause, RequestCancelledError):
                return _json_error(CLIENT_GONE, "request cancelled")
            if isinstance(cause, DeploymentUnavailableError):
                ra = self._retry_after()
                return _json_error(503, "model unavailable", {"Retry-After": ra})
            log.exception("restore failed")
            return _json_error(500, "internal error")
        elapsed = time.perf_counter() - t0
        self._latency_s = 0.8 * self._latency_s + 0.2 * elapsed
        return Response(
            content=result["body"],
            media_type=result["media_type"],
            headers={
                ADAPTER_HEADER: result["adapter"],
                BASE_HEADER: result["base"],
                "X-PFStorer-Seed": str(params.seed),
                "X-PFStorer-Steps": str(result["steps"]),
                "Server-Timing": f"queue;dur={result['queue_s'] * 1e3:.1f}, "
                f"restore;dur={result['compute_s'] * 1e3:.1f}, total;dur={elapsed * 1e3:.1f}",
                "Cache-Control": "no-store",
                "Vary": "Accept",
            },
        )


# ---------------------------------------------------------------------------------------------
# application
# ---------------------------------------------------------------------------------------------


def build_application(settings: Settings) -> Any:
    """The Serve application for ``settings`` (``serve.run(build_application(s))``)."""
    from ray.serve.config import BackpressureConfig

    s = settings.serve
    ApiKeys.configured(s.api_keys_file)  # fail here, not in a replica, if no keys are configured
    opts = s.deployment_options()
    retry = BackpressureConfig(retry_after_s=1)
    restorer = serve.deployment(Restorer, name="Restorer").options(backpressure_config=retry, **opts)
    per_replica = s.max_ongoing_requests + max(s.max_queued_requests, 0)
    replicas = s.autoscaling.max_replicas if s.autoscaling is not None else s.num_replicas
    gateway = serve.deployment(Gateway, name="Gateway").options(
        num_replicas=1,
        # room for everything the model deployment may queue, plus the requests it rejects fast
        max_ongoing_requests=max(64, 4 * per_replica * replicas),
        max_queued_requests=-1,
        backpressure_config=retry,
        ray_actor_options={"num_cpus": min(0.25, s.num_cpus) if s.num_cpus else 0},
    )
    return gateway.bind(restorer.bind(settings), settings)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve config entry point (``import_path: serving.app:build_app``): ``args`` are
    :class:`~pfstorer.settings.Settings` overrides (e.g. ``base``, ``index_url``, ``serve``)."""
    return build_application(Settings.load(**dict(args or {})))
