"""The Ray Train worker of a personalization run: one frozen base, packed identities, jobs leased
from the :class:`~pipelines.job_queue.JobQueue`.

:func:`train_loop` is the ``train_loop_per_worker`` of a ``TorchTrainer``: each worker loads the
frozen base **once**, then pulls jobs from the queue into a
:class:`pfstorer.training.PackedTrainer` of ``pack`` slots, so several people train in one batch;
whenever a slot frees up it is refilled from the queue. A finished adapter is saved to a
temporary directory, uploaded to the artifact store by the worker (write -> sha256 verify -> move
into place, :meth:`registry.ArtifactStore.put_adapter`) and handed to the queue, whose publisher
registers and indexes it. Each Ray Train report carries a small checkpoint
(``progress-rank{r}.json``: what this worker handed off) and the run's counters as metrics.

Every ``snapshot_interval_s`` the worker sends the queue each person's training state
(:meth:`pfstorer.training.PackedTrainer.snapshot`): when Ray Train replaces the group after a
worker was lost, the requeued people continue from there. If the queue itself is gone, the
workers fail together and the group Ray Train starts next returns at once (it has no queue to
register with), so ``fit()`` ends and the driver can sum the run up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from pipelines.publisher import short_error
from pipelines.records import Lease, PersonJob, StoredAdapter

log = logging.getLogger(__name__)

__all__ = ["WorkerConfig", "train_loop"]


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a run needs (``train_loop_config={"worker": WorkerConfig(...)}``)."""

    queue: Any  # the JobQueue actor
    base: str
    base_weights: str | None
    base_fingerprint: str
    config: dict[str, Any]  # PersonalizeConfig fields
    store_url: str
    pack: int = 1
    train_speed: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainingSpeed fields
    storage_options: dict[str, Any] | None = None
    limits: Any = None  # pfstorer.images.ImageLimits (None: its defaults)
    use_gpu: bool = False
    dry_train: bool = False
    snapshot_interval_s: float = 30.0  # 0: after every step


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

    def __init__(self, cfg: WorkerConfig) -> None:
        import ray
        import ray.train
        import torch

        from pfstorer.config import TrainingSpeed
        from pfstorer.images import ImageLimits
        from pfstorer.model import load_base
        from pfstorer.training import PersonalizeConfig
        from registry import ArtifactStore

        self.ray, self.train = ray, ray.train
        self.cfg = cfg
        self.queue = cfg.queue
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
        if cfg.use_gpu:
            import ray.train.torch as rtt

            device = rtt.get_device()
        else:
            device = torch.device("cpu")
        t0 = time.perf_counter()
        self.model = load_base(cfg.base, weights=cfg.base_weights, device=device)
        if self.model.fingerprint != cfg.base_fingerprint:
            raise RuntimeError(
                f"worker loaded base {self.model.fingerprint}, the run planned with "
                f"{cfg.base_fingerprint}: the weights differ between driver and worker"
            )
        self.load_s = time.perf_counter() - t0
        self.pconfig = PersonalizeConfig(**cfg.config)
        self.pack = max(1, int(cfg.pack))
        self.speed = TrainingSpeed(**cfg.train_speed)
        self.packed = self._trainer(self.pack)
        self.store = ArtifactStore(cfg.store_url, cfg.storage_options)
        self.limits = cfg.limits or ImageLimits()
        self.inflight: dict[tuple[str, str], tuple[PersonJob, float]] = {}  # (tenant, identity) -> job, start
        self.reports = 0
        self.handed: list[str] = []
        self.steps_since_sync = 0
        self.last_snapshot = time.monotonic()
        self.tmp = tempfile.mkdtemp(prefix="pfstorer-worker-")
        self._dry_template: list[Any] | None = None

    # -- one job ---------------------------------------------------------------------------------
    def _job(self, job: PersonJob):
        from pfstorer.training import PersonalizeJob

        refs = [_read_photo(r.uri, r.sha256, self.cfg.storage_options, self.limits) for r in job.refs]
        return PersonalizeJob(job.identity, refs, seed=None, tenant=job.tenant,
                              reference_names=[r.sha256 for r in job.refs])

    def _fail(self, job: PersonJob, exc: BaseException, *, solo: bool = True) -> None:
        log.warning("job %s/%s failed: %s", job.tenant, job.identity, short_error(exc))
        self.ray.get(self.queue.fail.remote(self.wid, job.job_id, short_error(exc), solo=solo))

    def _finish(self, adapter: Any, job: PersonJob, started: float) -> None:
        """Save, upload (write -> verify -> move), hand off to the queue's publisher."""
        t0 = time.perf_counter()
        d = os.path.join(self.tmp, job.job_id)
        try:
            adapter.save(d)
            uri, sha = self.store.put_adapter(d, job.tenant, job.identity, job.job_key)
            meta = json.loads(adapter.metadata.model_dump_json())
        except Exception as exc:
            self._fail(job, exc)
            return
        finally:
            shutil.rmtree(d, ignore_errors=True)
        stored = StoredAdapter(uri=uri, sha256=sha, meta=meta, train_s=time.time() - started,
                               upload_s=time.perf_counter() - t0)
        if self.ray.get(self.queue.handoff.remote(self.wid, job.job_id, stored)):
            self.handed.append(job.job_key)

    def _dry_adapter(self, job: PersonJob, pj: Any) -> Any:
        """An adapter of the real shapes without running the UNet (benchmarks of the job queue)."""
        import torch

        from pfstorer.adapter import Adapter, AdapterMetadata

        t = self.packed
        if self._dry_template is None:
            t.weights.init_slot(0, torch.Generator().manual_seed(0), self.model.prompt)
            with torch.no_grad():  # the real shapes: one forward of the references, no training
                features = t.reference_features([r.float() for r in pj.references])
            self._dry_template = [torch.zeros_like(x) for x in t.reference_tokens(features)]
        seed = int(job.job_key[:8], 16)
        with torch.no_grad():
            t.weights.init_slot(0, torch.Generator().manual_seed(seed), self.model.prompt)
            tensors = t.weights.export_slot(0, self.model.prompt, self._dry_template)
        meta = AdapterMetadata(
            identity=job.identity, tenant=job.tenant, base_fingerprint=self.model.fingerprint,
            base_preset=self.model.config.name, config=dict(self.cfg.config, dry_train=True),
            steps=0, references=list(pj.reference_names),
        )
        return Adapter(tensors, meta)

    def _trainer(self, capacity: int) -> Any:
        from pfstorer.training import PackedTrainer

        return PackedTrainer(self.model, self.pconfig, capacity=capacity, speed=self.speed)

    def _start(self, lease: Lease) -> None:
        job, started = lease.job, time.time()
        try:
            pj = self._job(job)
            if self.cfg.dry_train:
                self._finish(self._dry_adapter(job, pj), job, started)
            elif lease.solo:
                for adapter in self._trainer(1).run([pj]):
                    self._finish(adapter, job, started)
            else:
                self._add(pj, lease)
                self.inflight[(job.tenant, job.identity)] = (job, started)
        except Exception as exc:
            self._fail(job, exc)

    def _add(self, pj: Any, lease: Lease) -> None:
        if lease.resume is not None:
            try:
                self.packed.add(pj, resume=lease.resume)
                return
            except ValueError as exc:  # a snapshot of another layout: train from the start
                log.warning("job %s/%s: cannot resume (%s); training from step 0",
                            lease.job.tenant, lease.job.identity, exc)
        self.packed.add(pj)

    def _save_progress(self) -> None:
        """Send the queue every unfinished person's training state, at most every interval."""
        now = time.monotonic()
        if now - self.last_snapshot < self.cfg.snapshot_interval_s:
            return
        self.last_snapshot = now
        states = {}
        for k, slot in self.packed.slots.items():
            if 0 < slot.step < self.pconfig.steps:
                job, _ = self.inflight[(slot.job.tenant, slot.job.identity)]
                states[job.job_id] = self.packed.snapshot(k)
        if states:
            self.ray.get(self.queue.save_progress.remote(self.wid, states))

    def _step(self) -> None:
        try:
            finished = self.packed.step()
        except Exception as exc:  # which person broke the batch is unknown: retry each alone
            jobs = list(self.inflight.values())
            self.inflight.clear()
            self.packed = self._trainer(self.pack)
            for job, _ in jobs:
                self._fail(job, exc, solo=True)
            return
        self.steps_since_sync += 1
        for adapter in finished:
            job, started = self.inflight.pop((adapter.metadata.tenant, adapter.identity))
            self._finish(adapter, job, started)
        self._save_progress()

    # -- Ray Train reports -------------------------------------------------------------------------
    def _report(self) -> None:
        from ray.train import Checkpoint

        d = tempfile.mkdtemp(dir=self.tmp, prefix="ckpt-")
        try:
            progress = {
                "rank": self.rank, "worker": self.wid, "report": self.reports + 1,
                "handed_off": self.handed, "in_flight": sorted(j.job_key for j, _ in self.inflight.values()),
                "time": time.time(),
            }
            with open(os.path.join(d, f"progress-rank{self.rank}.json"), "w") as fh:
                json.dump(progress, fh)
            snap = self.ray.get(self.queue.progress.remote())
            metrics = {k: getattr(snap, k) for k in ("done", "failed", "pending", "leased", "publishing", "restarts")}
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
                if s.stale:
                    return
                for lease in s.leases:
                    self._start(lease)
                while self.reports < s.round:
                    self._report()
                if s.finished and self.reports >= s.round:
                    return
                if self.packed.slots:
                    self._step()
                elif not s.leases:
                    time.sleep(0.05)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the personalization ``TorchTrainer``: ``config["worker"]``
    is the run's :class:`WorkerConfig`."""
    from ray.exceptions import RayActorError

    try:
        try:
            worker = _Worker(config["worker"])
        except RayActorError as exc:  # no queue to register with: this group has nothing to do
            log.error("the job queue is gone, this worker stops: %s", short_error(exc))
            return
        try:
            worker.loop()
        except RayActorError as exc:
            # fail, not return: a worker that returned alone would leave the others of its group
            # waiting in a report round forever; the group that replaces this one returns at once
            raise RuntimeError(f"the job queue is gone: {short_error(exc)}") from None
    except Exception:
        log.error("pfstorer worker failed:\n%s", traceback.format_exc())
        raise
