"""The private Ray Serve internals pfstorer relies on, in one place (Ray is pinned: 2.60).

- :func:`clear_multiplexed_model_id`: ``@serve.batch`` splits a batch by the request context's
  multiplexed model id (``_split_batch_by_model_id``), which would keep every batch to one
  person; our batch jobs carry their person themselves, so the id is cleared in a copied context.
- :func:`loaded_models`: the LRU of a ``@serve.multiplexed`` loader (``__serve_multiplex_wrapper``
  ``.models``), to know which people are resident and to wipe forgotten ones.
- :func:`announce_loaded_models`: after such a wipe, tell the router the replica's model set
  changed (``_push_multiplexed_replica_info``).
- :func:`request_id`: the id Serve's proxy gave the HTTP request (the client's ``X-Request-ID``,
  or a new one), which it also returns in the response's ``X-Request-ID``: logs name it.

``tests/unit/test_serve_compat.py`` checks each against the installed Ray, so an upgrade that breaks
one fails there, by name, before it can fail in production.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

WRAPPER_ATTR = "__serve_multiplex_wrapper"


def clear_multiplexed_model_id() -> None:
    """Clear the multiplexed model id of the current (copied) request context."""
    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))


def request_id() -> str:
    """The current request's id (``X-Request-ID``), as Serve's proxy set it."""
    from ray.serve import context

    return context._get_serve_request_context().request_id


def loaded_models(loader: Callable[..., Any]) -> dict[str, Any] | None:
    """The models a ``@serve.multiplexed`` loader holds (model id -> model), or None before its
    first call in this replica."""
    wrapper = getattr(loader, WRAPPER_ATTR, None)
    return None if wrapper is None else wrapper.models


def announce_loaded_models(loader: Callable[..., Any]) -> None:
    """Push the replica's model ids to the router at its next report (after removing some)."""
    wrapper = getattr(loader, WRAPPER_ATTR, None)
    if wrapper is not None:
        wrapper._push_multiplexed_replica_info = True
