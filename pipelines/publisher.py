"""The run's publisher: MLflow writers and one index writer, threads inside the queue actor.

Why here and not in the workers: SQLite (the default tracking store) takes one writer at a time,
so N workers writing would mostly wait on locks and retries - here one thread writes
(``threads`` > 1 for a tracking *server*, whose database takes parallel writers: 8 by default,
each taking up to ``publish_batch`` waiting adapters at a time, which share one MLflow job run
per tenant and one listing - see :meth:`registry.ModelRegistry.log_jobs_run` and
:meth:`~registry.ModelRegistry.register_many`); and index writes are batched:
each adds one small file per bucket it touches (:mod:`registry.index`), so fewer, larger
batches mean fewer files to compact.
Uploads, the heavy bytes, stay parallel in the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import queue as _queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pipelines.records import JobRecord

log = logging.getLogger(__name__)


def short_error(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _job_summary(rec: JobRecord) -> Any:
    """What the job run records of one handed-off job (a :class:`registry.JobSummary`)."""
    from registry import JobSummary

    assert rec.stored is not None
    meta = rec.stored.meta
    metrics = {f"final_{k}": float(v) for k, v in (meta.get("final_losses") or {}).items()}
    metrics.update(train_s=float(rec.stored.train_s), upload_s=float(rec.stored.upload_s))
    return JobSummary(rec.job.identity, rec.job.job_key,
                      {"references": len(rec.job.refs), "attempts": rec.attempts, "worker": rec.worker},
                      metrics, meta.get("loss_curve") or [])


class Publisher:
    """Registers handed-off adapters (a job run per batch, a model version each) and indexes them in batches.

    ``settings``: the run's :class:`pfstorer.settings.Settings`, whose registry
    (:meth:`registry.AdapterRegistry.from_settings`) receives the adapters (``None``: no
    publishing, an adapter is done when handed off - for tests of the queue alone). The queue is told
    what happened through ``on_failed(job_id, error)`` and ``on_indexed(job_ids, error)``;
    ``drained()`` says that nothing more can be handed off, so a partial batch is written at once.
    """

    def __init__(
        self,
        settings: Any,
        *,
        lineage: Mapping[str, Any],
        params: Mapping[str, Any],
        on_failed: Callable[[str, str], None],
        on_indexed: Callable[[list[str], str | None], None],
        drained: Callable[[], bool],
        threads: int | None = None,
        publish_batch: int = 64,
        index_batch: int = 500,
        index_interval_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self._registry: Any = None
        self._registry_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.lineage, self.params = dict(lineage), dict(params)
        self._on_failed, self._on_indexed, self._drained = on_failed, on_indexed, drained
        if threads is None:
            threads = 1 if settings is None or str(settings.tracking_uri).startswith("sqlite:") else 8
        self.index_batch, self.index_interval_s = index_batch, index_interval_s
        self.publish_batch = max(1, publish_batch)
        self._outbox: _queue.Queue[JobRecord | None] = _queue.Queue()
        self._indexq: _queue.Queue[tuple[str, Any] | None] = _queue.Queue()
        self.stats = {"published": 0, "publish_s": 0.0, "index_writes": 0, "index_s": 0.0,
                      "index_rows": 0, "publish_threads": threads}
        self._writers = [threading.Thread(target=self._publish_loop, name=f"publisher-{i}", daemon=True)
                         for i in range(max(1, threads))]
        self._indexer = threading.Thread(target=self._index_loop, name="indexer", daemon=True)
        for t in [*self._writers, self._indexer]:
            t.start()

    def submit(self, record: JobRecord) -> None:
        """Publish a record whose adapter was handed off (``record.stored`` is set)."""
        self._outbox.put(record)

    def _get_registry(self) -> Any:
        with self._registry_lock:
            if self._registry is None:
                from registry import AdapterRegistry

                self._registry = AdapterRegistry.from_settings(self.settings)
            return self._registry

    def _log_runs(self, recs: list[JobRecord]) -> list[tuple[JobRecord, Any]]:
        """One MLflow run per tenant of the batch holding every job of it
        (:meth:`registry.ModelRegistry.log_jobs_run`); what to register for each record whose
        run was logged (:class:`registry.StoredRegistration`), failing the others.

        No "already registered?" lookup first: the plan left out every job key the registry
        knows, and the queue hands each job to the publisher once; registration itself is
        idempotent by job key all the same.
        """
        from registry import StoredRegistration

        by_tenant: dict[str, list[JobRecord]] = {}
        for rec in recs:
            by_tenant.setdefault(rec.job.tenant, []).append(rec)
        todo: list[tuple[JobRecord, Any]] = []
        for tenant, group in by_tenant.items():
            try:
                run_id = self._get_registry().models.log_jobs_run(
                    tenant, [_job_summary(rec) for rec in group], self.params,
                    tags={"pipeline_run": str(self.lineage.get("pipeline_run", ""))})
            except Exception as exc:
                log.exception("logging the job run of %d adapters of tenant %s failed", len(group), tenant)
                for rec in group:
                    self._on_failed(rec.job.job_id, f"publish: {short_error(exc)}")
                continue
            for rec in group:
                assert rec.stored is not None
                rec.run_id = run_id
                lineage = {"ref_sha256s": sorted(r.sha256 for r in rec.job.refs), **self.lineage}
                todo.append((rec, StoredRegistration(rec.job.tenant, rec.job.identity, rec.stored.uri,
                                                     rec.stored.sha256, rec.stored.meta, lineage, run_id,
                                                     rec.job.job_key)))
        return todo

    def _publish_batch(self, recs: list[JobRecord]) -> None:
        """The batch's job runs, then their versions in one batch
        (:meth:`registry.AdapterRegistry.register_stored_many`); entries go to the indexer."""
        t0 = time.perf_counter()
        todo = self._log_runs(recs)
        try:
            results = self._get_registry().register_stored_many([r for _, r in todo]) if todo else []
        except Exception as exc:  # the registry could not even be built
            results = [exc] * len(todo)
        for (rec, _), result in zip(todo, results):
            if isinstance(result, Exception):
                log.error("publishing job %s failed: %s", rec.job.job_id, short_error(result))
                self._on_failed(rec.job.job_id, f"publish: {short_error(result)}")
                continue
            rec.version = result.version
            assert rec.stored is not None
            rec.stored = dataclasses.replace(rec.stored, meta={})  # the loss curve is in MLflow now: keep the actor small
            self._indexq.put((rec.job.job_id, result))
        dt = time.perf_counter() - t0
        for rec in recs:
            rec.publish_s = dt / len(recs)
        with self._stats_lock:
            self.stats["published"] += len(recs)
            self.stats["publish_s"] += dt

    def _publish_loop(self) -> None:
        if self.settings is not None:
            try:  # import MLflow and open the database while the workers start
                _ = self._get_registry().models.client
            except Exception:
                log.exception("cannot open the registry yet (retried per adapter)")
        while True:
            batch: list[JobRecord] = []
            rec = self._outbox.get()
            stop = rec is None
            if rec is not None:
                batch.append(rec)
            while not stop and len(batch) < self.publish_batch:  # whatever else waits, up to a batch
                try:
                    more = self._outbox.get_nowait()
                except _queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch.append(more)
            if batch and self.settings is None:
                for r in batch:
                    self._indexq.put((r.job.job_id, None))
            elif batch:
                self._publish_batch(batch)
            if stop:
                return

    def _flush(self, batch: list[tuple[str, Any]]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        error = None
        entries = [e for _, e in batch if e is not None]
        for attempt in range(4):
            if not entries:
                break
            try:
                self._get_registry().index.upsert(entries)
                error = None
                break
            except Exception as exc:  # an object store hiccup: try again, then give up
                error = short_error(exc)
                time.sleep(0.2 * 2**attempt)
        if entries:
            with self._stats_lock:
                self.stats["index_writes"] += 1
                self.stats["index_s"] += time.perf_counter() - t0
                self.stats["index_rows"] += len(entries)
        self._on_indexed([jid for jid, _ in batch], None if error is None else f"index write failed: {error}")
        batch.clear()

    def _index_loop(self) -> None:
        batch: list[tuple[str, Any]] = []
        last_flush = time.monotonic()
        while True:
            try:
                item = self._indexq.get(timeout=0.1)
            except _queue.Empty:
                item = ("", None)
            if item is None:
                self._flush(batch)
                return
            if item[0]:
                batch.append(item)
            last = self._drained() and self._outbox.empty()  # nothing else can arrive: write now
            if batch and (
                (last and self._indexq.empty())
                or len(batch) >= self.index_batch
                or time.monotonic() - last_flush >= self.index_interval_s
            ):
                self._flush(batch)
                last_flush = time.monotonic()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the writers and the indexer once they drained what was submitted."""
        for _ in self._writers:
            self._outbox.put(None)
        deadline = time.monotonic() + timeout
        for t in self._writers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._indexq.put(None)
        self._indexer.join(max(0.0, deadline - time.monotonic()))
