"""Serving: the HTTP API over real Ray Serve on 127.0.0.1 (2 tenants x 3 people with real adapters
on the ``tiny`` base).

Every served PNG is compared with the offline restore (``pfstorer.sampling.restore`` and, for one
person, the ``pfstorer restore`` CLI) bit for bit: same seed, steps, ``--tile`` = serve.tile_size,
and one torch thread on both sides (each replica uses floor(num_cpus) >= 1 threads).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.adapters import (
    NOT_FOUND_MESSAGE,
)
from serving.auth import generate_key, hash_key

from _services import free_port, prometheus_sum, unique_name
from _torch import torch_threads

STEPS = 2


TILE = 64  # serve.tile_size: the 128 px photos are restored in overlapping 64 px tiles


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb_png(side: int) -> bytes:
    """A tiny valid PNG whose header declares side x side RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _chunk(b"IEND", b"")


class Stack:
    """What the integration tests share: the served app, its people and offline references."""

    def __init__(self) -> None:
        self.url = ""
        self.app_name = ""
        self.batched_app = ""  # the same people behind a replica that batches across requests
        self.keys: dict[str, str] = {}  # tenant -> key
        self.people: dict[str, list[str]] = {}  # tenant -> identities
        self.photo: dict[tuple[str, str], Path] = {}
        self.adapter_dirs: dict[tuple[str, str], Path] = {}
        self.adapters: dict[tuple[str, str], Any] = {}
        self.labels: dict[tuple[str, str], str] = {}
        self.registry: Any = None
        self.model: Any = None
        self.cli: subprocess.Popen | None = None
        self.cli_out: Path | None = None
        self.photo512: Path | None = None
        self.cli512: subprocess.Popen | None = None
        self.cli512_out: Path | None = None
        self._refs: dict[tuple, bytes] = {}

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def reference(self, tenant: str | None, identity: str | None, photo: Path, seed: int, **options: Any) -> bytes:
        """Offline restore of ``photo`` (PNG bytes), one torch thread like the replica."""
        from pfstorer.images import encode_png, load_image
        from pfstorer.sampling import restore

        k = (tenant, identity, str(photo), seed, *sorted(options.items()))
        if k not in self._refs:
            adapter = self.adapters[(tenant, identity)] if identity else None
            with torch_threads(1):
                out = restore(self.model, load_image(photo), adapter=adapter, seed=seed, steps=STEPS, tile=TILE,
                              **options)
            self._refs[k] = encode_png(out)
        return self._refs[k]

    def restore_handle(self, app: str | None = None) -> Any:
        from ray import serve

        return serve.get_deployment_handle("Restorer", app_name=app or self.app_name)


def _post(client: Any, stack: Stack, tenant: str | None, photo: Path | bytes, **fields: Any) -> Any:
    data = photo if isinstance(photo, bytes) else photo.read_bytes()
    headers = stack.headers(tenant) if tenant else {}
    headers.update(fields.pop("headers", {}))
    form = {k: str(v) for k, v in fields.items() if v is not None}
    return client.post("/v1/restore", headers=headers, files={"image": ("photo.jpg", data)}, data=form)


