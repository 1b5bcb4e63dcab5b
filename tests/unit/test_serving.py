"""Serving without Ray: API keys, adapter tiers, the affinity lock, request checks."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pfstorer.errors import AdapterError
from registry.adapter_cache import HostAdapterCache
from serving.adapters import (
    NOT_FOUND_MESSAGE,
    AdapterNotFound,
    AffinityLock,
    ResidentAdapter,
    SlotPool,
)
from serving.auth import ApiKeys, KeyFileError, extract_key, generate_key, hash_key


def test_hash_key_and_lookup(tmp_path: Path) -> None:
    k1, k2 = generate_key(), generate_key()
    assert k1 != k2 and len(k1) > 40
    h1 = hash_key(k1)
    assert h1.startswith("sha256:") and len(h1) == 7 + 64 and k1 not in h1
    keys = ApiKeys.from_document({"tenants": {"acme": [h1], "globex": hash_key(k2)[7:]}})
    assert keys.tenant_for(k1) == "acme" and keys.tenant_for(k2) == "globex"
    assert keys.tenant_for(None) is None and keys.tenant_for("") is None
    assert keys.tenant_for(k1 + "x") is None and keys.tenant_for("short") is None
    assert keys.tenants == {"acme", "globex"}
    assert extract_key({"authorization": f"Bearer {k1}"}) == k1
    assert extract_key({"x-api-key": k2}) == k2
    assert extract_key({"authorization": "Basic abc"}) is None


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"acme": []}, "'tenants' mapping"),
        ({"tenants": {"acme": ["plain-key-not-hash"]}}, "sha256"),
        ({"tenants": {"bad.tenant": []}}, "safe tenant"),
        ({"tenants": {"a": ["sha256:" + "0" * 64], "b": ["0" * 64]}}, "two tenants"),
    ],
)
def test_bad_key_documents(doc: Any, match: str) -> None:
    with pytest.raises(KeyFileError, match=match):
        ApiKeys.from_document(doc)


def test_key_file_reload_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k1, k2 = generate_key(), generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text(f"tenants:\n  acme:\n    - {hash_key(k1)}\n")
    keys = ApiKeys.from_file(path, reload_s=0)
    assert keys.tenant_for(k1) == "acme" and keys.tenant_for(k2) is None
    path.write_text(f'{{"tenants": {{"acme": ["{hash_key(k2)}"]}}}}')  # JSON works too; rotated
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert keys.tenant_for(k2) == "acme" and keys.tenant_for(k1) is None
    monkeypatch.delenv("PFSTORER_API_KEYS", raising=False)
    with pytest.raises(KeyFileError, match="no API keys configured"):
        ApiKeys.configured(None)
    monkeypatch.setenv("PFSTORER_API_KEYS", f'{{"tenants": {{"env-t": ["{hash_key(k1)}"]}}}}')
    assert ApiKeys.configured(None).tenant_for(k1) == "env-t"


def test_resident_adapter_release_is_idempotent() -> None:
    pool = SlotPool(2)
    a = ResidentAdapter(key="t/a", slot=pool.take(), pool=pool, sha256="x")
    assert pool.free == 1
    a.__del__()  # what Serve's LRU eviction calls ...
    a.__del__ = lambda _: None  # ... (and then sets, which the GC ignores)
    assert pool.free == 2 and a.released
    del a
    gc.collect()  # ... and the GC's __del__: no second release
    assert pool.free == 2
    pool.take(), pool.take()
    with pytest.raises(RuntimeError, match="no free adapter slot"):
        pool.take()


def test_host_cache_lru_and_discard() -> None:
    from pfstorer.adapter import Adapter, AdapterMetadata

    loads: list[str] = []

    def loader(name: str):
        def load() -> Adapter:
            loads.append(name)
            meta = AdapterMetadata(identity=name, base_fingerprint="b", base_preset="tiny")
            return Adapter({"x": torch.zeros(4)}, meta)

        return load

    cache = HostAdapterCache(2)
    assert cache.get("s1", "t/a", loader("a"))[1] == "store"
    assert cache.get("s1", "t/a", loader("a"))[1] == "host"
    cache.get("s2", "t/b", loader("b"))
    cache.get("s1", "t/a", loader("a"))  # s1 most recent
    cache.get("s3", "t/c", loader("c"))  # evicts s2
    assert "s2" not in cache and "s1" in cache and loads == ["a", "b", "c"]
    assert cache.discard(lambda key, sha: key != "t/a") == 1 and "s1" not in cache
    counts = cache.stats.summary()["counts"]
    assert counts["store_read"] == 3 and counts["host_hit"] == 2
    off = HostAdapterCache(0)
    off.get("s1", "t/a", loader("a")), off.get("s1", "t/a", loader("a"))
    assert loads[-2:] == ["a", "a"]
    with pytest.raises(AdapterError):
        cache.get("s9", "t/z", lambda: (_ for _ in ()).throw(AdapterError("corrupt")))


def test_clearing_a_slot_zeroes_everything() -> None:
    from pfstorer.model import load_base
    from pfstorer.personalization import AdapterSlots

    slots = AdapterSlots.for_model(load_base("tiny"), 2)
    for b in slots.buffers():
        b.fill_(1.0)
    slots.clear(1)  # a forgotten person's cached reference keys/values must not stay on the device
    assert all(float(b[1].abs().sum()) == 0 and float(b[0].min()) == 1 for b in slots.buffers())


def test_affinity_lock_groups_by_identity() -> None:
    order: list[str] = []

    async def main() -> None:
        sched = AffinityLock(lambda key: key == "t/r", max_skips=8)

        async def job(key: str, hold: float = 0.01) -> None:
            async with sched.turn(key):
                order.append(key)
                await asyncio.sleep(hold)

        first = asyncio.create_task(job("t/a", 0.05))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(job(k)) for k in ["t/b", "t/c", "t/a", "t/r", "t/a", ""]]
        await asyncio.gather(first, *rest)
        assert not sched.busy and sched.waiting == 0

        # cancellation while waiting, and after being granted, never wedges the turn
        holder = asyncio.create_task(job("t/x", 0.05))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(job("t/y"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await asyncio.wait_for(job("t/z"), 1)

    asyncio.run(main())
    # same person first (t/a, t/a), then resident ones (t/r, base ""), then the oldest (t/b, t/c)
    assert order[:7] == ["t/a", "t/a", "t/a", "t/r", "", "t/b", "t/c"]


def test_affinity_lock_no_starvation() -> None:
    order: list[str] = []

    async def main() -> None:
        sched = AffinityLock(max_skips=2)

        async def job(key: str) -> None:
            async with sched.turn(key):
                order.append(key)
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(job("t/hot"))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("t/cold")))
        tasks += [asyncio.create_task(job("t/hot")) for _ in range(6)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order.index("t/cold") <= 3  # passed over at most max_skips times


def test_plan_runs_pins_at_most_slots_people_per_run() -> None:
    from pfstorer.restore_options import RestoreOptions
    from serving.batching import batch_signature, plan_runs

    p = RestoreOptions(steps=2, sampler="ddim", t_start=200, tile=64)
    a = batch_signature((3, 128, 128), p)
    b = batch_signature((3, 128, 96), p)
    c = batch_signature((3, 128, 128), p.model_copy(update={"steps": 3}))
    assert a != b and a != c  # size and steps shape the computation
    assert a != batch_signature((3, 128, 128), p.model_copy(update={"t_start": 1000}))  # so does where sampling starts
    assert a != batch_signature((3, 128, 128), p.model_copy(update={"tile": 128}))  # and the tiles
    # seeds and strengths do not: each row has its own
    assert a == batch_signature((3, 128, 128), p.model_copy(update={"seed": 7, "strength": 0.5}))
    items = [(a, "t/p"), (a, "t/q"), (a, ""), (b, "t/p"), (a, "t/r"), (a, "t/p"), (a, "u/s"), (a, "t/q"), (c, "")]
    runs = plan_runs(items, max_people=2)
    # p, q and the base row share a run; r does not fit (two people already), so it opens the
    # next run, which s joins; later p and q go back to the first run; other sizes/steps run apart
    assert runs == [[0, 1, 2, 5, 7], [3], [4, 6], [8]]
    for run in runs:
        assert len({items[i][0] for i in run}) == 1
        assert len({items[i][1] for i in run} - {""}) <= 2
    assert sorted(i for run in runs for i in run) == list(range(len(items)))  # nobody lost
    assert plan_runs([(a, "t/p"), (a, "t/q")], max_people=1) == [[0], [1]]
    with pytest.raises(ValueError):
        plan_runs(items, max_people=0)


def test_batching_settings() -> None:
    from pfstorer.settings import ServeSettings

    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings(max_batch_size=8, max_ongoing_requests=4)
    s = ServeSettings(max_batch_size=4, max_ongoing_requests=4)
    assert s.compile_mode("cuda") == "reduce-overhead" and s.compile_mode("cpu") is None
    assert ServeSettings(compile="off").compile_mode("cuda") is None
    assert ServeSettings(compile="default").compile_mode("cpu") == "default"


def test_a_cuda_error_fails_the_replica_health_check_and_other_errors_do_not() -> None:
    """Serve replaces a replica whose check_health raises: only errors that poison the device
    may do that; a bad photo or an out-of-memory request must not cost the replica."""
    from types import SimpleNamespace

    import torch

    from serving.restorer import Restorer
    from serving.runner import device_failure

    assert device_failure(RuntimeError("CUDA error: device-side assert triggered\nmore")) == (
        "CUDA error: device-side assert triggered")
    assert device_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert device_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. CUDA error")) is None
    assert device_failure(RuntimeError("size mismatch")) is None
    assert device_failure(ValueError("CUDA error: no")) is None
    replica = SimpleNamespace(runner=SimpleNamespace(device_failed=None), device="cuda")
    Restorer.check_health(replica)  # healthy: returns
    replica.runner.device_failed = "CUDA error: device-side assert triggered"
    with pytest.raises(RuntimeError, match="cuda failed: CUDA error"):
        Restorer.check_health(replica)


def test_not_found_message_is_constant() -> None:
    assert str(AdapterNotFound("acme/bob")) == str(AdapterNotFound()) == NOT_FOUND_MESSAGE
    assert AdapterNotFound().status == 404


def test_uint8_transport_is_exact() -> None:
    from PIL import Image

    from pfstorer.images import from_pil

    arr = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)  # every value
    img = from_pil(Image.fromarray(arr.permute(1, 2, 0).numpy()))
    u8 = img.mul(255).round_().to(torch.uint8)
    assert torch.equal(u8.to(torch.float32).div_(255.0), img)


def test_openapi_documents_the_api() -> None:
    from serving.gateway import api  # the Gateway's methods are the app's routes

    spec = api.openapi()
    post = spec["paths"]["/v1/restore"]["post"]
    assert {"200", "400", "401", "404", "409", "413", "415", "422", "503"} <= set(post["responses"])
    assert "image/png" in post["responses"]["200"]["content"]
    assert "Retry-After" in post["responses"]["503"]["headers"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "identity", "scale", "steps", "seed", "color_fix", "strength", "t_start"} <= set(form["properties"])
    assert {"/v1/identities", "/healthz", "/readyz"} <= set(spec["paths"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])


def test_build_app_takes_settings_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import Application

    from serving.app import build_app

    monkeypatch.delenv("PFSTORER_API_KEYS", raising=False)
    with pytest.raises(KeyFileError):
        build_app({"base": "tiny", "state_dir": str(tmp_path)})
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: ['{hash_key(generate_key())}']\n")
    app = build_app({"base": "tiny", "state_dir": str(tmp_path), "serve": {"api_keys_file": str(keys)}})
    assert isinstance(app, Application)
