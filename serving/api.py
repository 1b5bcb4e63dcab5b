"""The HTTP contract of the server: request and response models, the FastAPI app whose routes
the Gateway fills, error answers and content negotiation.

Nothing here touches the model or Ray. Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

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
form; 422 bad parameter values, more steps than ``serve.max_steps``, or an input or output side
under the minimum; 429 + ``Retry-After`` when the tenant already has
``serve.max_tenant_requests`` in flight; 503 + ``Retry-After`` when the model's queue is full or
the adapter index is unreadable, 503 when a restore ran past ``serve.request_timeout_s`` (the work
is stopped between tile batches). A client that hangs up cancels its restore (logged, 499).
:func:`error_response` maps a :class:`PFStorerError` to its status (its ``status`` attribute).
"""

from typing import Any, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from pfstorer.errors import AdapterMismatchError, ParameterError, PFStorerError, TooLargeError, TooSmallError
from pfstorer.restore_options import RestoreOptions
from serving.adapters import NOT_FOUND_MESSAGE, AdapterNotFound

__all__ = [
    "ADAPTER_HEADER",
    "AUTH",
    "BASE_HEADER",
    "CLIENT_GONE",
    "ErrorBody",
    "Health",
    "IdentityInfo",
    "IdentityList",
    "Readiness",
    "RestoreParams",
    "api",
    "check_budget",
    "check_output",
    "check_steps",
    "error_doc",
    "error_response",
    "json_error",
    "negotiate",
    "not_found",
    "restore_form_schema",
    "status_of",
    "unwrap",
]

CLIENT_GONE = 499  # "client closed request": logged, never a 5xx
ADAPTER_HEADER = "X-PFStorer-Adapter"
BASE_HEADER = "X-PFStorer-Base"


class RestoreParams(RestoreOptions):
    """Form fields of ``POST /v1/restore`` (besides the ``image`` file): :class:`RestoreOptions`
    plus who and how to encode. A field left out takes the server's default (its settings'
    ``restore`` section; ``steps``: ``serve.default_steps``, else the base's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a misspelt field is an error, not ignored

    identity: str | None = Field(
        None,
        description="The person (of the caller's tenant) whose adapter to use; empty or absent: "
        "the base model only.",
        max_length=128,
    )
    tile: None = Field(  # type: ignore[assignment]
        None, description="Fixed by the server (serve.tile_size): outputs stay reproducible and batchable.",
    )
    overlap: None = Field(None, description="Fixed by the server (the base's fraction of the tile).")  # type: ignore[assignment]
    format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="Output format (default: from the Accept header, else png).",
    )
    quality: int | None = Field(
        None, ge=1, le=100, description="JPEG/WebP quality (default: the server's serve.output_quality).",
    )

    def options(self, defaults: RestoreOptions) -> RestoreOptions:
        """The restore options of this request: the fields it gave over ``defaults``."""
        given = self.model_fields_set & RestoreOptions.model_fields.keys()
        return RestoreOptions.merged(defaults, **{k: getattr(self, k) for k in given})


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


def restore_form_schema() -> dict[str, Any]:
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
        if spec.get("type") == "null":  # fixed by the server (tile, overlap): not a form field
            continue
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


def error_doc(status: int, description: str) -> dict[str, Any]:
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
AUTH = [Depends(_bearer), Depends(_api_key)]  # parsed for the OpenAPI schema; checked below


def json_error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def not_found() -> JSONResponse:
    return json_error(404, NOT_FOUND_MESSAGE)


def check_budget(out_pixels: int, steps: int, limit: int) -> None:
    """Refuse a restore whose output pixels x denoising steps exceed ``limit`` (413)."""
    if out_pixels * steps > limit:
        raise TooLargeError(f"{out_pixels:,} output pixels x {steps} steps = {out_pixels * steps:,} is over the "
                            f"compute budget of {limit:,} pixel-steps per request (serve.max_pixel_steps)")


def check_steps(steps: int, limit: int) -> None:
    """Refuse more denoising steps than the server allows (422): with the compute budget, what
    keeps one request's cost known and bounded before it runs."""
    if steps > limit:
        raise ParameterError(f"{steps} denoising steps is over this server's limit of {limit} (serve.max_steps)")


def check_output(height: int, width: int, scale: float, min_side: int) -> tuple[int, int]:
    """The output size of a ``height`` x ``width`` photo at ``scale``, refused when it is too large
    (413) or has a side under ``min_side`` (422, as an input would be)."""
    from pfstorer.sampling import MAX_OUTPUT_PIXELS

    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    if out_h * out_w > MAX_OUTPUT_PIXELS:
        raise TooLargeError(f"output of {out_w}x{out_h} at scale {scale:g} would be over the limit of "
                            f"{MAX_OUTPUT_PIXELS:,} pixels")
    if min(out_h, out_w) < min_side:
        raise TooSmallError(f"output of {out_w}x{out_h} at scale {scale:g} would have a side under the "
                            f"minimum of {min_side} px")
    return out_h, out_w


def unwrap(exc: BaseException) -> BaseException:
    """The user's exception behind a Ray task error (``RayTaskError(cause)``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def status_of(exc: PFStorerError) -> int:
    """The HTTP status of a request's error (an adapter for another base is a conflict)."""
    return 409 if isinstance(exc, AdapterMismatchError) else int(exc.status)


def error_response(exc: PFStorerError) -> JSONResponse:
    """A PFStorerError -> its HTTP answer (AdapterNotFound -> the one 404 body)."""
    if isinstance(exc, AdapterNotFound):
        return not_found()
    return json_error(status_of(exc), str(exc))


_ACCEPTED = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def negotiate(accept: str | None) -> str:
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
