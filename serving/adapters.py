"""Adapters on a serving replica: index -> verified bytes -> host-RAM LRU -> device slots.

Three tiers, each a cache of the one below:

1. **store** (any fsspec URL): reached through the adapter index (``registry``), read
   into memory and sha256-verified against the index row before anything is parsed; only
   ``adapter.safetensors`` is parsed (no pickle), and its JSON must name the same tenant, identity
   and base fingerprint (``AdapterMismatchError`` otherwise).
2. **host RAM** (:class:`registry.adapter_cache.HostAdapterCache`, shared with batch restore):
   an LRU of verified, parsed CPU tensors keyed by the tensors' sha256 (``serve.host_cache_adapters`` entries), so an adapter evicted from the device
   comes back without touching the store; a new version (new sha256) is simply another key.
3. **device** (``AdapterSlots`` of the base, ``serve.adapter_slots`` slots): fixed buffers;
   loading is an in-place copy into a free slot (:class:`SlotPool`), so the base model never
   changes structure and nothing recompiles. Which person sits in which slot is decided by Ray
   Serve's ``@serve.multiplexed`` LRU (``max_num_models_per_replica = adapter_slots``): its model
   object is a :class:`ResidentAdapter` that gives its slot back when evicted. Serve calls an
   evicted model's ``__del__`` itself and Python may call it again: ``release`` is idempotent.

:class:`AffinityLock` runs one restore at a time per replica (the base model keeps per-call
state, and one device runs one restore at a time anyway) and picks the next waiting request by
identity: the same person as the one just served first, then people already in a device slot,
then the oldest - bounded so nobody waits behind more than ``max_skips`` others. Requests of
one person therefore run back to back and do not thrash the slots.

Nothing here imports Ray: the classes are plain asyncio/threading and are unit-tested alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pfstorer.errors import PFStorerError

log = logging.getLogger(__name__)

__all__ = [
    "NOT_FOUND_MESSAGE",
    "AdapterNotFound",
    "AffinityLock",
    "ResidentAdapter",
    "SlotPool",
]

NOT_FOUND_MESSAGE = "unknown identity"


class AdapterNotFound(PFStorerError):
    """No adapter for this person in the caller's tenant. The message never names anything, so
    "belongs to another tenant" and "does not exist" answer exactly the same."""

    status = 404

    def __init__(self, message: str = NOT_FOUND_MESSAGE) -> None:
        super().__init__(NOT_FOUND_MESSAGE)


# ---------------------------------------------------------------------------------------------
# device tier
# ---------------------------------------------------------------------------------------------


class SlotPool:
    """Free device slot numbers (thread-safe: Serve runs a sync ``__del__`` in a thread)."""

    def __init__(self, n: int) -> None:
        self.size = n
        self._free = list(range(n))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("no free adapter slot (more resident adapters than slots)")
            return self._free.pop(0)

    def give(self, slot: int) -> None:
        with self._lock:
            if slot in self._free:
                raise RuntimeError(f"adapter slot {slot} released twice")
            self._free.append(slot)

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)


@dataclass(eq=False)
class ResidentAdapter:
    """One person's adapter in a device slot: the model object of ``@serve.multiplexed``.

    ``sha256``/``label`` name what the slot holds now (``None`` after a wipe: it must be
    reloaded before use). ``release`` (also ``__del__``) returns the slot once, however often
    it is called - Serve calls ``__del__`` on eviction and the garbage collector may call it
    again.
    """

    key: str
    slot: int
    pool: SlotPool
    sha256: str | None = None
    label: str | None = None
    loaded_at: float = field(default_factory=time.monotonic)
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the slot back; True the first time only."""
        with self._lock:
            if self._released:
                return False
            self._released = True
        self.pool.give(self.slot)
        return True

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # never raise from a finalizer (interpreter shutdown, ...)
            pass


# ---------------------------------------------------------------------------------------------
# grouping by identity
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Waiter:
    key: str
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)
    skips: int = 0


class AffinityLock:
    """One holder at a time; the next holder is chosen by identity affinity.

    Order of preference when the turn passes on: a waiter that has been passed over
    ``max_skips`` times (no starvation), then the oldest waiter for the identity that just ran
    (its adapter is certainly in a slot), then the oldest waiter whose identity is resident
    (``is_resident(key)``; base-only requests, key ``""``, always are), then the oldest waiter.
    """

    def __init__(self, is_resident: Callable[[str], bool] | None = None, max_skips: int = 8) -> None:
        self.is_resident = is_resident or (lambda key: False)
        self.max_skips = max_skips
        self._busy = False
        self._waiters: list[_Waiter] = []
        self._last: str | None = None
        self.granted = 0
        self.reordered = 0  # turns given to someone other than the oldest waiter

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        return self._busy

    def _pick(self) -> _Waiter | None:
        if not self._waiters:
            return None
        head = self._waiters[0]
        chosen = None
        if head.skips < self.max_skips:
            chosen = next((w for w in self._waiters if w.key == self._last), None)
            if chosen is None:
                chosen = next((w for w in self._waiters if w.key == "" or self.is_resident(w.key)), None)
        chosen = chosen or head
        for w in self._waiters:
            if w is chosen:
                break
            w.skips += 1
        if chosen is not head:
            self.reordered += 1
        return chosen

    def _release(self) -> None:
        nxt = self._pick()
        if nxt is None:
            self._busy = False
            return
        self._waiters.remove(nxt)
        nxt.future.set_result(None)  # the turn passes on directly: _busy stays True

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Hold the replica's one turn for a request of ``key`` (``""``: base model only)."""
        if not self._busy and not self._waiters:
            self._busy = True
        else:
            w = _Waiter(key, asyncio.get_running_loop().create_future())
            self._waiters.append(w)
            try:
                await w.future
            except BaseException:
                if w.future.done() and not w.future.cancelled():
                    self._release()  # granted, then cancelled before use: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(w)
                raise
        self._last = key
        self.granted += 1
        try:
            yield
        finally:
            self._release()