@pytest.fixture(scope="module")
def stack(ray_session, mlflow_local, lfw_bench, tmp_path_factory) -> Any:
    import httpx
    from ray import serve

    from pfstorer.images import load_image
    from pfstorer.model import load_base
    from pfstorer.training import PersonalizeConfig, personalize
    from registry import AdapterRegistry
    from serving.app import build_app

    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("serving")
    s = Stack()
    s.registry = AdapterRegistry.from_urls(
        str(root / "store"), mlflow_local.tracking_uri, str(root / "index.parquet"),
        artifact_location=mlflow_local.artifact_location,
    )
    with torch_threads(1):
        s.model = load_base("tiny")
    people = [name for name, photos in lfw_bench.items() if len(photos) >= 6][:6]
    tenants = [unique_name("acme"), unique_name("globex")]
    config = PersonalizeConfig(steps=2, lr=0.05)  # a few strong steps: people restore differently
    with torch_threads(1):
        for i, name in enumerate(people):
            tenant = tenants[i // 3]
            refs = [load_image(p) for p in lfw_bench[name][:5]]
            t = time.perf_counter()
            adapter = personalize(s.model, refs, identity=name, tenant=tenant, config=config)
            d = adapter.save(root / "adapters" / tenant / name)
            t_pers = time.perf_counter() - t
            entry = s.registry.publish(d, tenant, name, job_key=f"job{i}", lineage={"base_licence": "test"})
            print(f"[serving] {name}: personalize {t_pers:.1f}s, publish {time.perf_counter() - t - t_pers:.1f}s")
            s.people.setdefault(tenant, []).append(name)
            s.photo[(tenant, name)] = lfw_bench[name][5]
            s.adapter_dirs[(tenant, name)] = d
            s.adapters[(tenant, name)] = adapter
            s.labels[(tenant, name)] = entry.label
    print(f"\n[serving] 6 adapters personalized and published in {time.perf_counter() - t0:.1f}s")

    # the offline CLI for one person, running while Serve deploys
    tenant, name = tenants[0], s.people[tenants[0]][0]
    s.cli_out = root / "cli.png"
    s.cli = subprocess.Popen(
        [sys.executable, "-m", "pfstorer.cli", "restore", "--base", "tiny", "--adapter",
         str(s.adapter_dirs[(tenant, name)]), "--input", str(s.photo[(tenant, name)]), "--out",
         str(s.cli_out), "--seed", "100", "--steps", str(STEPS), "--tile", str(TILE), "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip

    # a 512 px photo (tiled: 64 px tiles), base only, with --threads 1 and nothing else pinning threads
    from PIL import Image

    s.photo512 = root / "photo512.jpg"  # under the 300 KB upload limit
    Image.open(lfw_bench[people[0]][5]).convert("RGB").resize((512, 512), Image.BICUBIC).save(s.photo512, quality=95)
    s.cli512_out = root / "cli512.png"
    s.cli512 = subprocess.Popen(
        [sys.executable, "-m", "pfstorer.cli", "restore", "--base", "tiny", "--input", str(s.photo512), "--out",
         str(s.cli512_out), "--seed", "7", "--steps", str(STEPS), "--tile", str(TILE), "--threads", "1", "--quiet"],
        env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip

    s.keys = {t: generate_key() for t in tenants}
    keys_file = root / "api-keys.yaml"
    keys_file.write_text(
        "tenants:\n" + "".join(f"  {t}:\n    - {hash_key(k)}\n" for t, k in s.keys.items())
    )
    port = free_port()
    s.app_name, s.batched_app = unique_name("pfstorer"), unique_name("batched")
    s.url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def app(**serve_overrides: Any) -> Any:
        return build_app(
            {
                "base": "tiny",
                "device": "cpu",
                "state_dir": str(root / "state"),
                "index_url": str(root / "index.parquet"),
                "store_url": str(root / "store"),
                "serve": {
                    "api_keys_file": str(keys_file),
                    "adapter_slots": 2,  # fewer than one tenant's 3 people: cycling evicts
                    "host_cache_adapters": 16,
                    "max_ongoing_requests": 2,
                    "max_queued_requests": 2,
                    "num_cpus": 0.5,
                    "tile_size": TILE,
                    "default_steps": STEPS,
                    "max_upload_bytes": 300_000,
                    "max_pixels": 512 * 512,
                    "max_tenant_requests": 64,  # the queue's back-pressure is tested here, not the tenant cap
                    **serve_overrides,
                },
            }
        )

    t1 = time.perf_counter()
    serve.run(app(), name=s.app_name, route_prefix="/", blocking=False)
    serve.run(app(max_batch_size=4, max_ongoing_requests=8, max_queued_requests=8, batch_wait_timeout_s=1.0),
              name=s.batched_app, route_prefix="/batched", blocking=False)  # fmt: skip
    with httpx.Client(base_url=s.url, timeout=60) as client:
        deadline = time.monotonic() + 180
        for path in ("/readyz", "/batched/readyz"):
            while True:
                try:
                    r = client.get(path)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the app did not become ready ({path})"
                time.sleep(0.5)
    print(f"[serving] apps ready in {time.perf_counter() - t1:.1f}s: {r.json()}")
    try:
        yield s
    finally:
        if s.cli is not None and s.cli.poll() is None:
            s.cli.kill()
        for name in (s.app_name, s.batched_app):
            with contextlib.suppress(Exception):
                serve.delete(name)
        with contextlib.suppress(Exception):
            serve.shutdown()


@pytest.fixture
def client(stack: Stack):
    import httpx

    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c


@pytest.mark.integration
def test_each_person_matches_offline_restore(stack: Stack, client: Any) -> None:
    from pfstorer.images import load_image

    outputs = {}
    for tenant, people in stack.people.items():
        for i, name in enumerate(people):
            seed = 100 + i
            r = _post(client, stack, tenant, stack.photo[(tenant, name)], identity=name, seed=seed)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "image/png"
            assert r.headers["X-PFStorer-Adapter"] == stack.labels[(tenant, name)]
            assert r.headers["X-PFStorer-Adapter"].startswith(f"{tenant}/{name}@")
            assert r.headers["X-PFStorer-Base"] == stack.model.fingerprint
            ref = stack.reference(tenant, name, stack.photo[(tenant, name)], seed)
            assert r.content == ref, f"{tenant}/{name}: served PNG differs from the offline restore"
            outputs[(tenant, name)] = r.content
    assert len(set(outputs.values())) == 6  # six people, six different restorations
    # decoded pixels too (not only the encoder's bytes)
    (tenant, name), png = next(iter(outputs.items()))
    assert torch.equal(load_image(png), load_image(stack.reference(tenant, name, stack.photo[(tenant, name)], 100)))
    # and the `pfstorer restore` CLI, run in a separate process, wrote the same PNG
    rc = stack.cli.wait(timeout=180)
    assert rc == 0, stack.cli.stdout.read().decode()
    first = stack.people[next(iter(stack.people))][0]
    assert stack.cli_out.read_bytes() == outputs[(next(iter(stack.people)), first)]


@pytest.mark.integration
def test_a_tiled_512px_photo_matches_the_cli_at_the_replicas_thread_count(stack: Stack, client: Any) -> None:
    """The CLI's --threads is what makes it match: its process has no thread variable set."""
    r = _post(client, stack, next(iter(stack.people)), stack.photo512, seed=7)
    assert r.status_code == 200, r.text
    assert client.get("/readyz").json()["torch_threads"] == 1
    rc = stack.cli512.wait(timeout=300)
    assert rc == 0, stack.cli512.stdout.read().decode()
    assert stack.cli512_out.read_bytes() == r.content


@pytest.mark.integration
def test_base_only_and_spoofed_multiplex_header(stack: Stack, client: Any) -> None:
    tenant_a, tenant_b = list(stack.people)
    photo = stack.photo[(tenant_a, stack.people[tenant_a][0])]
    ref = stack.reference(None, None, photo, 7)
    r = _post(client, stack, tenant_a, photo, seed=7)
    assert r.status_code == 200 and r.headers["X-PFStorer-Adapter"] == "none" and r.content == ref
    # a named colour fix replaces the base's default one
    r = _post(client, stack, tenant_a, photo, seed=7, color_fix="adain")
    assert r.status_code == 200 and r.content == stack.reference(None, None, photo, 7, color_fix="adain") != ref
    # Serve's routing header from a client must not select anyone's adapter
    spoof = f"{tenant_b}/{stack.people[tenant_b][0]}"
    r = _post(client, stack, tenant_a, photo, seed=7, headers={"serve_multiplexed_model_id": spoof})
    assert r.status_code == 200 and r.headers["X-PFStorer-Adapter"] == "none" and r.content == ref
    # strength 0: the person's adapter is loaded and applied with its gates at 0, i.e. the base exactly
    name = stack.people[tenant_a][0]
    r = _post(client, stack, tenant_a, photo, seed=7, identity=name, strength=0)
    assert r.status_code == 200 and r.headers["X-PFStorer-Adapter"] == stack.labels[(tenant_a, name)]
    assert r.content == ref


@pytest.mark.integration
def test_identities_auth_and_tenancy(stack: Stack, client: Any) -> None:
    tenant_a, tenant_b = list(stack.people)
    r = client.get("/v1/identities", headers={"X-API-Key": stack.keys[tenant_a]})
    assert r.status_code == 200
    body = r.json()
    assert body["tenant"] == tenant_a
    assert sorted(i["identity"] for i in body["identities"]) == sorted(stack.people[tenant_a])
    assert {i["adapter"] for i in body["identities"]} == {stack.labels[(tenant_a, n)] for n in stack.people[tenant_a]}
    assert client.get("/v1/identities").status_code == 401
    assert client.get("/v1/identities", headers={"X-API-Key": generate_key()}).status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}

    photo = stack.photo[(tenant_a, stack.people[tenant_a][0])]
    r = _post(client, stack, None, photo, identity=stack.people[tenant_a][0])
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    other = _post(client, stack, tenant_a, photo, identity=stack.people[tenant_b][0])
    missing = _post(client, stack, tenant_a, photo, identity="Nobody_At_All")
    unsafe = _post(client, stack, tenant_a, photo, identity="../etc")
    assert other.status_code == missing.status_code == unsafe.status_code == 404
    assert other.content == missing.content == unsafe.content
    assert other.json() == {"detail": NOT_FOUND_MESSAGE}


@pytest.mark.integration
def test_limits_and_bad_input_never_500(stack: Stack, client: Any) -> None:
    from PIL import Image

    tenant = next(iter(stack.people))
    h = stack.headers(tenant)

    def status(r: Any) -> int:
        assert r.status_code != 500, r.text
        assert r.headers["content-type"].startswith("application/json"), r.text
        return r.status_code

    # body over max_upload_bytes, declared: refused from Content-Length
    assert status(_post(client, stack, tenant, b"\xff\xd8\xff" + os.urandom(400_000))) == 413
    # body over the limit, streamed without Content-Length (chunked): refused while reading
    boundary = "pfstorerboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(40):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/restore", content=chunks(),
                    headers={**h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status(r) == 413
    # pixels over max_pixels (small file), and a decompression bomb: refused from the header
    buf = io.BytesIO()
    Image.new("RGB", (600, 600), (90, 90, 90)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 300_000
    assert status(_post(client, stack, tenant, buf.getvalue())) == 413
    assert status(_post(client, stack, tenant, _bomb_png(50_000))) == 413
    # not an image; corrupt image; not multipart
    assert status(_post(client, stack, tenant, b"hello, I am a text file\n" * 10)) == 415
    photo = stack.photo[(tenant, stack.people[tenant][0])].read_bytes()
    assert status(_post(client, stack, tenant, photo[: len(photo) // 3])) in (400, 415)
    assert status(_post(client, stack, tenant, b"\x89PNG\r\n\x1a\n" + os.urandom(200))) in (400, 415)
    assert status(client.post("/v1/restore", headers=h, json={"image": "x"})) == 415
    # bad parameters, missing file
    for bad in ({"steps": 0}, {"steps": "many"}, {"scale": 100}, {"color_fix": "sepia"}, {"seed": -1},
                {"colour_fix": "adain"}, {"strength": 1.5}, {"t_start": 0}):
        assert status(_post(client, stack, tenant, photo, **bad)) == 422, bad
    assert status(client.post("/v1/restore", headers=h, data={"identity": "x"}, files={"other": ("a", b"b")})) == 422


@pytest.mark.integration
def test_more_people_than_slots_cycled(stack: Stack, client: Any) -> None:
    tenant = next(iter(stack.people))
    people = stack.people[tenant]  # 3 people, 2 device slots
    before: dict[str, int] = {}
    for rnd in range(2):
        if rnd == 1:  # after a first round every adapter has been read from the store once
            before = stack.restore_handle().get_stats.remote().result()["adapters"]["counts"]
        for name in people:
            seed = 200 + rnd
            r = _post(client, stack, tenant, stack.photo[(tenant, name)], identity=name, seed=seed)
            assert r.status_code == 200, r.text
            assert r.headers["X-PFStorer-Adapter"] == stack.labels[(tenant, name)]
            assert r.content == stack.reference(tenant, name, stack.photo[(tenant, name)], seed), name
    stats = stack.restore_handle().get_stats.remote().result()
    counts = stats["adapters"]["counts"]
    loads = counts.get("load_from_host", 0) - before.get("load_from_host", 0)
    assert loads >= 3  # cycling 3 people over 2 slots evicts every time ...
    assert counts.get("store_read", 0) == before.get("store_read", 0)  # ... but reloads come from RAM
    assert stats["resident"] <= 2 and stats["free_slots"] == 2 - stats["resident"]
    # the same figures reach Prometheus, per tenant (Ray's metrics agent exports every few seconds)
    deadline = time.monotonic() + 60
    while _prometheus("ray_pfstorer_adapter_loads_total", tenant=tenant, source="host") < loads:
        assert time.monotonic() < deadline, "adapter loads never reached Prometheus"
        time.sleep(2)
    assert _prometheus("ray_pfstorer_adapter_loads_total", tenant=tenant, source="store") >= 1
    assert _prometheus("ray_pfstorer_adapter_load_seconds_count", source="host") >= loads
    assert _prometheus("ray_pfstorer_requests_total", tenant=tenant, endpoint="restore", code="200") >= 6


def _prometheus(name: str, **labels: str) -> float:
    import ray

    return prometheus_sum(ray.nodes()[0]["MetricsExportPort"], name, **labels)


@pytest.mark.integration
def test_batches_mix_people_and_match_lone_restores(stack: Stack, client: Any) -> None:
    from pfstorer.images import load_image

    tenant_a, tenant_b = list(stack.people)
    jobs = [(tenant_a, stack.people[tenant_a][0]), (tenant_a, stack.people[tenant_a][1]),
            (tenant_a, None), (tenant_b, stack.people[tenant_b][0])]  # fmt: skip
    photo = {job: stack.photo[(job[0], job[1] or stack.people[tenant_a][2])] for job in jobs}
    handle = stack.restore_handle(stack.batched_app)
    before = handle.get_stats.remote().result()["batches"]

    def one(job: tuple[str, str | None]) -> Any:
        tenant, name = job
        form = {"identity": name} if name else {}
        r = client.post("/batched/v1/restore", headers=stack.headers(tenant), data={**form, "seed": "400"},
                        files={"image": ("p.jpg", photo[job].read_bytes())})  # fmt: skip
        return job, r

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    assert [r.status_code for _, r in results] == [200] * 4, [r.text for _, r in results]
    after = handle.get_stats.remote().result()["batches"]
    assert after["rows"] - before["rows"] == 4
    # one batch mixed people: 3 people over 2 device slots need 2 runs, and no more than 4
    assert after["mixed_runs"] > before["mixed_runs"] and after["largest_run"] >= 2, (before, after)
    for (tenant, name), r in results:
        assert r.headers["X-PFStorer-Adapter"] == (stack.labels[(tenant, name)] if name else "none")
        got = load_image(r.content).mul(255).round()
        ref = load_image(stack.reference(tenant, name, photo[(tenant, name)], 400)).mul(255).round()
        diff = (got - ref).abs()
        # a row of a batch differs from its lone restore by float rounding only
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, diff.max(), (diff > 0).float().mean())
    # ... while another person's adapter on the same photo is far more than rounding away
    (ta, pa), (_, pb) = jobs[0], jobs[1]
    other = load_image(stack.reference(ta, pb, photo[(ta, pa)], 400)).mul(255).round()
    mine = load_image(stack.reference(ta, pa, photo[(ta, pa)], 400)).mul(255).round()
    assert (other - mine).abs().max() > 2


@pytest.mark.integration
def test_overload_answers_503_with_retry_after(stack: Stack, client: Any) -> None:
    tenant = next(iter(stack.people))
    name = stack.people[tenant][0]
    photo = stack.photo[(tenant, name)]
    data = photo.read_bytes()

    def one(i: int) -> Any:
        return _post(client, stack, tenant, data, identity=name, seed=300 + i % 2)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))  # > max_ongoing (2) + max_queued (2)
    codes = [r.status_code for r in results]
    assert 500 not in codes and set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert "overloaded" in r.json()["detail"]
        else:
            assert r.content == stack.reference(tenant, name, photo, int(r.headers["X-PFStorer-Seed"]))


@pytest.mark.integration
def test_base_mismatch_and_forget(stack: Stack, client: Any) -> None:
    import json
    import shutil

    tenant = list(stack.people)[1]
    name = stack.people[tenant][0]
    # an adapter that claims another base: 409, clearly worded
    src = stack.adapter_dirs[(tenant, name)]
    other = src.parent / "Other_Base"
    shutil.copytree(src, other)
    meta = json.loads((other / "adapter.json").read_text())
    meta.update(identity="Other_Base", base_fingerprint="0" * 32)
    (other / "adapter.json").write_text(json.dumps(meta))
    stack.registry.publish(other, tenant, "Other_Base", job_key="other-base")
    time.sleep(2.2)  # the index is re-checked every 2 s on the request path
    r = _post(client, stack, tenant, stack.photo[(tenant, name)], identity="Other_Base")
    assert r.status_code == 409 and "base" in r.json()["detail"], r.text

    # forgetting a person (biometric data): 404 afterwards, and the replica drops its copies
    r = _post(client, stack, tenant, stack.photo[(tenant, name)], identity=name, seed=100)
    assert r.status_code == 200
    before = stack.restore_handle().get_stats.remote().result()["forgotten"]
    stack.registry.forget(tenant, name)
    time.sleep(2.2)
    stack.restore_handle().sweep.remote().result()  # (a periodic sweep may have come first)
    after = stack.restore_handle().get_stats.remote().result()["forgotten"]
    assert after["host"] - before["host"] >= 1 and after["device"] - before["device"] >= 1, (before, after)
    r = _post(client, stack, tenant, stack.photo[(tenant, name)], identity=name, seed=100)
    assert r.status_code == 404 and r.json() == {"detail": NOT_FOUND_MESSAGE}
