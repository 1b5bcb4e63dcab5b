"""What the Gateway and a Restorer replica say to each other: typed, frozen records.

A request's own errors (a corrupt photo, an unknown person, a deadline passed) come back as
:class:`Refused`, an answer, not an exception: Ray Serve logs every exception a replica raises
with its traceback at ERROR, and a client must not be able to fill the logs. Exceptions that do
cross are the server's faults.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfstorer.restore_options import RestoreOptions

__all__ = ["Refused", "RestoreRequest", "Restored"]


@dataclass(frozen=True)
class RestoreRequest:
    """One photo to restore, as the Gateway admitted it (the photo's bytes travel beside it).

    The person is the call's multiplexed model id, not a field: Serve routes on it.
    """

    tenant: str  # whose request it is: its fair share of the model
    request_id: str
    options: RestoreOptions  # the request's fields over the server's defaults; steps may be None (the base's)
    format: str = "png"  # png, jpeg or webp
    quality: int | None = None  # None: serve.output_quality
    deadline_s: float | None = None  # seconds left for the work (the Gateway's request deadline)


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
