"""Admitted requests on a replica's model: their start (:class:`serving.fair_share.RunQueue`),
their people's device slots, and the computation itself, alone or in a cross-request batch.

With ``serve.max_batch_size`` above 1, ``@serve.batch`` gathers waiting requests, people mixed,
and :func:`serving.batching.plan_runs` splits them into ``restore_batch`` calls; a row of a batch
may then differ from its lone restore by float rounding (1e-5 before the 8-bit output), which
is why batching is opt-in.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from pfstorer.deadline import CancelledError, Deadline, DeadlineExceededError
from pfstorer.errors import PFStorerError
from pfstorer.images import ImageLimits
from pfstorer.model import RestorationModel
from pfstorer.restore_options import RestoreOptions
from pfstorer.settings import Settings
from serving.batching import BatchItem, BatchStats, batch_signature, plan_runs
from serving.fair_share import Lease, ModelThreads, RunQueue
from serving.resident import IoCall, ResidentAdapters
from serving.serve_compat import clear_multiplexed_model_id

__all__ = ["Done", "Failed", "Runner", "device_failure"]


@dataclass(frozen=True)
class Done:
    """One request's restored image and what it took."""

    image: torch.Tensor  # uint8 [3,H,W]
    adapter: str  # tenant/identity@version, or "none"
    queue_s: float
    compute_s: float


@dataclass(frozen=True)
class Failed:
    """One request of a batch that failed (its person's adapter would not load, say): the others ran."""

    error: Exception


