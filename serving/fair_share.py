"""A fair share of one model among tenants: which request starts, and who computes next.

A replica has one model and runs one forward pass at a time. Served in arrival order, one
tenant's 4096 px photo would hold it for minutes while another tenant's thumbnail waits behind
it. Here the work of different tenants is interleaved instead, tile batch by tile batch:

- :class:`RunQueue` (asyncio) decides which waiting request starts: a tenant has one request
  running at a time (its others wait, in order), different tenants run side by side, and the
  people of running requests never outnumber the device slots (their adapters stay pinned).
- :class:`FairShare` (threads) decides which running request computes: each runs in its own
  thread and passes through :meth:`Lease.check` before every tile batch (where a restore checks
  its deadline). There the model goes to the waiting tenant that has used the least model time.
  Usage is measured (seconds holding the model), so a request is charged what it really costs
  - its pixels x steps - and no declared size can game it. A tenant that was idle comes back
  with at most ``credit_s`` seconds of advance over the least-served busy tenant (start-time fair
  queuing with bounded credit, as an OS scheduler treats a task that wakes up): a small request
  runs to its end at once, and nobody banks idle time to monopolise the model later.

Nothing here imports Ray or torch: unit-tested alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FairShare", "Lease", "ModelThreads", "RunQueue"]

_WAKE_S = 0.2  # how often a waiting thread looks at its deadline


class FairShare:
    """One model, many threads: who holds it, chosen by the least model time used per tenant."""

    def __init__(self, credit_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.credit_s = credit_s
        self._clock = clock
        self._cond = threading.Condition()
        self._used: dict[str, float] = {}  # model seconds per tenant (its virtual time)
        self._active: collections.Counter[str] = collections.Counter()  # leases per tenant
        self._waiting: list[Lease] = []
        self._holder: Lease | None = None
        self._since = 0.0  # when the holder got the model
        self._seq = itertools.count()
        self.handovers = 0  # times a request gave the model up between tile batches

    def lease(self, tenants: Iterable[str], deadline: Any = None) -> Lease:
        """A claim on the model for work of ``tenants`` (use it as a context manager);
        ``deadline`` (anything with ``check()``) is also checked while the claim waits."""
        return Lease(self, tuple(sorted(set(tenants))) or ("",), deadline)

    def usage(self, tenants: Iterable[str]) -> float:
        """Mean model seconds used by ``tenants`` (the order in which their work is served)."""
        with self._cond:
            return self._vt(tuple(tenants) or ("",))

    # -- under self._cond -------------------------------------------------------------------------
    def _vt(self, tenants: tuple[str, ...]) -> float:
        return sum(self._used.get(t, 0.0) for t in tenants) / len(tenants)

    def _floor(self, exclude: tuple[str, ...]) -> float | None:
        busy = [self._used.get(t, 0.0) for t in self._active if t not in exclude]
        return min(busy) if busy else None

    def _join(self, lease: Lease) -> None:
        for t in lease.tenants:
            if not self._active[t]:  # back from idle: at most credit_s ahead of the busy ones
                floor = self._floor(lease.tenants)
                if floor is not None:
                    self._used[t] = max(self._used.get(t, 0.0), floor - self.credit_s)
            self._active[t] += 1

    def _leave(self, lease: Lease) -> None:
        for t in lease.tenants:
            self._active[t] -= 1
            if self._active[t] <= 0:
                del self._active[t]
        if not self._active:
            self._used.clear()  # nobody busy: everybody starts equal again
            return
        floor = self._floor(())
        assert floor is not None
        for t in [t for t, u in self._used.items() if t not in self._active and u <= floor - self.credit_s]:
            del self._used[t]  # it would come back clamped anyway: forget it (memory stays bounded)

    def _charge(self) -> None:
        now = self._clock()
        if self._holder is not None:
            share = (now - self._since) / len(self._holder.tenants)
            for t in self._holder.tenants:
                self._used[t] = self._used.get(t, 0.0) + share
        self._since = now

    def _grant_next(self) -> None:
        self._holder = None
        if self._waiting:
            nxt = min(self._waiting, key=lambda w: (self._vt(w.tenants), w.seq))
            self._waiting.remove(nxt)
            self._holder = nxt
            self._since = self._clock()
            self._cond.notify_all()

    def _wait_for_model(self, lease: Lease) -> None:
        lease.seq = next(self._seq)
        if self._holder is None and not self._waiting:
            self._holder, self._since = lease, self._clock()
            return
        self._waiting.append(lease)
        if self._holder is None:
            self._grant_next()
        try:
            while self._holder is not lease:
                self._cond.wait(_WAKE_S)
                if lease.deadline is not None and self._holder is not lease:
                    lease.deadline.check()
        except BaseException:
            if self._holder is lease:
                self._grant_next()
            else:
                self._waiting.remove(lease)
            raise


@dataclass(eq=False)
class Lease:
    """One piece of work's claim on the model; :meth:`check` is its point of handing over."""

    share: FairShare
    tenants: tuple[str, ...]
    deadline: Any = None
    seq: int = 0
    _held: bool = field(default=False, repr=False)

    def __enter__(self) -> Lease:
        s = self.share
        with s._cond:
            s._join(self)
            try:
                s._wait_for_model(self)
            except BaseException:
                s._leave(self)
                raise
        self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        s = self.share
        with s._cond:
            if self._held:
                s._charge()
                s._grant_next()
                self._held = False
            s._leave(self)

    def check(self) -> None:
        """Between tile batches: stop if the deadline says so; hand the model to a tenant that
        has used less of it, and wait for it back."""
        if self.deadline is not None:
            self.deadline.check()
        s = self.share
        with s._cond:
            s._charge()
            if not s._waiting or min(s._vt(w.tenants) for w in s._waiting) >= s._vt(self.tenants):
                return
            s.handovers += 1
            self._held = False
            s._grant_next()
            s._wait_for_model(self)
            self._held = True


