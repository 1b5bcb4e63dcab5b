"""``pfstorer run``: manifest -> validate -> Ray Train worker group -> registry.

Integration tests use one real Ray (``ray_session``), real MLflow (SQLite, and an ``mlflow
server`` subprocess), moto's S3 server, the ``tiny`` base and 2 training steps. The queue's own
bookkeeping is tested without Ray first (fast).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _services import unique_name

from pipelines.manifest import write_manifest
from registry import AdapterRegistry
from pipelines.job_queue import JobQueue
from pipelines.records import DONE, FAILED, LEASED, PENDING, PUBLISHING, PersonJob, RefPhoto, StoredAdapter

STEPS = 2
KILL_STEPS = 4  # a worker is killed mid-training: its people have saved state by then


def _job(i: int) -> PersonJob:
    return PersonJob(f"{i:06d}", "t", f"p{i}", f"k{i}", (RefPhoto(f"/x/{i}.jpg", "0" * 64),))


STORED = StoredAdapter("u", "s", {})


def _wait_settled(q: JobQueue, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q._all_settled():
            return
        time.sleep(0.02)
    raise AssertionError(f"queue did not settle: {q.progress()}")


# ---------------------------------------------------------------------------------------------
# the queue alone (no Ray, no registry)
# ---------------------------------------------------------------------------------------------


def test_queue_leases_requeues_lost_work_and_retries_failures():
    q = JobQueue([_job(i) for i in range(5)], None, job_retries=1, report_interval_s=0.0)
    try:
        a = q.register(0, 100, "h", "group-1")
        b = q.register(1, 101, "h", "group-1")
        s = q.sync(a, 0, want=2)
        assert [lease.job.identity for lease in s.leases] == ["p0", "p1"] and not s.finished
        got_b = q.sync(b, 0, want=2).leases
        assert [lease.job.identity for lease in got_b] == ["p2", "p3"]
        # a hands one off; b's worker group dies with p2, p3 leased and a's p1 leased
        assert q.handoff(a, "000000", STORED)
        assert not q.handoff(a, "000000", STORED)  # once only
        # a new group (new token): every leased job goes back to the front, in order
        a2 = q.register(1, 200, "h", "group-2")
        assert q.restarts == 1 and q.requeued_after_loss == 3
        assert q.sync(b, 0, want=1).stale  # the old group is gone
        again = q.sync(a2, 0, want=4).leases
        assert [lease.job.identity for lease in again] == ["p1", "p2", "p3", "p4"]
        # a failing job is retried once, alone, then recorded as failed with its error
        assert q.fail(a2, "000004", "ValueError: boom") == PENDING
        retry = q.sync(a2, 0, want=1).leases
        assert retry[0].job.identity == "p4" and retry[0].solo and retry[0].attempt == 1
        assert q.fail(a2, "000004", "ValueError: boom again") == FAILED
        for jid in ("000001", "000002", "000003"):
            assert q.handoff(a2, jid, STORED)
        _wait_settled(q)
        out = q.outcome().records
        assert [out[f"{i:06d}"].status for i in range(5)] == [DONE] * 4 + [FAILED]
        assert out["000004"].errors == ["ValueError: boom", "ValueError: boom again"]
        assert out["000004"].attempts == 2 and out["000001"].attempts == 1  # a requeue after a loss is no failure
    finally:
        q.close()


def test_queue_keeps_the_owners_snapshots_and_resumes_requeued_people_from_them():
    q = JobQueue([_job(i) for i in range(3)], None, job_retries=1, report_interval_s=0.0)
    try:
        a = q.register(0, 100, "h", "g1")
        b = q.register(1, 101, "h", "g1")
        assert [x.job.job_id for x in q.sync(a, 0, want=2).leases] == ["000000", "000001"]
        assert [x.job.job_id for x in q.sync(b, 0, want=1).leases] == ["000002"]
        assert q.save_progress(a, {"000000": "state-0", "000001": "state-1", "000002": "not-a's"}) == 2
        assert q.progress().resumable == 2
        assert q.fail(a, "000001", "ValueError: boom") == PENDING  # a retry starts afresh
        assert q.progress().resumable == 1
        a2 = q.register(0, 200, "h", "g2")  # a worker was lost: the group is replaced
        assert q.requeued_after_loss == 2 and q.resumed_after_loss == 1
        leases = {x.job.job_id: x for x in q.sync(a2, 0, want=3).leases}
        assert leases["000000"].resume == "state-0"
        assert leases["000001"].resume is None and leases["000001"].solo
        assert leases["000002"].resume is None
        assert q.save_progress(a, {"000000": "stale"}) == 0  # the old group's worker is gone
        assert q.handoff(a2, "000000", STORED)
        out = q.outcome()
        assert out.resumed_after_loss == 1 and out.records["000000"].resumed == 1
        assert out.records["000000"].snapshot is None  # no training states in the summary
    finally:
        q.close()


def test_queue_report_rounds_end_together():
    """Every worker must call ray.train.report equally often: rounds come from the queue and the
    final round is announced in the same call that sees everything settled."""
    q = JobQueue([_job(0)], None, report_interval_s=1000.0)
    try:
        a = q.register(0, 1, "h", "g")
        b = q.register(1, 2, "h", "g")
        assert q.sync(a, 0, want=1).round == 0
        assert q.handoff(a, "000000", STORED)
        assert q.status("000000") in (PUBLISHING, DONE)
        _wait_settled(q)
        sa = q.sync(a, 0)
        sb = q.sync(b, 0)
        assert sa.finished and sb.finished and sa.round == sb.round == 1
        assert sa.leases == () and q.status("000000") == DONE and q.counts[LEASED] == 0
    finally:
        q.close()


# ---------------------------------------------------------------------------------------------
# helpers for the integration tests
# ---------------------------------------------------------------------------------------------


def _people_rows(lfw_bench: dict[str, list[Path]], names: list[str], tenant: str, refs=None):
    rows = []
    for i, name in enumerate(names):
        n = refs if refs is not None else 3 + i % 3  # 3-5 references each
        rows += [
            {"tenant": tenant, "identity": name, "role": "ref", "uri": str(p)}
            for p in lfw_bench[name][:n]
        ]
    return rows


def _versions(registry: AdapterRegistry, tenant: str, names: list[str]) -> dict[str, list[int]]:
    return {n: [v.version for v in registry.models.versions(tenant, n)] for n in names}


def _settings(state: Path, steps: int = STEPS, **kw):
    from pfstorer.settings import Settings

    return Settings.load(None, state_dir=state, base="tiny", personalize={"steps": steps}, **kw)


# ---------------------------------------------------------------------------------------------
# 1 + 2: 20 people + bad rows, then the same run again
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(ray_session, lfw_bench, tmp_path_factory):
    from PIL import Image

    from pipelines.run import run_manifest

    root = tmp_path_factory.mktemp("run20")
    tenant = unique_name("acme")
    names = sorted(lfw_bench)[:20]
    rows = _people_rows(lfw_bench, names, tenant)
    # bad rows, five kinds (+ a person with too few references)
    (root / "notes.jpg").write_text("not an image")
    Image.new("RGB", (32, 32), "gray").save(root / "tiny.png")
    spare = sorted(lfw_bench)[20:22]
    bad = {
        str(root / "missing.jpg"): ("read", {"identity": names[0]}),
        str(root / "notes.jpg"): ("image", {"identity": names[1]}),
        str(root / "tiny.png"): ("image", {"identity": names[2]}),
        "dup": ("dedup", {"identity": names[3]}),
        "unsafe": ("schema", {"identity": "../escape"}),
        "role": ("schema", {"identity": names[4], "role": "thumbnail"}),
    }
    for uri, (_, extra) in bad.items():
        real = {"dup": str(lfw_bench[names[3]][0]), "unsafe": str(lfw_bench[spare[0]][0]),
                "role": str(lfw_bench[names[4]][-1])}.get(uri, uri)
        rows.append({"tenant": tenant, "role": "ref", "uri": real, **extra})
    rows += _people_rows(lfw_bench, [spare[1]], tenant, refs=2)  # too few references
    manifest = str(root / "manifest.parquet")
    write_manifest(rows, manifest)
    settings = _settings(root / "state", workers=2, steps=STEPS)
    t0 = time.perf_counter()
    summary = run_manifest(manifest, settings, pack=4, steps=STEPS, report_interval_s=1.0)
    return {"summary": summary, "seconds": time.perf_counter() - t0, "names": names,
            "tenant": tenant, "manifest": manifest, "settings": settings, "spare": spare,
            "bad": bad, "rows": len(rows)}


@pytest.mark.integration
def test_run_trains_registers_and_quarantines(first_run):
    s, names, tenant = first_run["summary"], first_run["names"], first_run["tenant"]
    print(s.table())
    assert (s.people, s.done, s.skipped, s.failed) == (20, 20, 0, 0), s.table()
    assert s.trained == 20 and s.versions_created == 20 and s.rows == first_run["rows"]
    registry = AdapterRegistry.from_settings(first_run["settings"])
    assert _versions(registry, tenant, names) == {n: [1] for n in names}
    for n in names:
        assert registry.models.get_prod(tenant, n).version == 1
    entries = registry.index.list(tenant)
    assert sorted(e.identity for e in entries) == names
    assert all(registry.store.exists(tenant, e.identity, e.job_key) for e in entries)
    # one MLflow run per job, with the loss curve and the lineage on the version
    mv = registry.models.versions(tenant, names[0])[0]
    run = registry.models.client.get_run(mv.run_id)
    assert run.data.params["job_key"] == mv.tags["job_key"] and run.data.params["base"] == "tiny"
    curve = registry.models.client.get_metric_history(mv.run_id, "loss")
    assert len(curve) == STEPS
    assert mv.tags["manifest_hash"] == s.manifest_hash and mv.tags["pipeline_run"] == s.run_id
    # every bad row in quarantine with its reason; the 2-reference person as a whole
    q = pq.read_table(s.quarantine_url).to_pylist()
    stages = {}
    for row in q:
        stages.setdefault(row["stage"], []).append(row)
        assert row["reason"]
    assert {"read", "image", "dedup", "schema", "refs"} <= set(stages)
    assert any("not found" in r["reason"] for r in stages["read"])
    assert any(r["identity"] == "../escape" for r in stages["schema"])
    assert any(r["role"] == "thumbnail" for r in stages["schema"])
    assert [r["identity"] for r in stages["refs"]] == [first_run["spare"][1]] * 2
    assert s.quarantined_rows == len(q) == 8
    assert first_run["spare"][1] not in {e.identity for e in entries}
    # Ray Train state: a final checkpoint with every worker's progress, metrics from rank 0
    assert s.ray_train["checkpoint"] and s.ray_train["metrics"]["done"] >= 0
    assert Path(s.ray_train["checkpoint"], "progress-rank0.json").is_file()
    assert Path(s.summary_path).is_file()
    assert all(o.train_s is not None and o.publish_s is not None for o in s.by_status("done"))


@pytest.mark.integration
def test_rerun_trains_and_registers_nothing(first_run):
    from pipelines.run import run_manifest

    registry = AdapterRegistry.from_settings(first_run["settings"])
    names = first_run["names"]
    # a crash between registration and the index write: the rerun repairs the index row
    assert registry.index.remove(first_run["tenant"], names[0])
    t0 = time.perf_counter()
    s = run_manifest(first_run["manifest"], first_run["settings"], pack=4, steps=STEPS)
    seconds = time.perf_counter() - t0
    print(s.table())
    assert (s.skipped, s.done, s.failed, s.trained, s.versions_created) == (20, 0, 0, 0, 0)
    assert s.index_repaired == 1
    assert s.ray_train == {}  # no worker group was started
    assert _versions(registry, first_run["tenant"], names) == {n: [1] for n in names}
    assert len(registry.index.list(first_run["tenant"])) == 20
    assert seconds < first_run["seconds"] / 3, (seconds, first_run["seconds"])


# ---------------------------------------------------------------------------------------------
# 3: a worker killed during the run; a person whose training raises
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_killed_worker_and_failing_person(ray_session, lfw_bench, tmp_path):
    from pipelines.run import execute_run, prepare_run

    tenant = unique_name("kill")
    names = sorted(lfw_bench)[30:36]
    doomed = sorted(lfw_bench)[36]
    photos = tmp_path / "doomed"
    photos.mkdir()
    for p in lfw_bench[doomed][:3]:
        shutil.copy(p, photos / p.name)
    rows = _people_rows(lfw_bench, names, tenant, refs=3)
    rows += [{"tenant": tenant, "identity": doomed, "role": "ref", "uri": str(p)}
             for p in sorted(photos.iterdir())]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    settings = _settings(tmp_path / "state", workers=2, max_retries=2, steps=KILL_STEPS, snapshot_interval_s=0)
    plan = prepare_run(manifest, settings)
    assert len(plan.todo) == 7
    next(photos.iterdir()).unlink()  # vanishes after validation: reading it raises in a worker

    killed: list[int] = []

    def kill_one(snap) -> None:
        # once a worker's people have saved training state, kill that worker
        if killed or snap.restarts or not snap.resumable:
            return
        workers = sorted(snap.workers.values(), key=lambda w: -w.leased)
        if workers and workers[0].leased:
            killed.append(workers[0].pid)
            os.kill(workers[0].pid, signal.SIGKILL)

    s = execute_run(plan, pack=2, job_retries=1, report_interval_s=0.5, on_progress=kill_one)
    print(s.table())
    assert killed, "no worker was killed (the run ended too soon)"
    assert s.worker_restarts >= 1 and s.requeued_after_loss >= 1
    # people with saved state continued where they were, not from step 0
    assert 1 <= s.resumed_after_loss <= s.requeued_after_loss
    assert s.done == 6 and s.failed == 1 and s.train_error is None
    (bad,) = s.by_status("failed")
    assert bad.identity == doomed and "FileNotFoundError" in bad.error and bad.attempts == 2
    registry = AdapterRegistry.from_settings(settings)
    assert _versions(registry, tenant, names) == {n: [1] for n in names}
    assert registry.models.versions(tenant, doomed) == []
    assert sorted(e.identity for e in registry.index.list(tenant)) == names
    for name in names:  # resumed or not, every adapter has all its steps, each counted once
        _, meta = registry.read(registry.resolve(tenant, name))
        assert meta["steps"] == KILL_STEPS and len(meta["loss_curve"]) == KILL_STEPS


@pytest.mark.integration
def test_a_lost_job_queue_ends_the_run_with_a_summary_and_everyone_registered_is_indexed(
    ray_session, lfw_bench, tmp_path
):
    from pipelines.run import execute_run, prepare_run

    tenant = unique_name("qkill")
    names = sorted(lfw_bench)[40:50]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(_people_rows(lfw_bench, names, tenant, refs=3), manifest)
    settings = _settings(tmp_path / "state", workers=2, max_retries=2, steps=KILL_STEPS)
    plan = prepare_run(manifest, settings)
    killed: list[int] = []

    def kill_queue(snap) -> None:  # some people handed off (maybe not yet indexed), some not started
        if not killed and snap.done + snap.publishing >= 2 and snap.pending:
            killed.append(snap.pid)
            os.kill(snap.pid, signal.SIGKILL)

    s = execute_run(plan, pack=2, report_interval_s=0.5, on_progress=kill_queue)
    print(s.table())
    assert killed, "the queue was not killed (the run ended too soon)"
    assert s.queue_lost and "job queue" in s.train_error and not s.ok
    assert s.done + s.failed == len(names) and s.failed >= 1
    assert all(o.error == "not finished: the job queue was lost" for o in s.by_status("failed"))
    assert Path(s.summary_path).is_file()
    registry = AdapterRegistry.from_settings(settings)
    registered = {n for n, v in _versions(registry, tenant, names).items() if v}
    indexed = {e.identity for e in registry.index.list(tenant)}
    assert registered == indexed == {o.identity for o in s.by_status("done")}
    again = prepare_run(manifest, settings)  # a rerun trains exactly the people left
    assert sorted(j.identity for j in again.todo) == sorted(o.identity for o in s.by_status("failed"))
    assert again.index_repaired == 0


# ---------------------------------------------------------------------------------------------
# 4: manifest, photos, store and index on S3 (moto); MLflow behind an `mlflow server`
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_on_s3_with_mlflow_server(
    ray_session, lfw_bench, tmp_path, s3_url, s3_storage_options, mlflow_server
):
    import fsspec

    from pipelines.run import run_manifest

    fs = fsspec.filesystem("s3", **s3_storage_options)
    tenant = unique_name("s3")
    names = sorted(lfw_bench)[40:44]
    rows = []
    for name in names:
        for p in lfw_bench[name][:3]:
            uri = f"{s3_url}/photos/{name}/{p.name}"
            fs.pipe_file(uri, p.read_bytes())
            rows.append({"tenant": tenant, "identity": name, "role": "ref", "uri": uri})
    rows.append({"tenant": tenant, "identity": names[0], "role": "ref",
                 "uri": f"{s3_url}/photos/nobody.jpg"})
    manifest = f"{s3_url}/manifest.parquet"
    write_manifest(rows, manifest, s3_storage_options)
    overrides = dict(
        store_url=f"{s3_url}/adapters", index_url=f"{s3_url}/index.parquet",
        tracking_uri=mlflow_server.tracking_uri, storage_options=s3_storage_options,
    )
    settings = _settings(tmp_path / "state", workers=1, steps=STEPS, **overrides)
    s = run_manifest(manifest, settings, pack=4, quarantine_out=f"{s3_url}/quarantine.parquet")
    print(s.table())
    assert (s.done, s.failed, s.quarantined_rows) == (4, 0, 1), s.table()
    registry = AdapterRegistry.from_settings(settings)
    assert _versions(registry, tenant, names) == {n: [1] for n in names}
    entries = registry.index.list(tenant)
    assert sorted(e.identity for e in entries) == names
    assert all(e.uri.startswith("s3://") for e in entries)
    data, meta = registry.read(entries[0])  # sha256-verified read back from S3
    assert meta["identity"] == entries[0].identity and len(data) > 1000
    q = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_url}/quarantine.parquet"))).to_pylist()
    assert [r["stage"] for r in q] == ["read"]
    # the job run's artifact went through the server's artifact proxy to S3
    mv = registry.models.versions(tenant, names[0])[0]
    assert "job.json" in [f.path for f in registry.models.client.list_artifacts(mv.run_id)]
    # and a rerun against S3 + server registers nothing
    again = run_manifest(manifest, settings, pack=4, quarantine_out=f"{s3_url}/q2.parquet")
    assert (again.skipped, again.trained) == (4, 0)
    assert _versions(registry, tenant, names) == {n: [1] for n in names}


def test_a_dry_run_never_publishes_into_a_configured_registry(tmp_path):
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings
    from pipelines.run_plan import check_dry_train_registry

    check_dry_train_registry(Settings(state_dir=tmp_path))  # the state dir's own registry: allowed
    for field, url in (("store_url", "s3://prod/adapters"), ("index_url", str(tmp_path.parent / "index.parquet")),
                       ("tracking_uri", "http://mlflow.prod:5000")):
        with pytest.raises(PFStorerError, match=field):
            check_dry_train_registry(Settings(state_dir=tmp_path, **{field: url}))
    # through the command: refused before Ray starts or anything is written
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pfstorer.cli", "run", "--manifest", str(tmp_path / "m.parquet"),
                           "--dry-train", "--state-dir", str(tmp_path / "state"), "--store", "s3://prod/adapters"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-train" in proc.stderr and "store_url" in proc.stderr, proc.stderr
    assert not (tmp_path / "state" / "runs").exists()
