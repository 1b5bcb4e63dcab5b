"""The HTTP ingress: API key -> tenant, limits, tenant scoping, back-pressure.

The Gateway reads only the photo's header (limits, compute budget) and forwards the encoded
bytes to a ``Restorer`` replica chosen by the multiplexed model id ``"tenant/identity"``; an
identity is resolved inside the caller's tenant first, so another tenant's person is a 404.
"""

import asyncio
import collections
import logging
import math
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from pfstorer.errors import PFStorerError
from pfstorer.settings import Settings
from serving.api import (
    ADAPTER_HEADER,
    AUTH,
    BASE_HEADER,
    CLIENT_GONE,
    ErrorBody,
    Health,
    IdentityInfo,
    IdentityList,
    Readiness,
    RestoreParams,
    api,
    check_budget,
    check_output,
    check_steps,
    error_doc,
    error_response,
    json_error,
    negotiate,
    not_found,
    restore_form_schema,
    unwrap,
)
from serving.auth import ApiKeys, extract_key
from serving.messages import Refused, RestoreRequest, Restored
from serving.metrics import GatewayMetrics
from serving.serve_compat import request_id

log = logging.getLogger("ray.serve")  # Serve's documented logger: replica log files, with request ids

__all__ = ["Gateway"]


async def _once(data: bytes):  # an async byte stream for the multipart parser
    yield data


