"""A deadline for request headers, installed in Ray Serve's HTTP proxies.

Ray Serve's proxy runs uvicorn, which waits without limit for a client to finish sending its
request line and headers: a half-sent request holds its connection open, and enough of them hold
every connection ("slowloris"). The body already has a deadline (``serve.body_timeout_s``, in the
Gateway); this is the one before it. Serve calls the function named by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in each proxy process before it serves;
:func:`proxy_setup` installs the deadline there: a connection that has not sent a whole request
head within ``serve.header_timeout_s`` seconds of connecting, or of its previous response,
gets ``408 Request Timeout`` and is closed. :func:`proxy_env` is what a Ray node needs in its
environment for it (``pfstorer serve`` sets it for the Ray it starts; a cluster sets it in its
pod spec).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CALLBACK", "ENV_TIMEOUT", "install_header_deadline", "proxy_env", "proxy_setup"]

CALLBACK = "serving.http_guard.proxy_setup"
ENV_TIMEOUT = "PFSTORER_SERVE__HEADER_TIMEOUT_S"  # the setting serve.header_timeout_s
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def proxy_env(timeout_s: float) -> dict[str, str]:
    """Environment variables that make every Serve proxy of a Ray node enforce the deadline."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, ENV_TIMEOUT: f"{timeout_s:g}"}


def proxy_setup() -> list[Any]:
    """Serve's proxy callback: install the header deadline; no extra middleware."""
    from pfstorer.settings import ServeSettings

    default = ServeSettings.model_fields["header_timeout_s"].default
    install_header_deadline(float(os.environ.get(ENV_TIMEOUT, default)))
    return []


def install_header_deadline(timeout_s: float) -> None:
    """Close uvicorn connections (HTTP/1.1, both parsers) whose request head is late."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    for cls in (H11Protocol, HttpToolsProtocol):
        _patch(cls, timeout_s)


def _arm(proto: Any, timeout_s: float) -> None:
    """From now, the connection has ``timeout_s`` to complete a request head (a new cycle)."""
    waiting_after = proto.cycle  # uvicorn makes a new cycle once a request's head is complete

    def expire() -> None:
        transport = proto.transport
        if proto.cycle is waiting_after and transport is not None and not transport.is_closing():
            transport.write(_TIMED_OUT)
            transport.close()

    old = getattr(proto, "_pfstorer_head_timer", None)
    if old is not None:
        old.cancel()
    proto._pfstorer_head_timer = proto.loop.call_later(timeout_s, expire)


def _patch(cls: Any, timeout_s: float) -> None:
    if getattr(cls, "_pfstorer_head_timeout_s", None) is not None:  # installed: only the value changes
        cls._pfstorer_head_timeout_s = timeout_s
        return
    cls._pfstorer_head_timeout_s = timeout_s
    made, completed = cls.connection_made, cls.on_response_complete

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        _arm(self, cls._pfstorer_head_timeout_s)

    def on_response_complete(self: Any) -> None:
        completed(self)
        _arm(self, cls._pfstorer_head_timeout_s)

    cls.connection_made, cls.on_response_complete = connection_made, on_response_complete