def device_failure(exc: BaseException) -> str | None:
    """What broke the device, if ``exc`` leaves it unusable (a CUDA error: the context stays
    poisoned, every later call fails too); None for errors of one request, out-of-memory included."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    text = str(exc)
    if type(exc).__name__ == "AcceleratorError" or "CUDA error" in text or "CUBLAS_STATUS" in text:
        return (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    return None


class Runner:
    """Runs admitted requests on one model, sharing it fairly between tenants."""

    def __init__(self, settings: Settings, model: RestorationModel, adapters: ResidentAdapters,
                 threads: ModelThreads, queue: RunQueue, *, limits: ImageLimits, io: IoCall) -> None:
        s = settings.serve
        self.settings = settings
        self.model = model
        self.adapters = adapters
        self.threads = threads
        self.queue = queue
        self.limits = limits
        self._io = io
        self.batching = s.max_batch_size > 1
        self.batch_stats = BatchStats()
        self._restore_batched.set_max_batch_size(s.max_batch_size)
        self._restore_batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.stopped = {"deadline": 0, "cancelled": 0}  # restores stopped before their end
        self.device_failed: str | None = None  # set by a CUDA error: the replica's health check fails

    async def submit(self, job: BatchItem) -> Done:
        """Run one request, in the next batch or alone; its own errors are raised."""
        if self.batching:
            result = await self._in_batch(job)
        else:
            (result,) = await self._run([job])
        if isinstance(result, Failed):
            raise result.error
        return result

    def decode(self, data: bytes) -> torch.Tensor:
        from pfstorer.images import decode_image

        # straight to uint8: the photo crossed the object store encoded
        return decode_image(data, limits=self.limits, dtype=torch.uint8)

    # -- batches --------------------------------------------------------------------------------
    async def _in_batch(self, job: BatchItem) -> Done | Failed:
        """Queue ``job`` for the next batch, outside its multiplexed model id (people mix)."""
        context = contextvars.copy_context()
        context.run(clear_multiplexed_model_id)
        task = asyncio.get_running_loop().create_task(self._restore_batched(job), context=context)
        return await task

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # sizes set per replica in __init__
    async def _restore_batched(self, jobs: list[BatchItem]) -> list[Done | Failed]:
        """Run a batch of requests as few ``restore_batch`` calls as :func:`plan_runs` allows;
        one bad request never fails the others."""
        keys = [j.key for j in jobs]
        runs = plan_runs([(batch_signature(j.image.shape, j.options), j.key) for j in jobs],
                         self.adapters.pool.size)
        self.batch_stats.record(keys, runs)
        results: list[Done | Failed] = [Failed(RuntimeError("not run"))] * len(jobs)
        for run in runs:
            members = [jobs[i] for i in run]
            try:
                outs = await self._run(members)
            except Exception as exc:
                outs = [Failed(exc)] * len(members)
            for i, out in zip(run, outs, strict=True):
                results[i] = out
        return results

    async def _run(self, jobs: list[BatchItem]) -> list[Done | Failed]:
        """Rows of one signature with at most ``adapter_slots`` people, in one call.

        The run waits for its start (:class:`RunQueue`), acquires its people's slots holding
        the replica's turn, then computes in its own thread, sharing the model tile batch by tile
        batch with the other running requests. Its people stay in their slots until it ends:
        every acquisition first makes the running requests' people the most recently used, and
        they never outnumber the slots, so the LRU evicts somebody else."""
        adapters = self.adapters
        entries = {j.key: j.entry for j in jobs if j.key}  # the newest entry of each person
        failed: dict[str, Exception] = {}
        async with self.queue.start({j.tenant for j in jobs}, entries):
            t1 = time.perf_counter()
            async with adapters.turns.turn(jobs[0].key):
                for key in self.queue.people - entries.keys():
                    await adapters.touch(key)  # only its place in the LRU changes
                residents = {}
                for key, entry in entries.items():
                    try:
                        residents[key] = await adapters.acquire(key, entry)
                    except Exception as exc:  # this person's rows fail, the others run
                        failed[key] = exc
            if any(r.released for r in residents.values()):
                raise RuntimeError("an adapter slot was evicted while its batch was being formed")
            rows = [j for j in jobs if j.key not in failed]
            images = await self._compute(rows, residents) if rows else None
            t2 = time.perf_counter()
        row = iter(images if images is not None else ())
        return [
            Failed(failed[j.key]) if j.key in failed
            else Done(next(row), residents[j.key].label if j.key else "none", t1 - j.since, t2 - t1)
            for j in jobs
        ]

    async def _compute(self, rows: list[BatchItem], residents: dict[str, Any]) -> torch.Tensor:
        for j in rows:  # decoded only now: a waiting request holds its encoded bytes alone
            if j.image is None:
                j.image = await self._io(self.decode, j.data)
        slots = [residents[j.key].slot if j.key else self.adapters.base_slot for j in rows]
        work = functools.partial(
            self._restore_sync, [j.image for j in rows], slots if residents else None,
            [j.options.seed for j in rows], [j.options.strength for j in rows], rows[0].options,
        )
        try:
            return await self.threads.run(work, {j.tenant for j in rows}, Deadline.any_of([j.deadline for j in rows]))
        except (DeadlineExceededError, CancelledError) as exc:
            self.stopped["cancelled" if isinstance(exc, CancelledError) else "deadline"] += 1
            raise
        except PFStorerError:
            raise
        except Exception as exc:
            self.device_failed = self.device_failed or device_failure(exc)
            raise

    def _restore_sync(
        self, images_u8: list[torch.Tensor], slots: list[int] | None, seeds: list[int], strengths: list[float],
        options: RestoreOptions, lease: Lease,
    ) -> torch.Tensor:
        """Rows of one shape and options; row i with device slot ``slots[i]`` (None: all base).
        ``lease`` is checked before every tile batch: the deadline, and the model's fair share."""
        from pfstorer.sampling import restore_batch

        # uint8 in, uint8 out, as `pfstorer restore` does: the same bits as the offline CLI
        return restore_batch(
            self.model,
            torch.stack(images_u8),
            adapters=self.adapters.slots if slots is not None else None,
            slots=slots,
            seeds=seeds,
            **{**options.sampling_kwargs(), "strength": strengths},
            tile_batch=self.settings.serve.tile_batch,
            deadline=lease,
        )
