"""The shared adapter layer on real services: S3 (moto server), MLflow (SQLite, an ``mlflow
server``, and one on PostgreSQL where its binaries are installed).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from pfstorer.errors import AdapterError
from registry import (
    AdapterIndex,
    AdapterRegistry,
    ArtifactStore,
    IndexEntry,
    JobSummary,
    ModelRegistry,
    StoredRegistration,
    job_key,
    model_name,
)

from _registry_cases import BASE, FlakyStore, make_adapter, write_concurrently
from _services import MlflowService, unique_name


def lineage(**extra) -> dict:
    return {
        "manifest_uri": "s3://bucket/m.parquet",
        "manifest_hash": "ab" * 32,
        "base_licence": "Apache-2.0",
        **extra,
    }




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
    """publish -> v1 + tags + its job run; same job key -> nothing new; new job -> v2; corrupt
    -> no version; fetch verifies; forget leaves nothing."""
    models = reg.models
    src = make_adapter(tmp_path / "src", tenant, "bob", seed=1)
    key1 = job_key(["a" * 64, "b" * 64, "c" * 64], BASE, {"steps": 5})
    run_id = models.log_jobs_run(
        tenant, [JobSummary("bob", key1, {"refs": 3}, {"final_loss": 0.25}, [1.0, 0.5, 0.25])],
        {"config": {"steps": 5, "lr": 1e-3}},
    )  # fmt: skip
    entry = reg.publish(src, tenant, "bob", key1, lineage(), run_id=run_id)
    assert entry.version == 1 and entry.job_key == key1 and entry.base_fingerprint == BASE
    assert entry.sha256 == hashlib.sha256((src / "adapter.safetensors").read_bytes()).hexdigest()
    assert reg.resolve(tenant, "bob") == entry

    name = model_name(tenant, "bob")
    (mv,) = models.versions(tenant, "bob")
    assert mv.name == name and mv.version == 1 and mv.source == entry.uri and mv.run_id == run_id
    tags = mv.tags
    assert tags["job_key"] == key1 and tags["sha256"] == entry.sha256
    assert tags["artifact_uri"] == entry.uri and tags["base_fingerprint"] == BASE
    assert tags["manifest_hash"] == "ab" * 32 and tags["manifest_uri"] == "s3://bucket/m.parquet"
    assert tags["base_licence"] == "Apache-2.0"
    assert json.loads(tags["config"]) == {"steps": 5, "lr": 1e-3}
    assert json.loads(tags["metrics"]) == {"diff": 1.1, "gen": 0.2}
    run = models.client.get_run(run_id)
    assert run.data.params["config.lr"] == "0.001" and run.data.tags["jobs"] == "1"
    job = json.loads(run.data.tags["job.bob"])
    assert job["job_key"] == key1 and job["params"] == {"refs": 3} and job["loss_curve"] == [1.0, 0.5, 0.25]
    assert [m.value for m in models.client.get_metric_history(run_id, "mean_final_loss")] == [0.25]

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

    # a new job -> version 2, the newest, and the index moves
    key2 = job_key(["d" * 64, "e" * 64, "f" * 64], BASE, {"steps": 5})
    e2 = reg.publish(make_adapter(tmp_path / "src", tenant, "bob", seed=2), tenant, "bob", key2, lineage())
    assert e2.version == 2 and e2.uri != entry.uri
    assert models.newest(tenant, "bob").version == 2
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
    assert (report.versions_deleted, report.job_records_deleted, report.runs_deleted, report.files_deleted) == (
        2, 1, 1, 4)
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
    assert models.newest(tenant, "bob").version == 2
    assert models.newest(tenant, "nobody") is None
    assert models.delete(tenant, "bob")["versions"] == 2
    assert models.versions(tenant, "bob") == []


@pytest.mark.integration
def test_racing_registrations_of_one_job_leave_one_version(mlflow_db: MlflowService):
    """A retried task beside a slow original: three register the same job key at once, ten times
    over (4 rounds behind the server, whose calls take longer)."""
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
    # and a duplicate that slipped in earlier is settled on the next registration
    models.client.create_model_version(
        model_name(tenant, "bob"), source="s3://b/x/k1", tags={"job_key": "k1"}, await_creation_for=0
    )
    assert len(models.versions(tenant, "bob")) == 2
    assert models.register(tenant, "bob", "s3://b/x/k1", "a" * 64, {}, job_key="k1") == versions[0].version
    assert [v.version for v in models.versions(tenant, "bob")] == [versions[0].version]


@pytest.mark.integration
def test_batch_registration_is_lean_and_exactly_once(
    tmp_path: Path, mlflow_db: MlflowService, monkeypatch: pytest.MonkeyPatch
):
    """A publisher's batch: each new person costs 2 MLflow calls plus one shared listing, the
    batch's job run 3 whatever its size; a foreign adapter fails alone; the same batch again
    creates nothing; lineage is whole; forget removes one person's job from the shared run, and
    the run with its last person."""
    import requests

    reg = local_registry(tmp_path, mlflow_db)
    tenant = unique_name("acme")
    people = ["ann", "bob", "cat", "dan"]

    def jobs(names: list[str]) -> list[JobSummary]:
        return [JobSummary(p, f"k-{p}", {"attempts": 1}, {"final": 0.25}, [0.5, 0.25]) for p in names]

    first_run = reg.models.log_jobs_run(tenant, jobs(people[:1]), {"steps": 5})  # makes the experiment
    calls: list[str] = []
    original = requests.Session.request

    def counted(session, method, url, *args, **kwargs):
        calls.append(f"{method} {url.rsplit('/api/', 1)[-1]}")
        return original(session, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", counted)
    shared_run = reg.models.log_jobs_run(tenant, jobs(people[1:]), {"steps": 5})
    runs = {people[0]: first_run} | dict.fromkeys(people[1:], shared_run)
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
        assert len(run_calls) == 3, run_calls  # run, params+metrics+jobs, end
        assert len(calls) == 2 * 4 + 1, calls  # model and version each; one listing
    again = reg.register_stored_many(batch())
    assert [e.version for e in again[:4]] == [1, 1, 1, 1]
    listed = reg.models.versions_of(model_name(tenant, p) for p in people)
    for p in people:
        (v,) = listed[model_name(tenant, p)]
        assert v.tags["job_key"] == f"k-{p}" and v.run_id == runs[p]
        assert v.tags["manifest_hash"] == "ab" * 32 and v.tags["base_fingerprint"] == BASE
        run = reg.models.client.get_run(runs[p])
        assert run.info.status == "FINISHED" and run.data.params["steps"] == "5"
        assert json.loads(run.data.tags[f"job.{p}"])["loss_curve"] == [0.5, 0.25]
    assert [m.value for m in reg.models.client.get_metric_history(shared_run, "jobs")] == [3.0]
    report = reg.forget(tenant, "cat")
    assert report.model_deleted and report.versions_deleted == 1
    assert (report.job_records_deleted, report.runs_deleted) == (1, 0)  # bob and dan keep the run
    assert_forgotten(reg, tenant, "cat")
    left = reg.models.client.get_run(shared_run).data.tags
    assert "job.cat" not in left and {"job.bob", "job.dan"} <= left.keys()
    assert reg.forget(tenant, "bob").runs_deleted == 0
    assert reg.forget(tenant, "dan").runs_deleted == 1
    assert [r.info.run_id for r in reg.models.job_runs(tenant)] == [first_run]


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
    run_id = reg.models.log_jobs_run(tenant, [JobSummary("ann", "k1", {}, {"final": 0.2}, [0.3, 0.2])], {"steps": 5})
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
    assert json.loads(reg.models.client.get_run(run_id).data.tags["job.ann"])["job_key"] == "k1"
    fetched = reg.fetch(second.get(tenant, "ann"), tmp_path / "cache")
    assert (fetched / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()

    report = reg.forget(tenant, "ann")
    assert report.files_deleted == 2 and report.runs_deleted == 1
    assert_forgotten(reg, tenant, "ann")
    assert second.get(tenant, "ann") is None
    assert keys(f"{prefix}/adapters/{tenant}/") == []


def test_index_on_s3_writers_readers_compaction(s3_url: str, s3_storage_options: dict):
    """The index on S3 as on local files: racing writers lose nothing, a replica sees a new
    version within its max age, a stray or half-written object is ignored, compaction keeps the
    newest row, a removal stays removed."""
    import s3fs

    url = f"{s3_url}/index.parquet"
    a, b = (AdapterIndex(url, s3_storage_options, compact_after=0) for _ in range(2))
    replica = AdapterIndex(url, s3_storage_options, max_age_s=0.3)

    write_concurrently((a, b), 6, "s3://x/")
    assert len(AdapterIndex(url, s3_storage_options).list("acme")) == 12
    assert replica.get("acme", "a1").version == 1
    fs = s3fs.S3FileSystem(**s3_storage_options)
    folder = fs.ls(f"{url.removeprefix('s3://')}/tenant=acme", detail=False)[0]
    fs.pipe_file(f"{folder}/.tmp-deadbeef0000", b"PAR1half")  # a writer that died mid-upload
    a.upsert([IndexEntry("acme", "a1", 2, "s3://x/a1v2", "f" * 64)])
    deadline = time.monotonic() + 5
    while replica.get("acme", "a1").version != 2:
        assert time.monotonic() < deadline, "the replica never saw the new version"
        time.sleep(0.05)
    assert a.remove("acme", "b2")
    assert a.compact("acme") > 0
    fresh = AdapterIndex(url, s3_storage_options)
    assert fresh.get("acme", "a1").version == 2 and fresh.get("acme", "b2") is None
    assert len(fresh.list("acme")) == 11 and fresh.list("globex") == []
