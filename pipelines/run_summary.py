"""What a ``pfstorer run`` did: per-person outcomes and the run's summary (JSON and a table)."""

from __future__ import annotations

import statistics
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["IdentityOutcome", "RunSummary"]


class IdentityOutcome(BaseModel):
    """What happened to one person that passed validation."""

    tenant: str
    identity: str
    status: str  # done | skipped | failed
    job_key: str
    version: int | None = None
    uri: str | None = None
    sha256: str | None = None
    attempts: int = 0
    error: str | None = None
    train_s: float | None = None  # lease -> adapter ready, in a worker (packed: shared steps)
    upload_s: float | None = None  # save + store write + sha256 verify, in the worker
    publish_s: float | None = None  # MLflow run + registration, in the publisher
    worker: str | None = None


class RunSummary(BaseModel):
    """The outcome of one ``pfstorer run`` (written as JSON to the state directory)."""

    run_id: str
    manifest: str
    manifest_hash: str
    base: str
    base_fingerprint: str
    config: dict[str, Any]
    dry_train: bool = False
    started_at: str
    finished_at: str = ""
    rows: int = 0
    people: int = Field(0, description="people that passed validation")
    done: int = 0
    skipped: int = 0
    failed: int = 0
    quarantined_people: int = 0
    quarantined_rows: int = 0
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    quarantine_url: str | None = None
    trained: int = Field(0, description="adapters trained by this run (handed to the publisher)")
    versions_created: int = Field(0, description="new MLflow model versions")
    index_repaired: int = 0
    workers: int = 1
    pack: int = 1
    worker_restarts: int = 0
    requeued_after_loss: int = 0
    resumed_after_loss: int = Field(0, description="requeued people that continued from a snapshot")
    queue_lost: bool = Field(False, description="the job queue actor died: the registry tells who finished")
    train_error: str | None = None
    ray_train: dict[str, Any] = Field(default_factory=dict)
    publisher: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    identities: list[IdentityOutcome] = Field(default_factory=list)
    summary_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.train_error is None

    def by_status(self, status: str) -> list[IdentityOutcome]:
        return [o for o in self.identities if o.status == status]

    def table(self) -> str:
        """The human summary printed at the end of a run."""
        lines = [
            f"pfstorer run {self.run_id}: {self.manifest} ({self.rows} rows, "
            f"hash {self.manifest_hash[:12]})",
            f"base {self.base} ({self.base_fingerprint[:12]}), steps "
            f"{self.config.get('steps')}{' (dry train)' if self.dry_train else ''}, "
            f"{self.workers} worker(s) x pack {self.pack}",
            "",
            f"  {'people':>8} {'done':>6} {'skipped':>8} {'failed':>7} {'quarantined':>12}"
            f" {'(rows)':>7}",
            f"  {self.people:>8} {self.done:>6} {self.skipped:>8} {self.failed:>7}"
            f" {self.quarantined_people:>12} {self.quarantined_rows:>7}",
            "",
        ]
        t = self.timings
        lines.append(
            "time: "
            + ", ".join(
                f"{k} {t[k]:.1f} s"
                for k in ("validate_s", "plan_s", "train_s", "total_s")
                if k in t
            )
        )
        done = self.by_status("done")
        if done:

            def med(vals: list[float | None]) -> str:
                v = [x for x in vals if x is not None]
                return f"{statistics.median(v):.2f} s" if v else "-"

            lines.append(
                f"per identity (median): train {med([o.train_s for o in done])}, upload "
                f"{med([o.upload_s for o in done])}, register {med([o.publish_s for o in done])}; "
                f"wall {t.get('train_s', 0.0) / max(len(done), 1):.2f} s per trained identity"
            )
        if self.worker_restarts:
            lines.append(
                f"worker group restarts: {self.worker_restarts} "
                f"({self.requeued_after_loss} leased people put back in the queue, "
                f"{self.resumed_after_loss} of them continued from a snapshot)"
            )
        if self.quarantine_reasons:
            lines.append(f"quarantine ({self.quarantine_url}):")
            lines += [f"  {n:6d}  {r}" for r, n in self.quarantine_reasons.items()]
        failed = self.by_status("failed")
        if failed:
            lines.append("failed:")
            lines += [f"  {o.tenant}/{o.identity}: {o.error}" for o in failed]
        if self.train_error:
            lines.append(f"training stopped: {self.train_error}")
        if self.summary_path:
            lines.append(f"summary: {self.summary_path}")
        return "\n".join(lines)
