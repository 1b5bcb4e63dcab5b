"""The personalization scheduler: a job queue actor and the Ray Train worker loop.

How a run is carried out (``pipelines.run`` plans it and starts it):

- :class:`JobQueue` (a Ray actor, ``num_cpus=0``, threaded) holds every job of the run as
  ``pending -> leased -> publishing -> done`` (or ``failed``). Workers lease jobs, hand finished
  adapters back, and report failures; the driver polls it for the progress bar.
- :func:`train_loop` is the ``train_loop_per_worker`` of a Ray Train ``TorchTrainer``: each worker
  loads the frozen base **once**, then pulls jobs from the queue into a
  :class:`pfstorer.training.PackedTrainer` of ``pack`` slots, so several people train in one
  batch; whenever a slot frees up it is refilled from the queue. A finished adapter is saved to a
  temporary directory, uploaded to the artifact store by the worker (write -> sha256 verify ->
  move into place, :meth:`ArtifactStore.put_adapter`) and handed to the queue.
- **Registration happens in one place**: the queue actor's publisher threads log each job's
  MLflow run (params + loss curve) and register its version (``create_model_version``, lineage
  tags, alias ``prod``); a single indexer thread writes the adapter index in batches. Why not in
  the workers: SQLite (the default tracking store) takes one writer at a time, so N workers
  writing would mostly wait on locks and retries - here one thread writes (``publish_threads``
  > 1 for a tracking *server*, whose database takes parallel writers); an index on S3 is a
  whole-file PUT, so two racing writers lose rows; and each index write rewrites the Parquet
  file, so one write per adapter would cost O(N^2) over a run - batches make it O(N^2 / batch).
  Uploads, the heavy bytes, stay parallel in the workers. A job is ``done`` once its index row
  is written.
- **Ray Train state**: ``ray.train.report`` is a collective (every rank must call it equally
  often), while workers pull different numbers of jobs. So reports happen in *rounds* that the
  queue announces: after adapters were handed off (at most every ``report_interval_s``) and once
  at the end. Every worker checks the round between two training steps (the same RPC that leases
  jobs), so a barrier costs at most one step. Each report carries a small checkpoint
  (``progress-rank{r}.json``: what this worker handed off) and the run's counters as metrics.
- **Failures**: a worker process that dies makes Ray Train (``FailureConfig.max_failures``) tear
  the group down and start a new one; when a rank registers a second time the queue knows a new
  group started and puts every leased job back at the front of the queue (jobs already handed
  off are not lost: the publisher finishes them). A lost worker therefore costs at most the
  people in its packed slots. A job whose training or upload raises is retried (``job_retries``
  times, alone in a slot of its own, so one bad person cannot sink a packed batch again) and then
  recorded as failed with its error; nothing stops the other people. Idempotency across runs
  comes from the job key (registry lookups before training, ``register`` is idempotent by key).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue as _queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["JobQueue", "make_job_queue", "train_loop"]

PENDING, LEASED, PUBLISHING, DONE, FAILED = "pending", "leased", "publishing", "done", "failed"


def _short_error(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# the queue (plain class; wrapped as a Ray actor by make_job_queue)
# ---------------------------------------------------------------------------------------------


class JobQueue:
    """Pending/leased/publishing/done/failed jobs of one run, plus the publishers.

    ``jobs``: dicts with ``job_id``, ``tenant``, ``identity``, ``job_key``, ``refs`` (list of
    ``{"uri", "sha256"}``). ``registry``: keyword arguments of
    :meth:`registry.AdapterRegistry.from_urls` (``None``: no publishing, adapters are
    marked done when handed off - for tests of the queue alone). ``lineage``: tags added to every
    registered version; ``params``: logged on every job's MLflow run. ``publish_threads``: MLflow
    writers (default 1 for a SQLite tracking URI, whose writes serialize anyway, else 4); the
    index always has exactly one writer, which batches rows (at most one write per
    ``index_interval_s`` or per ``index_batch`` rows; at once when nothing else can arrive).
    """

    def __init__(
        self,
        jobs: list[dict[str, Any]],
        registry: Mapping[str, Any] | None,
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
        self.jobs: dict[str, dict[str, Any]] = {j["job_id"]: dict(j) for j in jobs}
        self.status: dict[str, str] = {jid: PENDING for jid in self.jobs}
        self.counts: collections.Counter[str] = collections.Counter({PENDING: len(self.jobs)})
        self.pending: collections.deque[str] = collections.deque(self.jobs)
        self.owner: dict[str, str] = {}
        self.leased_by: dict[str, set[str]] = collections.defaultdict(set)
        self.attempts: dict[str, int] = collections.Counter()
        self.errors: dict[str, list[str]] = collections.defaultdict(list)
        self.solo: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.job_retries = max(0, int(job_retries))
        self.lineage = dict(lineage or {})
        self.params = dict(params or {})
        # workers and groups
        self.gen = 0
        self.group: str | None = None
        self.old_groups: set[str] = set()
        self.workers: dict[str, dict[str, Any]] = {}
        self.restarts = 0
        self.requeued_after_loss = 0
        # report rounds
        self.report_interval_s = report_interval_s
        self.round = 0
        self.dirty = False
        self.last_round_t = time.monotonic()
        self.finished = False
        self.steps = 0
        # publishers (MLflow) and the indexer (one index writer)
        self._registry_kwargs = dict(registry) if registry is not None else None
        self._registry: Any = None
        self._registry_lock = threading.Lock()
        if publish_threads is None:
            uri = str((registry or {}).get("tracking_uri") or "")
            publish_threads = 1 if uri.startswith("sqlite:") else 4
        self._outbox: _queue.Queue[str | None] = _queue.Queue()
        self._indexq: _queue.Queue[tuple[str, Any] | None] = _queue.Queue()
        self.index_batch = index_batch
        self.index_interval_s = index_interval_s
        self.pub_stats = {"published": 0, "publish_s": 0.0, "index_writes": 0, "index_s": 0.0,
                          "index_rows": 0, "publish_threads": publish_threads}
        self._publishers = [
            threading.Thread(target=self._publish_loop, name=f"publisher-{i}", daemon=True)
            for i in range(max(1, publish_threads))
        ]
        self._indexer = threading.Thread(target=self._index_loop, name="indexer", daemon=True)
        for t in [*self._publishers, self._indexer]:
            t.start()

    # -- bookkeeping -----------------------------------------------------------------------------
    def _set(self, jid: str, status: str, owner: str | None = None) -> None:
        old = self.status[jid]
        self.counts[old] -= 1
        self.counts[status] += 1
        self.status[jid] = status
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
        return self.counts[DONE] + self.counts[FAILED] == len(self.status)

    # -- workers -------------------------------------------------------------------------------
    def register(
        self, rank: int, pid: int, host: str, group: str, resumed_from: str | None = None
    ) -> str:
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
                lost = [jid for jid, st in self.status.items() if st == LEASED]
                for jid in reversed(lost):  # the lost people go first, in their order
                    self._set(jid, PENDING)
                    self.pending.appendleft(jid)
                self.requeued_after_loss += len(lost)
                if lost:
                    log.warning("worker group restarted: %d leased jobs put back", len(lost))
                # a fresh group counts its reports from 0 (and reports once if all is settled)
                self.round = 1 if self.finished else 0
                self.dirty = self.counts[PUBLISHING] + self.counts[DONE] > 0
                self.last_round_t = time.monotonic() - self.report_interval_s
                for w in self.workers.values():
                    w["alive"] = False
            wid = f"g{self.gen}-r{rank}-p{pid}"
            self.workers[wid] = {
                "rank": rank, "pid": pid, "host": host, "gen": self.gen, "started": time.time(),
                "resumed_from": resumed_from, "handed_off": 0, "failed": 0, "alive": True,
            }
            return wid

    def _current(self, wid: str) -> bool:
        w = self.workers.get(wid) if wid else None
        return w is not None and w["gen"] == self.gen

    def sync(self, wid: str, reports: int, want: int = 0, steps: int = 0) -> dict[str, Any]:
        """The worker's one call between training steps: report rounds, finish flag, new jobs.

        ``reports``: how many ``ray.train.report`` calls this worker made in this group;
        ``want``: free slots to fill; ``steps``: training steps since the last call.
        """
        with self._lock:
            if not self._current(wid):
                return {"stale": True, "round": reports, "finished": True, "jobs": []}
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
            jobs = self._lease(wid, want) if want > 0 and not self.finished else []
            return {"stale": False, "round": self.round, "finished": self.finished, "jobs": jobs}

    def _lease(self, wid: str, n: int) -> list[dict[str, Any]]:
        out = []
        while self.pending and len(out) < n:
            jid = self.pending.popleft()
            if self.status[jid] != PENDING:
                continue
            self._set(jid, LEASED, wid)
            out.append(dict(self.jobs[jid], attempt=self.attempts[jid], solo=jid in self.solo))
        return out

    def handoff(self, wid: str, job_id: str, result: dict[str, Any]) -> bool:
        """A worker stored an adapter (uploaded + verified); publish it. False: already handled."""
        with self._lock:
            st = self.status.get(job_id)
            if st not in (PENDING, LEASED):
                return False
            if st == LEASED and self.owner.get(job_id) != wid and self._current(wid):
                return False  # leased again to someone else in this group: theirs wins
            self._set(job_id, PUBLISHING, wid)
            self.results[job_id] = {**result, "worker": wid, "attempts": self.attempts[job_id] + 1}
            if wid in self.workers:
                self.workers[wid]["handed_off"] += 1
            self.dirty = True
        self._outbox.put(job_id)
        return True

    def fail(self, wid: str, job_id: str, error: str, *, solo: bool = True) -> str:
        """Training or upload of a job raised: retry it (alone in a slot) or give up on it."""
        with self._lock:
            if self.status.get(job_id) != LEASED or (
                self.owner.get(job_id) != wid and self._current(wid)
            ):
                return self.status.get(job_id, "unknown")
            self.attempts[job_id] += 1
            self.errors[job_id].append(error)
            if wid in self.workers:
                self.workers[wid]["failed"] += 1
            if self.attempts[job_id] > self.job_retries:
                self._set(job_id, FAILED)
                self.dirty = True
                return FAILED
            self._set(job_id, PENDING)
            if solo:
                self.solo.add(job_id)
            self.pending.appendleft(job_id)
            return PENDING

    # -- publishing: MLflow writers + one index writer -------------------------------------------
    def _get_registry(self) -> Any:
        with self._registry_lock:
            if self._registry is None:
                from registry import AdapterRegistry

                kw = dict(self._registry_kwargs or {})
                self._registry = AdapterRegistry.from_urls(
                    kw.pop("store_url"), kw.pop("tracking_uri"), kw.pop("index_url"), **kw
                )
            return self._registry

    def _publish_one(self, job_id: str) -> Any:
        """MLflow run + registered version of one handed-off adapter; returns its IndexEntry.

        No "already registered?" lookup first: the plan left out every job key the registry
        knows, and the queue hands each job to the publisher once; ``register`` itself is
        idempotent by job key all the same.
        """
        from datetime import UTC, datetime

        from registry import IndexEntry, adapter_tags

        reg = self._get_registry()
        job, res = self.jobs[job_id], self.results[job_id]
        tenant, identity, key = job["tenant"], job["identity"], job["job_key"]
        meta = res["meta"]
        if meta.get("tenant") not in (None, tenant) or meta.get("identity") != identity:
            raise RuntimeError(f"adapter of job {job_id} belongs to someone else")
        losses = {k: float(v) for k, v in (meta.get("final_losses") or {}).items()}
        metrics = {f"final_{k}": v for k, v in losses.items()}
        metrics.update(
            train_s=float(res.get("train_s", 0.0)), upload_s=float(res.get("upload_s", 0.0))
        )
        params = {
            **self.params,
            "job_key": key,
            "references": len(job["refs"]),
            "attempts": res.get("attempts", 1),
            "worker": res.get("worker"),
        }
        run_id = reg.models.log_job_run(
            tenant, identity, params, meta.get("loss_curve") or [], metrics, job_key=key,
            tags={"pipeline_run": str(self.lineage.get("pipeline_run", ""))},
        )
        tags: dict[str, Any] = {
            **adapter_tags(meta),
            "ref_sha256s": sorted(r["sha256"] for r in job["refs"]),
            **self.lineage,
        }
        version = reg.models.register(
            tenant, identity, res["uri"], res["sha256"], tags, run_id=run_id, job_key=key
        )
        with self._lock:
            res.update(version=int(version), run_id=run_id)
            res.pop("meta", None)  # the loss curve is in MLflow now; keep the actor small
        return IndexEntry(
            tenant=tenant, identity=identity, version=int(version), uri=res["uri"],
            sha256=res["sha256"], base_fingerprint=meta.get("base_fingerprint"), job_key=key,
            updated_at=datetime.now(UTC),
        )

    def _publish_loop(self) -> None:
        if self._registry_kwargs is not None:
            try:  # import MLflow and open the database while the workers start
                _ = self._get_registry().models.client
            except Exception:
                log.exception("cannot open the registry yet (retried per adapter)")
        while True:
            jid = self._outbox.get()
            if jid is None:
                return
            if self._registry_kwargs is None:
                self._indexq.put((jid, None))
                continue
            t0 = time.perf_counter()
            try:
                entry = self._publish_one(jid)
            except Exception as exc:
                log.exception("publishing job %s failed", jid)
                with self._lock:
                    self._set(jid, FAILED)
                    self.errors[jid].append(f"publish: {_short_error(exc)}")
                    self.dirty = True
                entry = None
            dt = time.perf_counter() - t0
            with self._lock:
                self.pub_stats["published"] += 1
                self.pub_stats["publish_s"] += dt
                self.results[jid]["publish_s"] = dt
            if entry is not None:
                self._indexq.put((jid, entry))

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
                error = _short_error(exc)
                time.sleep(0.2 * 2**attempt)
        dt = time.perf_counter() - t0
        with self._lock:
            if entries:
                self.pub_stats["index_writes"] += 1
                self.pub_stats["index_s"] += dt
                self.pub_stats["index_rows"] += len(entries)
            for jid, _ in batch:
                if error is None:
                    self._set(jid, DONE)
                    self.results[jid]["done_at"] = time.time()
                else:
                    self._set(jid, FAILED)
                    self.errors[jid].append(f"index write failed: {error}")
            self.dirty = True
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
            with self._lock:  # nothing else can arrive: write now rather than wait
                last = self.counts[PENDING] + self.counts[LEASED] == 0 and self._outbox.empty()
            if batch and (
                (last and self._indexq.empty())
                or len(batch) >= self.index_batch
                or time.monotonic() - last_flush >= self.index_interval_s
            ):
                self._flush(batch)
                last_flush = time.monotonic()

    # -- the driver's view ---------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": len(self.status),
                **{k: self.counts[k] for k in (PENDING, LEASED, PUBLISHING, DONE, FAILED)},
                "finished": self.finished,
                "restarts": self.restarts,
                "requeued_after_loss": self.requeued_after_loss,
                "generation": self.gen,
                "rounds": self.round,
                "steps": self.steps,
                "workers": {
                    wid: {**w, "leased": len(self.leased_by.get(wid, ()))}
                    for wid, w in self.workers.items()
                    if w["gen"] == self.gen
                },
            }

    def outcome(self) -> dict[str, Any]:
        """Everything the summary needs: per job status, result, attempts, errors; stats."""
        with self._lock:
            jobs = {}
            for jid, job in self.jobs.items():
                res = {k: v for k, v in self.results.get(jid, {}).items() if k != "meta"}
                jobs[jid] = {
                    "tenant": job["tenant"], "identity": job["identity"],
                    "job_key": job["job_key"], "status": self.status[jid],
                    "attempts": self.attempts[jid] + (1 if jid in self.results else 0),
                    "errors": list(self.errors.get(jid, [])), **res,
                }
            return {
                "jobs": jobs, "restarts": self.restarts,
                "requeued_after_loss": self.requeued_after_loss,
                "publisher": dict(self.pub_stats), "workers": dict(self.workers),
                "rounds": self.round, "steps": self.steps,
            }

    def close(self, timeout: float = 60.0) -> None:
        """Stop the publishers and the indexer once they drained what was handed off."""
        for _ in self._publishers:
            self._outbox.put(None)
        deadline = time.monotonic() + timeout
        for t in self._publishers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._indexq.put(None)
        self._indexer.join(max(0.0, deadline - time.monotonic()))


def make_job_queue(jobs: list[dict[str, Any]], registry: Mapping[str, Any] | None, **kwargs: Any):
    """Start :class:`JobQueue` as a Ray actor (no CPU reserved; threaded so progress polls and
    leases never wait behind each other)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=16)(JobQueue)
    return actor.remote(jobs, registry, **kwargs)


