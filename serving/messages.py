"""What the Gateway and a Restorer replica say to each other: typed, frozen records.

A request's own errors (a corrupt photo, an unknown person, a deadline passed) come back as
:class:`Refused`, an answer, not an exception: Ray Serve logs every exception a replica raises
with its traceback at ERROR, and a client must not be able to fill the logs. Exceptions that do
cross are the server's faults.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Refused", "Restored"]


@dataclass(frozen=True)
class Restored:
    """The restored photo, encoded, and how it was made."""

    body: bytes
    media_type: str
    adapter: str  # tenant/identity@version, or "none"
    base: str  # base model fingerprint
    steps: int
    queue_s: float  # from reaching the replica to its start
    compute_s: float  # from its start to its end (other tenants' tiles included)


@dataclass(frozen=True)
class Refused:
    """A request the replica would not or could not finish: the HTTP status and why."""

    status: int
    reason: str
