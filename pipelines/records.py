"""What crosses the Ray boundaries of a personalization run: typed records, no torch, no Ray.

The driver plans :class:`PersonJob` s, the :class:`~pipelines.job_queue.JobQueue` actor leases
them to workers as :class:`Lease` s in a :class:`SyncReply`, a worker hands back a
:class:`StoredAdapter`; the driver polls :class:`QueueProgress` and reads every person's
:class:`JobRecord` in the :class:`QueueOutcome` at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PENDING, LEASED, PUBLISHING, DONE, FAILED = "pending", "leased", "publishing", "done", "failed"


@dataclasses.dataclass(frozen=True)
class RefPhoto:
    """One validated reference photo: where it is and the sha256 it had when validated."""

    uri: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class PersonJob:
    """One person to personalize in a run; ``job_key`` names what the adapter will have learnt."""

    job_id: str
    tenant: str
    identity: str
    job_key: str
    refs: tuple[RefPhoto, ...]


@dataclasses.dataclass(frozen=True)
class Lease:
    """A job leased to a worker: its ``attempt`` (0 first), whether it trains alone (a retry) and
    where to resume it (a :class:`pfstorer.training.SlotState` saved before its worker was lost)."""

    job: PersonJob
    attempt: int = 0
    solo: bool = False
    resume: Any = None


@dataclasses.dataclass(frozen=True)
class SyncReply:
    """The queue's answer to a worker between two training steps."""

    stale: bool  # the worker's group was replaced: it stops
    round: int  # Ray Train reports every worker must have made
    finished: bool  # every job is settled
    leases: tuple[Lease, ...] = ()


@dataclasses.dataclass(frozen=True)
class StoredAdapter:
    """An adapter a worker uploaded and verified, handed to the queue's publisher."""

    uri: str
    sha256: str
    meta: dict[str, Any]  # adapter.json (identity, tenant, base fingerprint, losses, loss curve)
    train_s: float = 0.0
    upload_s: float = 0.0


@dataclasses.dataclass
class JobRecord:
    """One job's state in the queue and, at the end, in the run's outcome."""

    job: PersonJob
    status: str = PENDING
    failures: int = 0  # attempts that raised
    errors: list[str] = dataclasses.field(default_factory=list)
    solo: bool = False
    stored: StoredAdapter | None = None
    worker: str | None = None  # the worker that handed the adapter off
    version: int | None = None
    run_id: str | None = None
    publish_s: float | None = None
    done_at: float | None = None
    snapshot: Any = None  # the latest pfstorer.training.SlotState its worker saved
    resumed: int = 0  # leases that continued from a snapshot

    @property
    def attempts(self) -> int:
        """Attempts made: the failed ones and the one whose adapter was handed off."""
        return self.failures + (self.stored is not None)


@dataclasses.dataclass
class WorkerInfo:
    """A training worker as the queue knows it (``gen``: the worker group it belongs to)."""

    rank: int
    pid: int
    host: str
    gen: int
    started: float
    resumed_from: str | None = None
    handed_off: int = 0
    failed: int = 0
    alive: bool = True
    leased: int = 0  # filled in by progress snapshots


@dataclasses.dataclass(frozen=True)
class QueueProgress:
    """A snapshot of the queue for the progress bar, ``on_progress`` callbacks and reports."""

    total: int
    pending: int
    leased: int
    publishing: int
    done: int
    failed: int
    finished: bool
    restarts: int
    requeued_after_loss: int
    resumed_after_loss: int
    resumable: int  # leased people whose training state is saved here (they survive a lost worker)
    generation: int
    rounds: int
    steps: int
    workers: dict[str, WorkerInfo]  # the current group's workers
    pid: int = 0  # the queue actor's process


@dataclasses.dataclass(frozen=True)
class QueueOutcome:
    """Everything the run's summary needs from the queue once it closed."""

    records: dict[str, JobRecord]
    restarts: int
    requeued_after_loss: int
    resumed_after_loss: int
    publisher: dict[str, Any]
    workers: dict[str, WorkerInfo]
    rounds: int
    steps: int