# ---------------------------------------------------------------------------------------------
# the Ray Train worker
# ---------------------------------------------------------------------------------------------


def _read_photo(uri: str, sha256: str, storage_options: Mapping[str, Any] | None, limits: Any):
    from pfstorer.images import decode_image
    from registry import is_local_url, url_to_fs

    fs, path = url_to_fs(uri, None if is_local_url(uri) else storage_options)
    with fs.open(path, "rb") as fh:
        data = fh.read(limits.max_bytes + 1)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise RuntimeError(f"{uri} changed since validation (sha256 {got[:12]}... != {sha256[:12]}...)")
    return decode_image(data, limits=limits, name=uri)


class _Worker:
    """State of one Ray Train worker: the base, its packed trainer, its queue session."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        import ray
        import ray.train
        import torch

        from pfstorer.images import ImageLimits
        from pfstorer.model import load_base
        from pfstorer.config import TrainingSpeed
        from pfstorer.training import PersonalizeConfig
        from registry import ArtifactStore

        self.ray, self.train = ray, ray.train
        self.cfg = cfg
        self.queue = cfg["queue"]
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        ckpt = ray.train.get_checkpoint()
        group = uuid.uuid4().hex if self.rank == 0 else None
        if ctx.get_world_size() > 1:
            from ray.train.collective import broadcast_from_rank_zero

            group = broadcast_from_rank_zero(group)
        self.wid = ray.get(
            self.queue.register.remote(
                self.rank, os.getpid(), socket.gethostname(), group, ckpt.path if ckpt else None
            )
        )
        if cfg.get("use_gpu"):
            import ray.train.torch as rtt

            device = rtt.get_device()
        else:
            device = torch.device("cpu")
        t0 = time.perf_counter()
        self.model = load_base(cfg["base"], weights=cfg.get("base_weights"), device=device)
        if self.model.fingerprint != cfg["base_fingerprint"]:
            raise RuntimeError(
                f"worker loaded base {self.model.fingerprint}, the run planned with "
                f"{cfg['base_fingerprint']}: the weights differ between driver and worker"
            )
        self.load_s = time.perf_counter() - t0
        self.pconfig = PersonalizeConfig(**cfg["config"])
        self.pack = max(1, int(cfg.get("pack", 1)))
        self.speed = TrainingSpeed(**cfg.get("train_speed", {}))
        self.packed = self._trainer(self.pack)
        self.dry = bool(cfg.get("dry_train"))
        self.store = ArtifactStore(cfg["store_url"], cfg.get("storage_options"))
        self.storage_options = cfg.get("storage_options")
        self.limits = cfg.get("limits") or ImageLimits()
        self.inflight: dict[tuple[str, str], dict[str, Any]] = {}
        self.reports = 0
        self.handed: list[str] = []
        self.steps_since_sync = 0
        self.tmp = tempfile.mkdtemp(prefix="pfstorer-worker-")
        self._dry_template: list[Any] | None = None

    # -- one job ---------------------------------------------------------------------------------
    def _job(self, job: Mapping[str, Any]):
        from pfstorer.training import PersonalizeJob

        refs = [_read_photo(r["uri"], r["sha256"], self.storage_options, self.limits) for r in job["refs"]]
        return PersonalizeJob(
            job["identity"], refs, seed=None, tenant=job["tenant"],
            reference_names=[r["sha256"] for r in job["refs"]],
        )

    def _fail(self, job: Mapping[str, Any], exc: BaseException, *, solo: bool = True) -> None:
        log.warning("job %s/%s failed: %s", job["tenant"], job["identity"], _short_error(exc))
        self.ray.get(self.queue.fail.remote(self.wid, job["job_id"], _short_error(exc), solo=solo))

    def _finish(self, adapter: Any, job: Mapping[str, Any]) -> None:
        """Save, upload (write -> verify -> move), hand off to the queue's publisher."""
        t0 = time.perf_counter()
        d = os.path.join(self.tmp, job["job_id"])
        try:
            adapter.save(d)
            uri, sha = self.store.put_adapter(d, job["tenant"], job["identity"], job["job_key"])
            meta = json.loads(adapter.metadata.model_dump_json())
        except Exception as exc:
            self._fail(job, exc)
            return
        finally:
            shutil.rmtree(d, ignore_errors=True)
        result = {
            "uri": uri, "sha256": sha, "meta": meta,
            "train_s": time.time() - job["_started"], "upload_s": time.perf_counter() - t0,
        }
        if self.ray.get(self.queue.handoff.remote(self.wid, job["job_id"], result)):
            self.handed.append(job["job_key"])

    def _dry_adapter(self, job: Mapping[str, Any], pj: Any) -> Any:
        """An adapter of the real shapes without running the UNet (benchmarks of the scheduler)."""
        import torch

        from pfstorer.adapter import Adapter, AdapterMetadata

        t = self.packed
        if self._dry_template is None:
            t.weights.init_slot(0, torch.Generator().manual_seed(0), self.model.prompt)
            with torch.no_grad():  # the real shapes: one forward of the references, no training
                features = t.reference_features([r.float() for r in pj.references])
            self._dry_template = [torch.zeros_like(x) for x in t.reference_tokens(features)]
        seed = int(job["job_key"][:8], 16)
        with torch.no_grad():
            t.weights.init_slot(0, torch.Generator().manual_seed(seed), self.model.prompt)
            tensors = t.weights.export_slot(0, self.model.prompt, self._dry_template)
        meta = AdapterMetadata(
            identity=job["identity"], tenant=job["tenant"], base_fingerprint=self.model.fingerprint,
            base_preset=self.model.config.name, config=dict(self.cfg["config"], dry_train=True),
            steps=0, references=list(pj.reference_names),
        )
        return Adapter(tensors, meta)

    def _trainer(self, capacity: int) -> Any:
        from pfstorer.training import PackedTrainer

        return PackedTrainer(self.model, self.pconfig, capacity=capacity, speed=self.speed)

    def _start(self, job: dict[str, Any]) -> None:
        job["_started"] = time.time()
        try:
            pj = self._job(job)
            if self.dry:
                self._finish(self._dry_adapter(job, pj), job)
            elif job.get("solo"):
                solo = self._trainer(1)
                for adapter in solo.run([pj]):
                    self._finish(adapter, job)
            else:
                self.packed.add(pj)
                self.inflight[(job["tenant"], job["identity"])] = job
        except Exception as exc:
            self._fail(job, exc)

    def _step(self) -> None:
        try:
            finished = self.packed.step()
        except Exception as exc:  # which person broke the batch is unknown: retry each alone
            jobs = list(self.inflight.values())
            self.inflight.clear()
            self.packed = self._trainer(self.pack)
            for job in jobs:
                self._fail(job, exc, solo=True)
            return
        self.steps_since_sync += 1
        for adapter in finished:
            job = self.inflight.pop((adapter.metadata.tenant, adapter.identity))
            self._finish(adapter, job)

    # -- Ray Train reports -------------------------------------------------------------------------
    def _report(self) -> None:
        from ray.train import Checkpoint

        d = tempfile.mkdtemp(dir=self.tmp, prefix="ckpt-")
        try:
            progress = {
                "rank": self.rank, "worker": self.wid, "report": self.reports + 1,
                "handed_off": self.handed, "in_flight": sorted(j["job_key"] for j in self.inflight.values()),
                "time": time.time(),
            }
            with open(os.path.join(d, f"progress-rank{self.rank}.json"), "w") as fh:
                json.dump(progress, fh)
            snap = self.ray.get(self.queue.progress.remote())
            metrics = {k: snap[k] for k in ("done", "failed", "pending", "leased", "publishing", "restarts")}
            metrics["handed_off_by_worker"] = len(self.handed)
            self.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        self.reports += 1

    def loop(self) -> None:
        try:
            while True:
                s = self.ray.get(
                    self.queue.sync.remote(self.wid, self.reports, self.packed.free, self.steps_since_sync)
                )
                self.steps_since_sync = 0
                if s["stale"]:
                    return
                for job in s["jobs"]:
                    self._start(job)
                while self.reports < s["round"]:
                    self._report()
                if s["finished"] and self.reports >= s["round"]:
                    return
                if self.packed.slots:
                    self._step()
                elif not s["jobs"]:
                    time.sleep(0.05)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def train_loop(cfg: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the personalization ``TorchTrainer`` (see module docstring).

    ``cfg``: ``queue`` (the :class:`JobQueue` actor), ``base``, ``base_weights``,
    ``base_fingerprint``, ``config`` (PersonalizeConfig fields), ``pack``, ``train_speed``
    (TrainingSpeed fields), ``store_url``,
    ``storage_options``, ``limits`` (ImageLimits fields), ``use_gpu``, ``dry_train``.
    """
    try:
        _Worker(cfg).loop()
    except Exception:
        log.error("pfstorer worker failed:\n%s", traceback.format_exc())
        raise
