"""The Ray Serve application: a FastAPI ingress (``Gateway``) in front of the model (``Restorer``).

::

    HTTP ─► Serve proxy ─► Gateway (FastAPI)                       Restorer (one base per replica)
                           auth: API key -> tenant                  @serve.multiplexed "tenant/identity"
                           limits: body, pixels, type, bomb         host-RAM LRU -> device slots
                           identity -> index (404 if not the        AffinityLock: one restore
                           caller's) ─► handle.options(                at a time, same person first
                           multiplexed_model_id="t/i") ───────────► restore_batch(...) -> PNG
                           503 + Retry-After on BackPressureError

The HTTP contract is :mod:`serving.api`. ``build_app(args)`` is the import path of the Serve
config (``serving.app:build_app``); ``args`` are :class:`pfstorer.settings.Settings` overrides,
and ``Settings.serve`` alone sets the deployments' options.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from pfstorer.settings import PROBE_HEADROOM, Settings
from serving.auth import ApiKeys
from serving.gateway import Gateway
from serving.restorer import Restorer

__all__ = ["APP_NAME", "build_app", "build_application"]

APP_NAME = "pfstorer"


def build_application(settings: Settings) -> Any:
    """The Serve application for ``settings`` (``serve.run(build_application(s))``)."""
    from ray.serve.config import BackpressureConfig

    s = settings.serve
    ApiKeys.configured(s.api_keys_file)  # fail here, not in a replica, if no keys are configured
    opts = s.deployment_options()
    retry = BackpressureConfig(retry_after_s=1)
    restorer = serve.deployment(Restorer, name="Restorer").options(backpressure_config=retry, **opts)
    gateway = serve.deployment(Gateway, name="Gateway").options(
        num_replicas=s.gateway_replicas,
        # the Gateway answers 503 itself at its cap; the places above it are the probes' alone
        max_ongoing_requests=s.gateway_request_cap() + PROBE_HEADROOM,
        max_queued_requests=-1,
        backpressure_config=retry,
        ray_actor_options={"num_cpus": min(0.25, s.num_cpus) if s.num_cpus else 0},
    )
    return gateway.bind(restorer.bind(settings), settings)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve config entry point (``import_path: serving.app:build_app``): ``args`` are
    :class:`~pfstorer.settings.Settings` overrides (e.g. ``base``, ``index_url``, ``serve``)."""
    return build_application(Settings.load(**dict(args or {})))
