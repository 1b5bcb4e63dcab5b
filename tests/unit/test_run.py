"""``pfstorer run``'s own bookkeeping, without Ray: the queue, dry runs and what they refuse."""

from __future__ import annotations

import time

import pytest

from pipelines.job_queue import JobQueue
from pipelines.records import DONE, FAILED, LEASED, PENDING, PUBLISHING, PersonJob, RefPhoto, StoredAdapter


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
