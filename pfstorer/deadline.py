"""When a restore must stop: a time limit, or a caller who has gone away.

A restore of a large photo at many steps can take hours on a CPU; a request's deadline or a
client that hangs up must free the model for everyone else. :func:`pfstorer.sampling.restore_batch`
calls :meth:`Deadline.check` before every batch of tiles it runs through a network, so work stops
within one tile batch of the deadline or of :meth:`Deadline.cancel` (callable from any thread).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from .errors import PFStorerError


class Checkpoint(Protocol):
    """What long work calls between its steps: raises to stop it (a :class:`Deadline`), and may
    block while other work runs (a server's fair share of one model)."""

    def check(self) -> None: ...


class DeadlineExceededError(PFStorerError):
    """The work ran past its deadline and was stopped (the model is free again)."""

    status = 503


class CancelledError(PFStorerError):
    """The work was cancelled because its caller went away (the HTTP client disconnected)."""

    status = 499  # "client closed request": nobody reads it, and it is not a server error


class Deadline:
    """Stop after ``seconds`` (None: no time limit) or once :meth:`cancel` is called."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise if the work must stop now."""
        if self._cancelled.is_set():
            raise CancelledError("the request was cancelled: its client went away")
        if self.at is not None and time.monotonic() > self.at:
            raise DeadlineExceededError(f"the restore ran past its deadline of {self.seconds:g} s and was stopped")

    @staticmethod
    def any_of(members: list[Deadline]) -> Deadline:
        """One deadline for work shared by several callers: it runs while any of them still
        wants it (a batch of requests stops when every request has timed out or gone)."""
        return members[0] if len(members) == 1 else _AnyOf(members)


class _AnyOf(Deadline):
    def __init__(self, members: list[Deadline]) -> None:
        super().__init__(None)
        self.members = list(members)

    def cancel(self) -> None:
        for m in self.members:
            m.cancel()

    @property
    def cancelled(self) -> bool:
        return all(m.cancelled for m in self.members)

    def check(self) -> None:
        first: PFStorerError | None = None
        for m in self.members:
            try:
                m.check()
                return
            except PFStorerError as exc:
                first = first or exc
        if first is not None:
            raise first
