"""The private Ray Serve internals of :mod:`serving.serve_compat` still exist in the installed Ray.

A Ray upgrade that renames or drops one fails here, naming it; the serving integration tests
then check the behaviour (batches mixing people, forgotten adapters wiped from device slots).
"""

from __future__ import annotations

import asyncio
import inspect

from serving.serve_compat import (
    WRAPPER_ATTR,
    announce_loaded_models,
    clear_multiplexed_model_id,
    loaded_models,
    request_id,
)


def test_clearing_the_multiplexed_model_id_of_a_copied_context() -> None:
    import contextvars
    import dataclasses

    from ray import serve
    from ray.serve import context

    async def main() -> tuple[str, str]:
        current = context._get_serve_request_context()
        context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id="acme/anna"))
        copied = contextvars.copy_context()
        copied.run(clear_multiplexed_model_id)
        return serve.get_multiplexed_model_id(), copied.run(serve.get_multiplexed_model_id)

    outer, inner = asyncio.run(main())
    assert (outer, inner) == ("acme/anna", "")  # only the copy is cleared


def test_the_request_id_of_the_current_request() -> None:
    import dataclasses

    from ray.serve import context

    async def main() -> str:
        current = context._get_serve_request_context()
        context._serve_request_context.set(dataclasses.replace(current, request_id="abc-123"))
        return request_id()

    assert asyncio.run(main()) == "abc-123"


def test_the_multiplex_wrapper_keeps_its_models_and_push_flag() -> None:
    import ray.serve.api as api
    from ray.serve.multiplex import _ModelMultiplexWrapper

    assert WRAPPER_ATTR in inspect.getsource(api.multiplexed)  # where Serve stores the wrapper
    source = inspect.getsource(_ModelMultiplexWrapper)
    assert "self.models" in source and "self._push_multiplexed_replica_info" in source

    class Wrapper:  # what the helpers read and write, on a stand-in with the same attributes
        models = {"acme/anna": object()}
        _push_multiplexed_replica_info = False

    def loader() -> None: ...

    assert loaded_models(loader) is None  # before the loader's first call in a replica
    setattr(loader, WRAPPER_ATTR, Wrapper())
    assert list(loaded_models(loader)) == ["acme/anna"]
    announce_loaded_models(loader)
    assert getattr(loader, WRAPPER_ATTR)._push_multiplexed_replica_info is True
