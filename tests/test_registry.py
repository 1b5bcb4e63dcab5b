"""The shared adapter layer: store, index, MLflow registry, facade (local and S3 + mlflow server)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _services import MlflowService, unique_name
from safetensors.numpy import save_file

from pfstorer.errors import AdapterError, PFStorerError
from registry import (
    AdapterIndex,
    AdapterRegistry,
    ArtifactStore,
    IndexEntry,
    ModelRegistry,
    StoredRegistration,
    check_key,
    is_safe_key,
    job_key,
    model_key,
    model_name,
    parse_model_key,
)

BASE = "tiny-0123456789abcdef"


def make_adapter(
    root: Path, tenant: str | None, identity: str, seed: int = 0, *, corrupt: bool = False
) -> Path:
    """An adapter directory as pfstorer writes it (tensors + JSON with their sha256)."""
    d = root / f"{identity}-{seed}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"x": rng.standard_normal(4).astype(np.float32)}, str(d / "adapter.safetensors"))
    meta = {
        "format_version": 1,
        "identity": identity,
        "tenant": tenant,
        "base_fingerprint": BASE,
        "config": {"steps": 5, "lr": 1e-3},
        "steps": 5,
        "final_losses": {"diff": 0.1 + seed, "gen": 0.2},
        "tensors_sha256": hashlib.sha256((d / "adapter.safetensors").read_bytes()).hexdigest(),
    }
    (d / "adapter.json").write_text(json.dumps(meta))
    if corrupt:  # bytes change after the JSON was written: the hash no longer matches
        data = bytearray((d / "adapter.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (d / "adapter.safetensors").write_bytes(bytes(data))
    return d


def lineage(**extra) -> dict:
    return {
        "manifest_uri": "s3://bucket/m.parquet",
        "manifest_hash": "ab" * 32,
        "base_licence": "Apache-2.0",
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def test_keys_and_names():
    for ok in ("AJ_Cook", "a", "x.y-z_1", "A" * 128):
        assert is_safe_key(ok)
    for bad in ("../x", "a/b", "", ".hidden", "a..b", "a b", "A" * 129, None, 3, "é"):
        assert not is_safe_key(bad)
    assert is_safe_key("acme-1", "tenant") and not is_safe_key("a.b", "tenant")
    with pytest.raises(PFStorerError, match="not a safe key"):
        check_key("../x")
    assert model_name("acme", "A.B") == "pfstorer.acme.A.B"
    assert model_key("acme", "bob") == "acme/bob"
    assert parse_model_key("acme/bob") == ("acme", "bob")
    for bad in ("", "acme", "acme/../x", "a.b/c"):
        with pytest.raises(PFStorerError):
            parse_model_key(bad)


def test_job_key_is_stable_and_sensitive():
    k = job_key(["b" * 64, "a" * 64], BASE, {"steps": 5, "lr": 1e-3})
    assert len(k) == 32 and int(k, 16) >= 0
    assert k == job_key(["a" * 64, "b" * 64], BASE, {"lr": 1e-3, "steps": 5})  # order-free
    assert k != job_key(["a" * 64], BASE, {"steps": 5, "lr": 1e-3})
    assert k != job_key(["a" * 64, "b" * 64], BASE + "x", {"steps": 5, "lr": 1e-3})
    assert k != job_key(["a" * 64, "b" * 64], BASE, {"steps": 6, "lr": 1e-3})


# ---------------------------------------------------------------------------------------------
# store and index (no MLflow)
# ---------------------------------------------------------------------------------------------


class FlakyStore(ArtifactStore):
    """A store whose transport flips one byte of the tensors on the way (the bytes that land
    differ from the bytes sent)."""

    def _upload(self, local_path: Path, remote_path: str) -> None:
        data = bytearray(local_path.read_bytes())
        if local_path.name == "adapter.safetensors":
            data[len(data) // 2] ^= 0x01
        self.fs.pipe_file(remote_path, bytes(data))


def test_store_put_verify_fetch(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    src = make_adapter(tmp_path / "src", "acme", "bob")
    uri, sha = store.put_adapter(src, "acme", "bob", "k1")
    assert sha == hashlib.sha256((src / "adapter.safetensors").read_bytes()).hexdigest()
    assert uri == (tmp_path / "store" / "acme" / "bob" / "k1").as_uri()
    assert store.exists("acme", "bob", "k1") and not store.exists("acme", "bob", "k2")
    assert [Path(u).name for u in store.list_files("acme", "bob")] == [
        "adapter.json",
        "adapter.safetensors",
    ]  # no temporary files left
    got = store.fetch_adapter(uri, tmp_path / "cache" / "x", sha)
    assert (got / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    # a wrong expectation fails and leaves nothing
    with pytest.raises(AdapterError, match="fails verification"):
        store.fetch_adapter(uri, tmp_path / "cache" / "y", "0" * 64)
    assert not (tmp_path / "cache" / "y").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["x"]
    # a locally corrupt adapter, and a transport that corrupts, both refuse to store
    with pytest.raises(AdapterError, match="corrupt"):
        store.put_adapter(make_adapter(tmp_path / "src", "acme", "eve", corrupt=True), "acme", "eve", "k1")
    flaky = FlakyStore(tmp_path / "store")
    with pytest.raises(AdapterError, match="upload of adapter.safetensors .* is corrupt"):
        flaky.put_adapter(make_adapter(tmp_path / "src", "acme", "ann"), "acme", "ann", "k1")
    assert store.list_files("acme", "ann") == [] and store.list_files("acme", "eve") == []
    with pytest.raises(PFStorerError):
        store.put_adapter(src, "acme", "../x", "k1")
    assert store.delete_identity("acme", "bob") == 2
    assert store.list_files("acme") == [] and not store.exists("acme", "bob")


def test_a_killed_uploaders_leftovers_are_swept_by_the_next_upload(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    person = tmp_path / "store" / "acme" / "bob"
    dead, live = person / ".tmp-k0-dead", person / ".tmp-k1-live"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "adapter.safetensors").write_bytes(b"half an upload")
    old = time.time() - ArtifactStore.STALE_UPLOAD_S - 60
    os.utime(dead / "adapter.safetensors", (old, old))
    store.put_adapter(make_adapter(tmp_path / "src", "acme", "bob"), "acme", "bob", "k2")
    assert sorted(p.name for p in person.iterdir()) == [".tmp-k1-live", "k2"]  # a live upload is kept
    assert store.sweep_uploads("acme", "bob", older_than_s=0) == 1 and sorted(p.name for p in person.iterdir()) == ["k2"]
    assert store.sweep_uploads("acme", "nobody") == 0


@pytest.mark.integration
def test_leftover_uploads_on_s3_are_told_by_their_last_modified(s3_url: str, s3_storage_options: dict):
    store = ArtifactStore(f"{s3_url}/sweep", s3_storage_options)
    tenant = unique_name("acme")
    store.fs.pipe_file(f"{store.root}/{tenant}/bob/.tmp-k0-dead/adapter.json", b"{}")
    store.fs.pipe_file(f"{store.root}/{tenant}/bob/k0/adapter.json", b"{}")
    assert store.sweep_uploads(tenant, "bob") == 0  # seconds old: maybe still being written
    assert store.sweep_uploads(tenant, "bob", older_than_s=0) == 1
    store.fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in store.fs.ls(f"{store.root}/{tenant}/bob")] == ["k0"]


def test_index_upsert_visible_to_second_instance(tmp_path: Path):
    url = tmp_path / "state" / "index.parquet"
    writer, reader = AdapterIndex(url), AdapterIndex(url)
    assert reader.get("acme", "bob") is None and reader.list() == []
    e1 = IndexEntry("acme", "bob", 1, "file:///x/1", "a" * 64, BASE, "k1")
    writer.upsert([e1, IndexEntry("other", "bob", 3, "file:///y", "b" * 64)])
    got = reader.get("acme", "bob")
    assert (got.version, got.uri, got.sha256, got.job_key) == (1, "file:///x/1", "a" * 64, "k1")
    assert got.updated_at is not None and got.label == "acme/bob@1"
    assert [e.key for e in reader.list("acme")] == ["acme/bob"]
    writer.upsert([IndexEntry("acme", "bob", 2, "file:///x/2", "c" * 64, BASE, "k2")])
    assert reader.get("acme", "bob").version == 2  # the reader re-reads the changed file
    assert reader.remove("other", "bob") and not reader.remove("other", "bob")
    assert writer.get("other", "bob") is None
    assert len(writer) == 1
    # a reader that checks at most every 60 s keeps its cached view meanwhile
    lazy = AdapterIndex(url, max_age_s=60)
    assert lazy.get("acme", "bob").version == 2
    writer.upsert([IndexEntry("acme", "ann", 1, "file:///z", "d" * 64)])
    assert lazy.get("acme", "ann") is None and lazy.refresh(force=True)
    assert lazy.get("acme", "ann") is not None


def test_index_check_is_what_readiness_asks(tmp_path: Path):
    """A missing or unreadable index fails the check; a readable one passes, empty or not."""
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index.check()
    AdapterIndex(url).upsert([IndexEntry("acme", "bob", 1, "file:///x", "a" * 64)])
    index.check()
    url.write_bytes(b"PAR1" + b"\0" * 64)  # a truncated Parquet file
    with pytest.raises(Exception, match="(?i)parquet"):
        index.check()
    with pytest.raises(Exception, match="(?i)parquet"):
        index.check()  # still broken: the check says so every time, it does not flap
    url.unlink()
    with pytest.raises(FileNotFoundError):
        index.check()
    AdapterIndex(url).upsert([IndexEntry("acme", "ann", 1, "file:///z", "b" * 64)])
    index.check()
    assert [e.identity for e in index.list()] == ["ann"]


def test_index_lookups_never_wait_for_a_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """While one thread parses a changed index, lookups answer from the entries they have."""
    url = tmp_path / "index.parquet"
    writer, reader = AdapterIndex(url), AdapterIndex(url)
    writer.upsert([IndexEntry("acme", "bob", 1, "file:///x/1", "a" * 64)])
    assert reader.get("acme", "bob").version == 1
    writer.upsert([IndexEntry("acme", "bob", 2, "file:///x/2", "a" * 64)])
    parsing, release = threading.Event(), threading.Event()
    real_read = reader._read

    def slow_read():
        parsing.set()
        release.wait(10)
        return real_read()

    monkeypatch.setattr(reader, "_read", slow_read)
    t = threading.Thread(target=reader.refresh)
    t.start()
    assert parsing.wait(10)
    t0 = time.monotonic()
    assert reader.get("acme", "bob").version == 1  # the old entry, at once
    assert time.monotonic() - t0 < 1.0
    release.set()
    t.join(10)
    assert reader.get("acme", "bob").version == 2  # swapped in once parsed


def test_index_concurrent_writers_lose_nothing(tmp_path: Path):
    url = tmp_path / "index.parquet"
    a, b = AdapterIndex(url), AdapterIndex(url)

    def write(index: AdapterIndex, prefix: str) -> None:
        for i in range(15):
            index.upsert([IndexEntry("acme", f"{prefix}{i}", 1, f"file:///{prefix}{i}", "e" * 64)])

    threads = [threading.Thread(target=write, args=(ix, p)) for ix, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(AdapterIndex(url).list("acme")) == 30
    assert not list(tmp_path.glob("index.parquet.tmp-*"))


# ---------------------------------------------------------------------------------------------
# MLflow: a real SQLite store, and a real mlflow server on PostgreSQL (as on the cluster)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres-server"])
def mlflow_db(request: pytest.FixtureRequest) -> MlflowService:
    """MLflow straight on SQLite (the default) and an ``mlflow server`` on PostgreSQL."""
    return request.getfixturevalue("mlflow_local" if request.param == "sqlite" else "mlflow_pg_server")


@pytest.fixture
def store_of(
    mlflow_db: MlflowService, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict | None]:
    """(store URL, storage options) that go with ``mlflow_db``: a local folder beside SQLite; S3
    (moto) behind a server, which refuses local paths as version sources (as on the cluster).
    The options are also in ``PFSTORER_STORAGE_OPTIONS`` for the CLI."""
    if not mlflow_db.tracking_uri.startswith("http"):
        return str(tmp_path / "adapters"), None
    options = request.getfixturevalue("s3_storage_options")
    monkeypatch.setenv("PFSTORER_STORAGE_OPTIONS", json.dumps(options))
    return f"{request.getfixturevalue('s3_url')}/adapters", options


def local_registry(
    tmp_path: Path, mlflow: MlflowService, store: tuple[str, dict | None] | None = None
) -> AdapterRegistry:
    store_url, options = store or (str(tmp_path / "adapters"), None)
    return AdapterRegistry.from_urls(
        store_url,
        mlflow.tracking_uri,
        str(tmp_path / "index.parquet"),
        artifact_location=mlflow.artifact_location,
        storage_options=options,
    )


def assert_forgotten(reg: AdapterRegistry, tenant: str, identity: str) -> None:
    name = model_name(tenant, identity)
    client = reg.models.client
    assert client.search_registered_models(f"name = '{name}'") == []
    assert reg.models.versions(tenant, identity) == []
    assert reg.models.job_runs(tenant, identity) == []
    # soft-deleted runs remain only behind a server (until `mlflow gc`); local stores purge them
    left = reg.models.job_runs(tenant, identity, include_deleted=True)
    assert all(r.info.lifecycle_stage == "deleted" for r in left)
    if not reg.models.tracking_uri.startswith("http"):
        assert left == []
    assert reg.store.list_files(tenant, identity) == []
    assert reg.index.get(tenant, identity) is None
    assert reg.resolve(tenant, identity) is None


def publish_flow(reg: AdapterRegistry, tmp_path: Path, tenant: str) -> None:
    """publish -> v1 + prod + tags; same job key -> nothing new; new job -> v2; corrupt -> no
    version; fetch verifies; forget leaves nothing."""
    models = reg.models
    src = make_adapter(tmp_path / "src", tenant, "bob", seed=1)
    key1 = job_key(["a" * 64, "b" * 64, "c" * 64], BASE, {"steps": 5})
    run_id = models.log_job_run(
        tenant, "bob", {"config": {"steps": 5, "lr": 1e-3}, "refs": 3}, [1.0, 0.5, 0.25],
        {"final_loss": 0.25}, job_key=key1,
    )  # fmt: skip
    entry = reg.publish(src, tenant, "bob", key1, lineage(), run_id=run_id)
    assert entry.version == 1 and entry.job_key == key1 and entry.base_fingerprint == BASE
    assert entry.sha256 == hashlib.sha256((src / "adapter.safetensors").read_bytes()).hexdigest()
    assert reg.resolve(tenant, "bob") == entry

    name = model_name(tenant, "bob")
    mv = models.client.get_model_version_by_alias(name, "prod")
    assert int(mv.version) == 1 and mv.source == entry.uri and mv.run_id == run_id
    tags = mv.tags
    assert tags["job_key"] == key1 and tags["sha256"] == entry.sha256
    assert tags["artifact_uri"] == entry.uri and tags["base_fingerprint"] == BASE
    assert tags["manifest_hash"] == "ab" * 32 and tags["manifest_uri"] == "s3://bucket/m.parquet"
    assert tags["base_licence"] == "Apache-2.0"
    assert json.loads(tags["config"]) == {"steps": 5, "lr": 1e-3}
    assert json.loads(tags["metrics"]) == {"diff": 1.1, "gen": 0.2}
    run = models.client.get_run(run_id)
    assert run.data.params["config.lr"] == "0.001" and run.data.tags["identity"] == "bob"
    history = models.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]

    # the same job again registers nothing and stores nothing
    files = reg.store.list_files(tenant, "bob")
    again = reg.publish(make_adapter(tmp_path / "src2", tenant, "bob", seed=9), tenant, "bob", key1, lineage())
    assert again.version == 1 and again.sha256 == entry.sha256
    assert [v.version for v in models.versions(tenant, "bob")] == [1]
    assert reg.store.list_files(tenant, "bob") == files

    # fetch verifies, caches, and re-fetches a tampered cached copy
    cache = tmp_path / "cache"
    local = reg.fetch(entry, cache)
    assert hashlib.sha256((local / "adapter.safetensors").read_bytes()).hexdigest() == entry.sha256
    (local / "adapter.safetensors").write_bytes(b"tampered")
    assert reg.fetch(entry, cache) == local
    assert hashlib.sha256((local / "adapter.safetensors").read_bytes()).hexdigest() == entry.sha256
    with pytest.raises(AdapterError):
        reg.fetch(IndexEntry(tenant, "bob", 1, entry.uri, "f" * 64), tmp_path / "cache2")

    # a new job -> version 2, prod and the index move
    key2 = job_key(["d" * 64, "e" * 64, "f" * 64], BASE, {"steps": 5})
    e2 = reg.publish(make_adapter(tmp_path / "src", tenant, "bob", seed=2), tenant, "bob", key2, lineage())
    assert e2.version == 2 and e2.uri != entry.uri
    assert models.get_prod(tenant, "bob").version == 2
    assert reg.resolve(tenant, "bob").version == 2
    # the index lost its row (a crash between register and index): a rerun repairs it
    reg.index.remove(tenant, "bob")
    assert reg.publish(src, tenant, "bob", key2, lineage()).version == 2
    assert reg.resolve(tenant, "bob").version == 2

    # a corrupted artifact (bytes mutated after its JSON) stores and registers nothing
    bad = make_adapter(tmp_path / "src", tenant, "eve", seed=3, corrupt=True)
    with pytest.raises(AdapterError, match="corrupt"):
        reg.publish(bad, tenant, "eve", job_key(["9" * 64], BASE, {}), lineage())
    assert models.versions(tenant, "eve") == [] and reg.store.list_files(tenant, "eve") == []
    assert reg.resolve(tenant, "eve") is None
    # an adapter of someone else is refused
    with pytest.raises(AdapterError, match="belongs to identity 'bob'"):
        reg.publish(src, tenant, "eve", "k", lineage())
    # ... also by the step the run's publisher uses (the adapter already in the store)
    with pytest.raises(AdapterError, match="belongs to identity 'bob'"):
        reg.register_stored(tenant, "eve", "file:///elsewhere", "a" * 64, {"identity": "bob"}, job_key="k")
    assert models.versions(tenant, "eve") == []

    # forget: nothing left in registry, store, index
    report = reg.forget(tenant, "bob", cache_dir=cache)
    assert report.index_removed and report.model_deleted
    assert (report.versions_deleted, report.runs_deleted, report.files_deleted) == (2, 1, 4)
    assert report.runs_pending_gc == (1 if reg.models.tracking_uri.startswith("http") else 0)
    assert_forgotten(reg, tenant, "bob")
    assert not (cache / tenant / "bob").exists()
    assert not reg.forget(tenant, "bob").found_anything  # safe to repeat


@pytest.mark.integration
def test_publish_fetch_forget(tmp_path: Path, mlflow_db: MlflowService, store_of: tuple):
    reg = local_registry(tmp_path, mlflow_db, store_of)
    publish_flow(reg, tmp_path, unique_name("acme"))


@pytest.mark.integration
def test_corrupted_upload_registers_nothing(tmp_path: Path, mlflow_local: MlflowService):
    tenant = unique_name("acme")
    reg = local_registry(tmp_path, mlflow_local)
    reg = AdapterRegistry(FlakyStore(tmp_path / "adapters"), reg.index, reg.models)
    with pytest.raises(AdapterError, match="is corrupt"):
        reg.publish(make_adapter(tmp_path / "src", tenant, "bob"), tenant, "bob", "k1", lineage())
    assert reg.models.versions(tenant, "bob") == []
    assert reg.store.list_files(tenant) == [] and reg.index.list(tenant) == []


@pytest.mark.integration
def test_register_is_idempotent_by_job_key(mlflow_db: MlflowService):
    tenant = unique_name("acme")
    models = ModelRegistry(mlflow_db.tracking_uri, artifact_location=mlflow_db.artifact_location)
    v1 = models.register(tenant, "bob", "s3://b/x/k1", "a" * 64, {"job_key": "k1", "config": {"a": 1}})
    assert v1 == 1
    assert models.register(tenant, "bob", "s3://b/x/k1", "a" * 64, {"job_key": "k1"}) == 1
    assert models.find_version(tenant, "bob", "k1").version == 1
    assert models.find_version(tenant, "bob", "k2") is None
    assert models.register(tenant, "bob", "s3://b/x/k2", "b" * 64, {}, job_key="k2") == 2
    assert models.get_prod(tenant, "bob").version == 2
    assert models.get_prod(tenant, "nobody") is None
    assert models.delete(tenant, "bob")["versions"] == 2
    assert models.versions(tenant, "bob") == []


@pytest.mark.integration
def test_racing_registrations_of_one_job_leave_one_version(mlflow_db: MlflowService):
    """A retried task beside a slow original: three register the same job key at once, ten times
    over (before the alias writes retried on a lost race, about 1 round in 5 raised on SQLite;
    4 rounds behind the server, whose calls take longer)."""
    models = ModelRegistry(mlflow_db.tracking_uri, artifact_location=mlflow_db.artifact_location)
    for _ in range(4 if mlflow_db.tracking_uri.startswith("http") else 10):
        tenant = unique_name("acme")
        results: list[int] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(3)

        def go() -> None:
            barrier.wait()
            try:
                results.append(models.register(tenant, "bob", "s3://b/x/k1", "a" * 64, {}, job_key="k1"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        versions = models.versions(tenant, "bob")
        assert len(versions) == 1 and results == [versions[0].version] * 3
        assert models.get_prod(tenant, "bob").version == versions[0].version
    # and a duplicate that slipped in earlier is settled on the next registration
    models.client.create_model_version(
        model_name(tenant, "bob"), source="s3://b/x/k1", tags={"job_key": "k1"}, await_creation_for=0
    )
    assert len(models.versions(tenant, "bob")) == 2
    assert models._settle(tenant, "bob", "k1", 0) == versions[0].version
    assert [v.version for v in models.versions(tenant, "bob")] == [versions[0].version]


@pytest.mark.integration
def test_batch_registration_is_lean_and_exactly_once(
    tmp_path: Path, mlflow_db: MlflowService, monkeypatch: pytest.MonkeyPatch
):
    """A publisher's batch: each new person costs 3 MLflow calls plus one shared listing, a job
    run 4; a foreign adapter fails alone; the same batch again creates nothing; lineage is whole
    and forget removes it all."""
    import requests

    reg = local_registry(tmp_path, mlflow_db)
    tenant = unique_name("acme")
    people = ["ann", "bob", "cat", "dan"]
    runs = {p: reg.models.log_job_run(tenant, p, {"steps": 5}, [0.5, 0.25], {"final": 0.25}, job_key=f"k-{p}")
            for p in people[:1]}
    calls: list[str] = []
    original = requests.Session.request

    def counted(session, method, url, *args, **kwargs):
        calls.append(f"{method} {url.rsplit('/api/', 1)[-1]}")
        return original(session, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", counted)
    runs.update({p: reg.models.log_job_run(tenant, p, {"steps": 5}, [0.5, 0.25], {"final": 0.25}, job_key=f"k-{p}")
                 for p in people[1:]})
    run_calls, calls[:] = list(calls), []

    def batch() -> list[StoredRegistration]:
        items = [StoredRegistration(tenant, p, f"s3://b/{tenant}/{p}/k-{p}", "a" * 64,
                                    {"identity": p, "tenant": tenant, "base_fingerprint": BASE}, lineage(),
                                    runs[p], f"k-{p}") for p in people]
        items.append(StoredRegistration(tenant, "eve", "s3://b/x", "b" * 64, {"identity": "bob"}, lineage(),
                                        None, "k-eve"))
        return items

    first = reg.register_stored_many(batch())
    assert [e.version for e in first[:4]] == [1, 1, 1, 1]
    assert isinstance(first[4], AdapterError) and "belongs to identity 'bob'" in str(first[4])
    if mlflow_db.tracking_uri.startswith("http"):  # count what crossed the wire
        assert len(run_calls) == 4 * 3, run_calls  # run, params+metrics, job.json, end
        assert len(calls) == 3 * 4 + 1, calls  # model, version, alias each; one listing
    again = reg.register_stored_many(batch())
    assert [e.version for e in again[:4]] == [1, 1, 1, 1]
    listed = reg.models.versions_of(model_name(tenant, p) for p in people)
    for p in people:
        (v,) = listed[model_name(tenant, p)]
        assert v.tags["job_key"] == f"k-{p}" and v.run_id == runs[p] and reg.models.get_prod(tenant, p) is not None
        assert v.tags["manifest_hash"] == "ab" * 32 and v.tags["base_fingerprint"] == BASE
        run = reg.models.client.get_run(runs[p])
        assert run.info.status == "FINISHED" and run.data.params["steps"] == "5"
        assert [m.value for m in reg.models.client.get_metric_history(runs[p], "loss")] == [0.5, 0.25]
        assert reg.models.client.list_artifacts(runs[p])[0].path == "job.json"
    report = reg.forget(tenant, "cat")
    assert report.model_deleted and report.versions_deleted == 1 and report.runs_deleted == 1
    assert_forgotten(reg, tenant, "cat")


@pytest.mark.integration
def test_cli_forget(tmp_path: Path, mlflow_db: MlflowService, store_of: tuple, capsys):
    from pipelines.cli import main

    tenant = unique_name("acme")
    reg = local_registry(tmp_path, mlflow_db, store_of)
    reg.publish(make_adapter(tmp_path / "src", tenant, "bob"), tenant, "bob", "k1", lineage())
    argv = [
        "forget", "--tenant", tenant, "--identity", "bob", "--store", store_of[0],
        "--tracking-uri", mlflow_db.tracking_uri, "--index", str(tmp_path / "index.parquet"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"forgot {tenant}/bob" in out and "2 files deleted" in out
    assert_forgotten(reg, tenant, "bob")
    assert main(argv) == 0 and "nothing stored" in capsys.readouterr().out
    assert main(argv[:4] + ["../x"] + argv[5:]) == 2


def test_read_adapter_in_memory(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    src = make_adapter(tmp_path / "src", "acme", "bob")
    uri, sha = store.put_adapter(src, "acme", "bob", "k1")
    data, meta = store.read_adapter(uri, sha)
    assert data == (src / "adapter.safetensors").read_bytes() and meta["identity"] == "bob"
    with pytest.raises(AdapterError, match="fails verification"):
        store.read_adapter(uri, "0" * 64)
    stored = tmp_path / "store" / "acme" / "bob" / "k1" / "adapter.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")  # bit rot in the store
    with pytest.raises(AdapterError, match="fails verification"):
        store.read_adapter(uri, sha)
    with pytest.raises(AdapterError, match="fails verification"):
        store.fetch_adapter(uri, tmp_path / "dest", sha)
    assert not (tmp_path / "dest").exists()


def test_serving_path_never_imports_mlflow(tmp_path: Path):
    """A read-only registry (no tracking URI) resolves and reads without importing MLflow."""
    import subprocess
    import sys

    store = ArtifactStore(tmp_path / "store")
    uri, sha = store.put_adapter(make_adapter(tmp_path / "src", "acme", "bob"), "acme", "bob", "k1")
    AdapterIndex(tmp_path / "index.parquet").upsert([IndexEntry("acme", "bob", 1, uri, sha)])
    code = (
        "import sys\n"
        "from registry import AdapterRegistry\n"
        f"reg = AdapterRegistry.from_urls({str(tmp_path / 'store')!r}, None, "
        f"{str(tmp_path / 'index.parquet')!r})\n"
        "entry = reg.resolve('acme', 'bob')\n"
        "data, meta = reg.read(entry)\n"
        "assert meta['identity'] == 'bob', meta\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
        "print('ok', entry.label, flush=True)\n"
        # skip interpreter teardown: pyarrow's thread pool sometimes aborts it ("terminate called
        # without an active exception", ~1 run in 6), which says nothing about MLflow imports
        "import os; os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok acme/bob@1"


def test_from_settings_reads_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var in ("PFSTORER_STORE_URL", "PFSTORER_TRACKING_URI", "PFSTORER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PFSTORER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PFSTORER_INDEX_URL", str(tmp_path / "elsewhere" / "index.parquet"))
    monkeypatch.setenv("PFSTORER_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    reg = AdapterRegistry.from_settings()
    from registry import default_storage_options

    assert default_storage_options("s3://bucket/index.parquet") == {"endpoint_url": "http://127.0.0.1:1"}
    assert default_storage_options(str(tmp_path / "index.parquet")) == {}
    assert reg.store.url == str(tmp_path / "state" / "adapters")
    assert reg.index.url == str(tmp_path / "elsewhere" / "index.parquet")
    assert reg.models.tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert reg.models.artifact_location == (tmp_path / "state" / "mlartifacts").as_uri()
    assert not (tmp_path / "state").exists()  # nothing is created before it is used


def test_local_defaults_layout(tmp_path: Path):
    from registry import local_defaults

    urls = local_defaults(tmp_path / "state")
    assert urls["tracking_uri"] == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert urls["store_url"] == str(tmp_path / "state" / "adapters")
    assert urls["index_url"] == str(tmp_path / "state" / "index.parquet")
    serving = AdapterRegistry.from_urls(urls["store_url"], None, urls["index_url"])
    assert serving.resolve("acme", "bob") is None and serving.resolve("acme", "../x") is None
    with pytest.raises(PFStorerError, match="without an MLflow"):
        serving.forget("acme", "bob")


# ---------------------------------------------------------------------------------------------
# S3 (moto server) + mlflow server subprocess with S3 artifacts
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_publish_fetch_forget_s3_and_mlflow_server(
    tmp_path: Path, s3_url: str, s3_storage_options: dict, mlflow_server: MlflowService
):
    import boto3

    reg = AdapterRegistry.from_urls(
        f"{s3_url}/adapters",
        mlflow_server.tracking_uri,
        f"{s3_url}/index.parquet",
        storage_options=s3_storage_options,
    )
    tenant = unique_name("acme")
    publish_flow(reg, tmp_path, tenant)

    # index on S3 visible to a second instance; stored files on S3; artifacts proxied to S3
    src = make_adapter(tmp_path / "src3", tenant, "ann", seed=4)
    run_id = reg.models.log_job_run(tenant, "ann", {"steps": 5}, [0.3, 0.2], {"final": 0.2}, job_key="k1")
    entry = reg.publish(src, tenant, "ann", "k1", lineage(), run_id=run_id)
    assert entry.uri == f"{s3_url}/adapters/{tenant}/ann/k1"
    second = AdapterIndex(f"{s3_url}/index.parquet", s3_storage_options)
    assert second.get(tenant, "ann") == entry
    s3 = boto3.client("s3", endpoint_url=s3_storage_options["endpoint_url"], region_name="us-east-1")
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)

    def keys(p: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=p).get("Contents", [])]

    assert sorted(k.rsplit("/", 1)[1] for k in keys(f"{prefix}/adapters/{tenant}/ann/")) == [
        "adapter.json",
        "adapter.safetensors",
    ]
    run = reg.models.client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    run_path = run.info.artifact_uri.split("mlflow-artifacts:/", 1)[1].strip("/")
    assert [k.rsplit("/", 1)[1] for k in keys(f"mlflow-artifacts/{run_path}/")] == ["job.json"]
    fetched = reg.fetch(second.get(tenant, "ann"), tmp_path / "cache")
    assert (fetched / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()

    report = reg.forget(tenant, "ann")
    assert report.files_deleted == 2 and report.runs_deleted == 1
    assert_forgotten(reg, tenant, "ann")
    assert second.get(tenant, "ann") is None
    assert keys(f"{prefix}/adapters/{tenant}/") == []
    assert keys(f"mlflow-artifacts/{run_path}/") == []  # the run's artifacts are gone too
