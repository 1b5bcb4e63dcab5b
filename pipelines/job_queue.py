"""The run's job queue: a Ray actor holding every person of a run, leased to training workers.

Each job goes ``pending -> leased -> publishing -> done`` (or ``failed``). Workers lease jobs
between two training steps (:meth:`JobQueue.sync`), hand finished adapters back
(:meth:`JobQueue.handoff`) and report failures (:meth:`JobQueue.fail`); the driver polls
:meth:`JobQueue.progress` for the progress bar. A handed-off adapter goes to the
:class:`~pipelines.publisher.Publisher` (MLflow + index) inside this actor; a job is ``done``
once its index row is written.

- **Ray Train reports**: ``ray.train.report`` is a collective (every rank must call it equally
  often), while workers pull different numbers of jobs. So reports happen in *rounds* that the
  queue announces: after adapters were handed off (at most every ``report_interval_s``) and once
  at the end. Every worker checks the round in the same call that leases jobs, so a barrier costs
  at most one step.
- **Failures**: when Ray Train replaces a worker group after a worker died, the new group
  registers with a new token and every job leased by the old group goes back to the front of the
  queue (adapters already handed off are not lost: the publisher finishes them). Workers save
  each person's training state here between steps (:meth:`JobQueue.save_progress`), so a
  requeued person continues from its latest snapshot instead of step 0. A job whose
  training or upload raises is retried (``job_retries`` times, alone in a slot of its own, so one
  bad person cannot sink a packed batch again) and then recorded as failed with its error.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.publisher import Publisher
from pipelines.records import (
    DONE,
    FAILED,
    LEASED,
    PENDING,
    PUBLISHING,
    JobRecord,
    Lease,
    PersonJob,
    QueueOutcome,
    QueueProgress,
    StoredAdapter,
    SyncReply,
    WorkerInfo,
)

log = logging.getLogger(__name__)

__all__ = ["JobQueue", "make_job_queue"]


class JobQueue:
    """Pending/leased/publishing/done/failed jobs of one run, and their publisher.

    ``settings``: the run's :class:`pfstorer.settings.Settings`, whose registry receives the
    adapters (``None``: no publishing - for tests of the queue alone). ``lineage``:
    tags added to every registered version; ``params``: logged on every job run (one per publishing batch).
    ``publish_threads``, ``index_batch``, ``index_interval_s``: see :class:`Publisher`.
    """

    def __init__(
        self,
        jobs: Iterable[PersonJob],
        settings: Any,
        *,
        lineage: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        job_retries: int = 1,
        report_interval_s: float = 2.0,
        publish_threads: int | None = None,
        index_batch: int = 500,
        index_interval_s: float = 5.0,
    ) -> None:
        self._lock = threading.RLock()
        self.records: dict[str, JobRecord] = {j.job_id: JobRecord(j) for j in jobs}
        self.counts: collections.Counter[str] = collections.Counter({PENDING: len(self.records)})
        self.pending: collections.deque[str] = collections.deque(self.records)
        self.owner: dict[str, str] = {}
        self.leased_by: dict[str, set[str]] = collections.defaultdict(set)
        self.job_retries = max(0, int(job_retries))
        # workers and groups
        self.gen = 0
        self.group: str | None = None
        self.old_groups: set[str] = set()
        self.workers: dict[str, WorkerInfo] = {}
        self.restarts = 0
        self.requeued_after_loss = 0
        self.resumed_after_loss = 0
        # report rounds
        self.report_interval_s = report_interval_s
        self.round = 0
        self.dirty = False
        self.last_round_t = time.monotonic()
        self.finished = False
        self.steps = 0
        self.publisher = Publisher(
            settings, lineage=lineage or {}, params=params or {}, on_failed=self._publish_failed,
            on_indexed=self._indexed, drained=self._drained, threads=publish_threads,
            index_batch=index_batch, index_interval_s=index_interval_s,
        )

    # -- bookkeeping -----------------------------------------------------------------------------
    def status(self, job_id: str) -> str:
        return self.records[job_id].status

    def _set(self, jid: str, status: str, owner: str | None = None) -> None:
        rec = self.records[jid]
        old = rec.status
        self.counts[old] -= 1
        self.counts[status] += 1
        rec.status = status
        prev = self.owner.get(jid)
        if old == LEASED and prev is not None:
            self.leased_by[prev].discard(jid)
        if status == LEASED and owner is not None:
            self.leased_by[owner].add(jid)
        if owner is not None:
            self.owner[jid] = owner
        elif status == PENDING:
            self.owner.pop(jid, None)

    def _all_settled(self) -> bool:
        return self.counts[DONE] + self.counts[FAILED] == len(self.records)

    def _drained(self) -> bool:
        with self._lock:
            return self.counts[PENDING] + self.counts[LEASED] == 0

    # -- workers -------------------------------------------------------------------------------
    def register(self, rank: int, pid: int, host: str, group: str, resumed_from: str | None = None) -> str:
        """A worker (re)starts; returns its worker id ("" if its group is outdated).

        ``group``: a token all workers of one Ray Train worker group share (rank 0 draws it and
        broadcasts it). A new token means Ray Train started a new group after a failure: every
        job leased by the old group goes back to the front of the queue.
        """
        with self._lock:
            if group != self.group:
                if group in self.old_groups:
                    return ""
                if self.group is not None:
                    self.old_groups.add(self.group)
                    self.restarts += 1
                self.group = group
                self.gen += 1
                lost = [jid for jid, rec in self.records.items() if rec.status == LEASED]
                for jid in reversed(lost):  # the lost people go first, in their order
                    self._set(jid, PENDING)
                    self.pending.appendleft(jid)
                self.requeued_after_loss += len(lost)
                resumable = sum(self.records[jid].snapshot is not None for jid in lost)
                self.resumed_after_loss += resumable
                if lost:
                    log.warning("worker group restarted: %d leased jobs put back, %d of them resume from "
                                "a snapshot", len(lost), resumable)
                # a fresh group counts its reports from 0 (and reports once if all is settled)
                self.round = 1 if self.finished else 0
                self.dirty = self.counts[PUBLISHING] + self.counts[DONE] > 0
                self.last_round_t = time.monotonic() - self.report_interval_s
                for w in self.workers.values():
                    w.alive = False
            wid = f"g{self.gen}-r{rank}-p{pid}"
            self.workers[wid] = WorkerInfo(rank, pid, host, self.gen, time.time(), resumed_from)
            return wid

    def _current(self, wid: str) -> bool:
        w = self.workers.get(wid) if wid else None
        return w is not None and w.gen == self.gen

    def sync(self, wid: str, reports: int, want: int = 0, steps: int = 0) -> SyncReply:
        """The worker's one call between training steps: report rounds, finish flag, new jobs.

        ``reports``: how many ``ray.train.report`` calls this worker made in this group;
        ``want``: free slots to fill; ``steps``: training steps since the last call.
        """
        with self._lock:
            if not self._current(wid):
                return SyncReply(stale=True, round=reports, finished=True)
            self.steps += steps
            now = time.monotonic()
            if not self.finished:
                if self._all_settled():
                    self.finished = True
                    self.round += 1  # the final report: every worker checkpoints once more
                    self.dirty = False
                elif self.dirty and now - self.last_round_t >= self.report_interval_s:
                    self.round += 1
                    self.dirty = False
                    self.last_round_t = now
            leases = self._lease(wid, want) if want > 0 and not self.finished else ()
            return SyncReply(stale=False, round=self.round, finished=self.finished, leases=leases)

    def _lease(self, wid: str, n: int) -> tuple[Lease, ...]:
        out = []
        while self.pending and len(out) < n:
            jid = self.pending.popleft()
            rec = self.records[jid]
            if rec.status != PENDING:
                continue
            self._set(jid, LEASED, wid)
            rec.resumed += rec.snapshot is not None
            out.append(Lease(rec.job, attempt=rec.failures, solo=rec.solo, resume=rec.snapshot))
        return tuple(out)

    def save_progress(self, wid: str, snapshots: Mapping[str, Any]) -> int:
        """A worker's snapshots (job id -> :class:`pfstorer.training.SlotState`) of the people it
        trains: if the worker is lost, they resume from here. Returns how many were kept (a
        snapshot of a job no longer leased to this worker is dropped)."""
        with self._lock:
            kept = 0
            for jid, state in snapshots.items():
                rec = self.records.get(jid)
                if rec is not None and rec.status == LEASED and self.owner.get(jid) == wid and self._current(wid):
                    rec.snapshot = state
                    kept += 1
            return kept

    def handoff(self, wid: str, job_id: str, stored: StoredAdapter) -> bool:
        """A worker stored an adapter (uploaded + verified); publish it. False: already handled."""
        with self._lock:
            rec = self.records.get(job_id)
            if rec is None or rec.status not in (PENDING, LEASED):
                return False
            if rec.status == LEASED and self.owner.get(job_id) != wid and self._current(wid):
                return False  # leased again to someone else in this group: theirs wins
            self._set(job_id, PUBLISHING, wid)
            rec.stored, rec.worker, rec.snapshot = stored, wid, None
            if wid in self.workers:
                self.workers[wid].handed_off += 1
            self.dirty = True
        self.publisher.submit(rec)
        return True

    def fail(self, wid: str, job_id: str, error: str, *, solo: bool = True) -> str:
        """Training or upload of a job raised: retry it (alone in a slot) or give up on it."""
        with self._lock:
            rec = self.records.get(job_id)
            if rec is None or rec.status != LEASED or (self.owner.get(job_id) != wid and self._current(wid)):
                return "unknown" if rec is None else rec.status
            rec.failures += 1
            rec.errors.append(error)
            rec.snapshot = None  # a retry starts afresh: the state may be what failed
            if wid in self.workers:
                self.workers[wid].failed += 1
            if rec.failures > self.job_retries:
                self._set(job_id, FAILED)
                self.dirty = True
                return FAILED
            self._set(job_id, PENDING)
            rec.solo = rec.solo or solo
            self.pending.appendleft(job_id)
            return PENDING

    # -- what the publisher reports ----------------------------------------------------------------
    def _publish_failed(self, jid: str, error: str) -> None:
        with self._lock:
            self._set(jid, FAILED)
            self.records[jid].errors.append(error)
            self.dirty = True

    def _indexed(self, jids: list[str], error: str | None) -> None:
        with self._lock:
            for jid in jids:
                rec = self.records[jid]
                if error is None:
                    self._set(jid, DONE)
                    rec.done_at = time.time()
                else:
                    self._set(jid, FAILED)
                    rec.errors.append(error)
            self.dirty = True

    # -- the driver's view ---------------------------------------------------------------------
    def progress(self) -> QueueProgress:
        """Counts by status, restarts and the current group's workers (the progress bar's input)."""
        with self._lock:
            c = self.counts
            workers = {wid: dataclasses.replace(w, leased=len(self.leased_by.get(wid, ())))
                       for wid, w in self.workers.items() if w.gen == self.gen}
            return QueueProgress(
                total=len(self.records), pending=c[PENDING], leased=c[LEASED], publishing=c[PUBLISHING],
                done=c[DONE], failed=c[FAILED], finished=self.finished, restarts=self.restarts,
                requeued_after_loss=self.requeued_after_loss, resumed_after_loss=self.resumed_after_loss,
                resumable=sum(self.records[j].snapshot is not None for js in self.leased_by.values() for j in js),
                generation=self.gen, rounds=self.round, steps=self.steps, workers=workers, pid=os.getpid(),
            )

    def outcome(self) -> QueueOutcome:
        """Every job's record (the loss curves left out: they are in MLflow) and the run's stats."""
        with self._lock:
            records = {}
            for jid, rec in self.records.items():
                stored = rec.stored and dataclasses.replace(rec.stored, meta={})
                records[jid] = dataclasses.replace(rec, errors=list(rec.errors), stored=stored, snapshot=None)
            return QueueOutcome(
                records=records, restarts=self.restarts, requeued_after_loss=self.requeued_after_loss,
                resumed_after_loss=self.resumed_after_loss,
                publisher=dict(self.publisher.stats),
                workers={wid: dataclasses.replace(w) for wid, w in self.workers.items()}, rounds=self.round,
                steps=self.steps,
            )

    def close(self, timeout: float = 60.0) -> None:
        """Stop the publisher once it drained what was handed off."""
        self.publisher.close(timeout)


def make_job_queue(jobs: Iterable[PersonJob], settings: Any, **kwargs: Any):
    """Start :class:`JobQueue` as a Ray actor (no CPU reserved; threaded so progress polls and
    leases never wait behind each other)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=16)(JobQueue)
    return actor.remote(list(jobs), settings, **kwargs)
