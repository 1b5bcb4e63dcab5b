"""``pfstorer run`` when things break mid-run: a worker killed while training (its people resume
from their saved state) and a person whose photo vanished, then the job queue itself killed.

One real Ray (``ray_session``), MLflow on SQLite, the ``tiny`` base. Apart from ``test_run.py``
so the two files run on different test workers.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from pipelines.manifest import write_manifest
from registry import AdapterRegistry

from _run_cases import KILL_STEPS, people_rows, settings_for, versions
from _services import unique_name


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
    rows = people_rows(lfw_bench, names, tenant, refs=3)
    rows += [{"tenant": tenant, "identity": doomed, "role": "ref", "uri": str(p)}
             for p in sorted(photos.iterdir())]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    settings = settings_for(tmp_path / "state", workers=2, max_retries=2, steps=KILL_STEPS, snapshot_interval_s=0)
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
    assert versions(registry, tenant, names) == {n: [1] for n in names}
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
    write_manifest(people_rows(lfw_bench, names, tenant, refs=3), manifest)
    settings = settings_for(tmp_path / "state", workers=2, max_retries=2, steps=KILL_STEPS)
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
    registered = {n for n, v in versions(registry, tenant, names).items() if v}
    indexed = {e.identity for e in registry.index.list(tenant)}
    assert registered == indexed == {o.identity for o in s.by_status("done")}
    again = prepare_run(manifest, settings)  # a rerun trains exactly the people left
    assert sorted(j.identity for j in again.todo) == sorted(o.identity for o in s.by_status("failed"))
    assert again.index_repaired == 0