@dataclass(eq=False)
class _Ticket:
    tenants: frozenset[str]
    people: frozenset[str]
    seq: int
    future: asyncio.Future[None]


class RunQueue:
    """Which waiting request starts: one running request per tenant, people within the slots.

    A tenant's requests start in arrival order, one after another; requests of different
    tenants run side by side (their tile batches interleaved by :class:`FairShare`). A request
    starts only if the people of all running requests, its own included, fit in ``slots``
    device slots (base-only requests, person ``""``, need none). When several could start, the
    one whose tenants used the least model time goes first, then the oldest.
    """

    def __init__(self, share: FairShare, slots: int) -> None:
        self.share = share
        self.slots = slots
        self._tenants: collections.Counter[str] = collections.Counter()  # running requests
        self._people: collections.Counter[str] = collections.Counter()  # their people
        self._waiting: list[_Ticket] = []
        self._seq = itertools.count()

    @property
    def people(self) -> frozenset[str]:
        """People of the running requests: their adapters must stay in their slots."""
        return frozenset(self._people)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(self._tenants.values())

    def _fits(self, t: _Ticket) -> bool:
        if any(self._tenants[x] for x in t.tenants):
            return False
        return len(set(self._people) | t.people) <= self.slots

    def _take(self, t: _Ticket, delta: int) -> None:
        for x in t.tenants:
            self._tenants[x] += delta
        for p in t.people:
            self._people[p] += delta
        self._tenants = +self._tenants  # drop zero counts
        self._people = +self._people

    def _dispatch(self) -> None:
        for t in sorted(self._waiting, key=lambda t: (self.share.usage(t.tenants), t.seq)):
            if self._fits(t):
                self._waiting.remove(t)
                self._take(t, +1)
                t.future.set_result(None)

    @contextlib.asynccontextmanager
    async def start(self, tenants: Iterable[str], people: Iterable[str]) -> AsyncIterator[None]:
        """Wait until this request may run; it runs inside the ``async with``."""
        ticket = _Ticket(frozenset(tenants) or frozenset({""}), frozenset(p for p in people if p),
                         next(self._seq), asyncio.get_running_loop().create_future())
        if len(ticket.people) > self.slots:
            raise ValueError(f"{len(ticket.people)} people cannot run at once on {self.slots} slots")
        self._waiting.append(ticket)
        self._dispatch()
        try:
            await ticket.future
        except BaseException:
            if ticket.future.done() and not ticket.future.cancelled():
                self._take(ticket, -1)  # started, then cancelled before running
                self._dispatch()
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(ticket)
            raise
        try:
            yield
        finally:
            self._take(ticket, -1)
            self._dispatch()


class ModelThreads:
    """Work on the model, each piece in its own thread holding a :class:`Lease` of the fair share."""

    def __init__(self, share: FairShare, threads: int) -> None:
        self.share = share
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="pfstorer-torch")

    async def run(self, fn: Callable[[Lease], Any], tenants: Iterable[str], deadline: Any = None) -> Any:
        """``fn(lease)`` in a model thread holding the model for ``tenants`` (the lease is the work's
        checkpoint between tile batches). If the caller is cancelled, cancel ``deadline`` (the work
        stops at its next tile batch) and still wait for the thread, so nothing outlives the request
        that started it."""

        def work() -> Any:
            with self.share.lease(tenants, deadline) as lease:
                return fn(lease)

        fut = asyncio.get_running_loop().run_in_executor(self._pool, work)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if deadline is not None:
                deadline.cancel()
            with contextlib.suppress(BaseException):
                await fut
            raise
