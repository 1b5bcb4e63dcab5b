"""Prometheus figures of the API, through Ray Serve's metrics (each node's metrics agent exports them).

Per tenant, never per person: a platform has a handful of tenants and millions of people, and one
Prometheus series per person would swamp any server. Ray adds the application, deployment and
replica tags itself.

- ``pfstorer_requests_total{tenant, endpoint, code}``: every answered request; errors are the
  codes >= 400 (``anonymous``: no valid API key).
- ``pfstorer_request_seconds{tenant, endpoint}``: time from arrival at the Gateway to the answer.
- ``pfstorer_adapter_loads_total{tenant, source}``: where a restore found its person's adapter:
  ``device`` (already in a slot), ``host`` (host-RAM cache) or ``store`` (read and verified).
- ``pfstorer_adapter_load_seconds{source}``: time to put an adapter in a slot from that source.
- ``pfstorer_adapters_resident`` and ``pfstorer_adapter_host_cache_bytes``: per replica.
"""

from __future__ import annotations

__all__ = ["AdapterMetrics", "GatewayMetrics"]

ANONYMOUS = "anonymous"
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
LOAD_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10]


class GatewayMetrics:
    """Requests, errors and latency per tenant and endpoint."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("pfstorer_requests", description="Requests answered, by tenant, endpoint "
                                "and HTTP status.", tag_keys=("tenant", "endpoint", "code"))
        self.latency = Histogram("pfstorer_request_seconds", description="Seconds from arrival to answer.",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("tenant", "endpoint"))

    def record(self, tenant: str | None, endpoint: str, code: int, seconds: float) -> None:
        tags = {"tenant": tenant or ANONYMOUS, "endpoint": endpoint}
        self.requests.inc(tags={**tags, "code": str(code)})
        self.latency.observe(seconds, tags=tags)


class AdapterMetrics:
    """Where restores found their adapters, and what a replica holds."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.loads = Counter("pfstorer_adapter_loads", description="Adapters a restore needed, by tenant and "
                             "where it was found: device, host or store.", tag_keys=("tenant", "source"))
        self.load_s = Histogram("pfstorer_adapter_load_seconds", description="Seconds to put an adapter in a "
                                "device slot, by source.", boundaries=LOAD_BUCKETS_S, tag_keys=("source",))
        self.resident = Gauge("pfstorer_adapters_resident", description="Adapters in this replica's device slots.")
        self.host_bytes = Gauge("pfstorer_adapter_host_cache_bytes",
                                description="Bytes of adapters in this replica's host-RAM cache.")

    def record(self, key: str, source: str, seconds: float | None = None) -> None:
        """One adapter use of ``key`` ("tenant/identity") found at ``source``."""
        self.loads.inc(tags={"tenant": key.split("/", 1)[0] or ANONYMOUS, "source": source})
        if seconds is not None:
            self.load_s.observe(seconds, tags={"source": source})

    def holding(self, resident: int, host_bytes: int) -> None:
        self.resident.set(resident)
        self.host_bytes.set(host_bytes)
