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

from __future__ import annotations

from typing import Any

from ray import serve

from pfstorer.settings import Settings
from serving.api import api
from serving.auth import ApiKeys
from serving.gateway import Gateway
from serving.restorer import Restorer

__all__ = ["APP_NAME", "Gateway", "Restorer", "api", "build_app", "build_application"]

APP_NAME = "pfstorer"


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