@serve.ingress(api)
class Gateway:
    """HTTP ingress: auth, limits, tenant scoping, back-pressure; the model work is Restorer's."""

    def __init__(self, restorer: Any, settings: Settings) -> None:
        from registry import AdapterRegistry

        self.restorer = restorer
        self.settings = settings
        self.keys = ApiKeys.configured(settings.serve.api_keys_file)
        # read-only: MLflow stays off the request path
        self.registry = AdapterRegistry.from_settings(settings, read_only=True,
                                                      index_max_age_s=settings.serve.index_max_age_s)
        s = settings.serve
        self.limits = settings.limits.restores(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels)
        self._latency_s = 1.0  # moving average of restore latency, for Retry-After
        self._inflight: collections.Counter[str] = collections.Counter()  # restores per tenant
        self._busy = 0  # restores and listings in flight, all tenants (probes not counted)
        self._cap = s.gateway_request_cap()
        self.metrics = GatewayMetrics()
        self._model_info: dict[str, Any] | None = None  # what a model replica said of itself
        self._model_seen = -math.inf  # when a running model replica was last seen
        from pfstorer.presets import PRESETS

        preset = PRESETS.get(settings.base)  # a checkpoint base: the replica checks the budget itself
        self._preset_steps = preset.sampling.steps if preset is not None else 1

    # -- helpers ----------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str | None:
        return self.keys.tenant_for(extract_key(request.headers))

    @staticmethod
    def _unauthorized() -> JSONResponse:
        return json_error(401, "missing or unknown API key", {"WWW-Authenticate": "Bearer"})

    def _retry_after(self) -> str:
        return str(int(min(60, max(1, math.ceil(self._latency_s)))))

    def _retry_later(self, status: int, why: str) -> JSONResponse:
        """A refusal the client should retry (429/503), with the ``Retry-After`` it should wait."""
        ra = self._retry_after()
        return json_error(status, f"{why}; retry in {ra} s", {"Retry-After": ra})

    def _overloaded(self, why: str = "too many requests queued") -> JSONResponse:
        return self._retry_later(503, f"overloaded: {why}")

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
                return json_error(400, "invalid Content-Length")
            if n > limit:  # refused before reading a byte
                return json_error(413, f"request body is {n} bytes, over the limit of {limit}")
        body = bytearray()
        timeout = self.settings.serve.body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:  # chunked or lying uploads: stop reading
                        return json_error(413, f"request body is over the limit of {limit} bytes")
        except TimeoutError:
            return json_error(408, f"the request body did not arrive within {timeout:g} s", {"Connection": "close"})
        except ClientDisconnect:
            log.info("client disconnected during upload")
            return json_error(CLIENT_GONE, "client disconnected during upload")
        return bytes(body)

    def _admit(self, tenant: str, restore: bool = True) -> JSONResponse | None:
        """Count a request in: 503 past the replica's cap (its last places are the probes'), 429
        past the tenant's share of restores in flight."""
        if self._busy >= self._cap:
            return self._overloaded(f"{self._cap} requests in flight on this server")
        cap = self.settings.serve.max_tenant_requests
        if restore and self._inflight[tenant] >= cap:
            return self._retry_later(429, f"too many requests in flight for this tenant (limit {cap})")
        self._busy += 1
        if restore:
            self._inflight[tenant] += 1
        return None

    def _release(self, tenant: str, restore: bool = True) -> None:
        self._busy -= 1
        if restore:
            self._inflight[tenant] -= 1
            if self._inflight[tenant] <= 0:
                del self._inflight[tenant]

    def _answered(self, tenant: str | None, endpoint: str, arrived: float, response: Any) -> Any:
        """Count the answer in the per-tenant metrics, and return it."""
        code = getattr(response, "status_code", 200)
        self.metrics.record(tenant, endpoint, code, time.monotonic() - arrived)
        return response

    def _model_replicas(self) -> int:
        """Running model replicas of this application, as the Serve controller knows them: no
        request to a replica, so a probe never waits behind restores."""
        ctx = serve.get_replica_context()
        app = serve.status().applications.get(ctx.app_name)
        dep = None if app is None else app.deployments.get(self.restorer.deployment_name)
        return 0 if dep is None else int(dep.replica_states.get("RUNNING", 0))

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
        """200 once a model replica runs (its base loaded) and the adapter index exists and reads.

        The index is checked as a lookup checks it (re-read only if it changed), never reloaded
        by force: a probe costs no parse of a large index. The model replicas are counted by the
        Serve controller, not asked: a probe never queues behind restores."""
        try:
            await asyncio.to_thread(self.registry.index.check)
        except Exception as exc:
            return JSONResponse(Readiness(ready=False, detail=f"adapter index unreadable: {exc}").model_dump(), 503)
        now = time.monotonic()
        if now - self._model_seen > 1.0:  # the controller is asked at most once a second
            try:
                running = await asyncio.to_thread(self._model_replicas)
            except Exception as exc:
                detail = str(unwrap(exc)) or type(exc).__name__
                return JSONResponse(Readiness(ready=False, detail=f"model state unknown: {detail}").model_dump(), 503)
            if not running:
                self._model_seen = -math.inf
                return JSONResponse(Readiness(ready=False, detail="no model replica is running yet").model_dump(), 503)
            self._model_seen = now
        if self._model_info is None:  # described once, in the background: never waited for
            self._model_info = {}
            asyncio.get_running_loop().create_task(self._describe_model())
        busy = self._busy >= self._cap
        return Readiness(**{"ready": True, **self._model_info, "busy": busy,
                            "detail": "at its request limit" if busy else None})

    async def _describe_model(self) -> None:
        try:
            self._model_info = await asyncio.wait_for(self.restorer.ready.remote(), timeout=60)
        except Exception:
            self._model_info = None  # asked again at the next probe

    @api.get(
        "/v1/identities",
        tags=["identities"],
        response_model=IdentityList,
        dependencies=AUTH,
        summary="People of the caller's tenant",
        responses={401: error_doc(401, "Missing or unknown API key.")},
    )
    async def identities(self, request: Request) -> Any:
        """Every person of the caller's tenant that has an adapter in the index."""
        arrived = time.monotonic()
        tenant = self._tenant(request)
        if tenant is None:
            return self._answered(None, "identities", arrived, self._unauthorized())
        refused = self._admit(tenant, restore=False)
        if refused is not None:
            return self._answered(tenant, "identities", arrived, refused)
        try:
            entries = await asyncio.to_thread(self.registry.index.list, tenant)
        finally:
            self._release(tenant, restore=False)
        return self._answered(tenant, "identities", arrived, IdentityList(
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
        ))

    @api.post(
        "/v1/restore",
        tags=["restore"],
        dependencies=AUTH,
        summary="Restore a photo, with a person's adapter",
        response_class=Response,
        openapi_extra=restore_form_schema(),
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
            400: error_doc(400, "Corrupt image or malformed form."),
            401: error_doc(401, "Missing or unknown API key."),
            404: error_doc(404, "Unknown identity (also: another tenant's)."),
            408: error_doc(408, "The request body did not arrive within serve.body_timeout_s."),
            409: error_doc(409, "The adapter was trained on a different base model."),
            413: error_doc(413, "Body or image over the size/pixel limits (refused before decoding), or output "
                      "pixels x steps over the compute budget (serve.max_pixel_steps)."),
            415: error_doc(415, "Not a supported image type (HEIC needs the heic extra), or not multipart/form-data."),
            422: error_doc(422, "Invalid parameter values or adapter; more steps than serve.max_steps; an input "
                      "or output with a side under the minimum."),
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
        arrived = time.monotonic()
        tenant = self._tenant(request)  # before reading the body
        if tenant is None:
            return self._answered(None, "restore", arrived, self._unauthorized())
        rid = request_id()  # the response's X-Request-ID (Serve's proxy sets it)
        refused = self._admit(tenant)
        if refused is not None:
            return self._answered(tenant, "restore", arrived, refused)
        code = CLIENT_GONE  # unless an answer is made
        try:
            response = await self._restore(request, tenant, arrived, rid)
            code = response.status_code
            if 400 <= code < 500 or code == 503:  # the request's own problem or load: one line, no traceback
                log.info("restore refused: tenant=%s request=%s status=%d reason=%r", tenant, rid, code,
                         bytes(response.body[:300]).decode(errors="replace"))
            return response
        finally:
            self._release(tenant)
            self.metrics.record(tenant, "restore", code, time.monotonic() - arrived)

    async def _restore(self, request: Request, tenant: str, arrived: float, rid: str) -> Response:
        from pfstorer.images import probe_image
        from registry import is_safe_key, model_key
        from ray.serve.exceptions import BackPressureError
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return json_error(415, "send multipart/form-data with an 'image' file field")
        body = await self._read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            form = await MultiPartParser(
                request.headers, _once(body), max_files=1, max_fields=16, max_part_size=64 * 1024
            ).parse()
        except (MultiPartException, ValueError, KeyError) as exc:
            return json_error(400, f"malformed multipart body: {exc}")
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return json_error(422, "the form needs an 'image' file field")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str) and v != ""}
            try:
                params = RestoreParams.model_validate(fields)
            except ValidationError as exc:
                errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
                return json_error(422, errors)
            data = await upload.read()
        finally:
            await form.close()

        key = ""
        if params.identity:
            if not is_safe_key(params.identity):
                return not_found()
            try:
                entry = await asyncio.to_thread(self.registry.resolve, tenant, params.identity)
            except Exception as exc:  # a damaged or missing index file: the server's problem, for now
                log.warning("adapter index unreadable: %s", exc)
                return self._retry_later(503, "the adapter index is not readable right now")
            if entry is None:  # nonexistent or another tenant's: the same answer
                return not_found()
            key = model_key(tenant, params.identity)
        s = self.settings.serve
        options = params.options(self.settings.restore)
        if options.steps is None and s.default_steps is not None:
            options = options.model_copy(update={"steps": s.default_steps})
        steps = options.steps or self._preset_steps
        try:  # the header only: the photo crosses to the model encoded, and is decoded there
            h, w = await asyncio.to_thread(probe_image, data, limits=self.limits, name="image")
            out_h, out_w = check_output(h, w, options.scale, self.limits.min_side)
            check_steps(steps, s.max_steps)
            check_budget(out_h * out_w, steps, s.max_pixel_steps)
        except PFStorerError as exc:
            return error_response(exc)
        job = RestoreRequest(
            tenant=tenant, request_id=rid, options=options,
            format=params.format or negotiate(request.headers.get("accept")), quality=params.quality,
            deadline_s=max(0.0, s.request_timeout_s - (time.monotonic() - arrived)),
        )
        t0 = time.perf_counter()
        response = self.restorer.options(multiplexed_model_id=key).restore.remote(data, job)
        try:
            result = await response
        except asyncio.CancelledError:  # the client hung up: stop the model's work too
            response.cancel()
            log.info("client disconnected; restore cancelled")
            raise
        except BackPressureError:
            return self._overloaded()
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, BackPressureError):
                return self._overloaded()
            if isinstance(cause, PFStorerError):
                return error_response(cause)
            from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

            if isinstance(cause, RequestCancelledError):
                return json_error(CLIENT_GONE, "request cancelled")
            if isinstance(cause, DeploymentUnavailableError):
                return self._retry_later(503, "model unavailable")
            log.exception("restore failed: tenant=%s request=%s", tenant, rid)
            return json_error(500, "internal error")
        if isinstance(result, Refused):
            if result.status == 404:
                return not_found()
            return json_error(result.status, result.reason)
        assert isinstance(result, Restored), type(result)
        elapsed = time.perf_counter() - t0
        self._latency_s = 0.8 * self._latency_s + 0.2 * elapsed
        return Response(
            content=result.body,
            media_type=result.media_type,
            headers={
                ADAPTER_HEADER: result.adapter,
                BASE_HEADER: result.base,
                "X-PFStorer-Seed": str(options.seed),
                "X-PFStorer-Steps": str(result.steps),
                "Server-Timing": f"queue;dur={result.queue_s * 1e3:.1f}, "
                f"restore;dur={result.compute_s * 1e3:.1f}, total;dur={elapsed * 1e3:.1f}",
                "Cache-Control": "no-store",
                "Vary": "Accept",
            },
        )
