"""The request-head deadline of serving.http_guard, on a plain uvicorn server (both HTTP/1.1
parsers), with raw sockets: a late head gets 408 and the connection closes; whole requests, and a
slow body once the head is in, are served as always."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from serving.http_guard import install_header_deadline

from _services import free_port

DEADLINE_S = 0.5


async def _app(scope, receive, send) -> None:  # a minimal ASGI app: echoes the body's length
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["h11", "httptools"])
def server(request) -> Iterator[int]:
    import uvicorn

    install_header_deadline(DEADLINE_S)
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=request.param, log_level="error",
                            lifespan="off", timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield port
    srv.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _response(s: socket.socket) -> bytes:
    """One whole answer (head and its Content-Length of body), however TCP splits it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _closed_with_408(s: socket.socket) -> bool:
    return _response(s).startswith(b"HTTP/1.1 408") and s.recv(65536) == b""


def test_a_late_request_head_is_closed(server: int) -> None:
    partial, silent = _connect(server), _connect(server)
    t0 = time.monotonic()
    partial.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
    assert _closed_with_408(partial) and _closed_with_408(silent)
    assert DEADLINE_S * 0.9 <= time.monotonic() - t0 < DEADLINE_S + 2


def test_whole_requests_and_slow_bodies_are_served(server: int) -> None:
    s = _connect(server)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    time.sleep(2 * DEADLINE_S)  # the head is in: the body may take longer (the Gateway times it)
    s.sendall(b"abcd")
    assert _response(s).startswith(b"HTTP/1.1 200")
    # kept alive: the next request has its own deadline from the end of the previous answer
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _response(s).startswith(b"HTTP/1.1 200")
    assert _closed_with_408(s)  # nothing more sent: closed after the deadline
