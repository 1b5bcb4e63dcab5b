"""The people whose adapters a replica holds: index entry -> verified tensors in host RAM -> a
device slot (the tiers of :mod:`serving.adapters`), and forgetting those who left the index.

Which person sits in which device slot is Ray Serve's ``@serve.multiplexed`` LRU: the
``Restorer`` deployment owns that getter (Serve finds it on the deployment) and binds it here
with :meth:`ResidentAdapters.bind`; its loader is :meth:`ResidentAdapters.load`. The host-RAM tier
is :class:`registry.adapter_cache.HostAdapterCache`, the same one batch restore uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pfstorer.errors import AdapterMismatchError, PFStorerError
from pfstorer.model import RestorationModel
from pfstorer.personalization import AdapterSlots
from pfstorer.settings import Settings
from registry.adapter_cache import HostAdapterCache, LoadStats
from serving.adapters import AdapterNotFound, AffinityLock, ResidentAdapter, SlotPool
from serving.metrics import AdapterMetrics
from serving.serve_compat import announce_loaded_models, loaded_models

log = logging.getLogger("ray.serve")

__all__ = ["ResidentAdapters"]

OnModel = Callable[[Callable[[Any], Any], list[str]], Awaitable[Any]]
IoCall = Callable[..., Awaitable[Any]]


class ResidentAdapters:
    """Device slots (``serve.adapter_slots`` people plus one that stays zero: the base model
    exactly, for base-only rows of a batch with people), the host-RAM cache and their counters."""

    def __init__(self, settings: Settings, model: RestorationModel, registry: Any, *,
                 on_model: OnModel, io: IoCall) -> None:
        s = settings.serve
        self.settings = settings
        self.model = model
        self.fingerprint = model.fingerprint
        self.registry = registry  # read-only: MLflow stays off the request path
        self.slots = AdapterSlots.for_model(model, s.adapter_slots + 1)
        self.base_slot = s.adapter_slots  # never loaded: always zero
        self.pool = SlotPool(s.adapter_slots)
        self.stats = LoadStats()
        self.metrics = AdapterMetrics()
        self.host = HostAdapterCache(s.host_cache_adapters, self.stats)
        self.turns = AffinityLock(self.is_resident, max_skips=max(4, 2 * s.adapter_slots))
        self.forgotten = {"host": 0, "device": 0}  # adapters dropped because they left the index
        self._on_model = on_model  # slot copies run as their tenant's model work
        self._io = io
        self._fetched: dict[str, tuple[str, float]] = {}  # key -> (source, ms) of this turn's read
        self._loader: Callable[[str], Awaitable[ResidentAdapter]] | None = None
        self._get: Callable[[str], Awaitable[ResidentAdapter]] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def bind(self, loader: Callable[[str], Awaitable[ResidentAdapter]],
             get: Callable[[str], Awaitable[ResidentAdapter]]) -> None:
        """The deployment's multiplexed ``get`` and the ``loader`` it wraps (which calls :meth:`load`)."""
        self._loader, self._get = loader, get

    # -- who is where ---------------------------------------------------------------------------
    def resident(self) -> dict[str, Any]:
        """The people in device slots (the multiplexed loader's LRU; empty before the first)."""
        return loaded_models(self._loader) or {}

    def is_resident(self, key: str) -> bool:
        return key in self.resident()

    def entry(self, key: str) -> Any:
        """The person's current index entry, refused when unknown or trained on another base."""
        from registry import parse_model_key

        try:
            tenant, identity = parse_model_key(key)
        except PFStorerError:
            raise AdapterNotFound() from None
        entry = self.registry.resolve(tenant, identity)
        if entry is None:
            raise AdapterNotFound()
        if entry.base_fingerprint and entry.base_fingerprint != self.fingerprint:
            raise AdapterMismatchError(
                f"the adapter of {entry.label} was trained on base {entry.base_fingerprint}, "
                f"but this server runs base {self.fingerprint} ({self.model.config.name})"
            )
        return entry

    def _verified(self, entry: Any) -> tuple[Any, str]:
        """Host-RAM tier lookup; a miss reads the store (sha256-verified, safetensors only)."""
        return self.host.get(entry.sha256, entry.key, lambda: self.registry.load_adapter(entry, self.model))

    async def prefetch(self, key: str) -> Any:
        """The person's entry, with its tensors warmed into host RAM (outside the replica's turn)."""
        entry = await self._io(self.entry, key)
        t0 = time.perf_counter()
        _, source = await self._io(self._verified, entry)
        if source == "store":
            self._fetched[key] = (source, (time.perf_counter() - t0) * 1e3)
        return entry

    # -- into a slot ----------------------------------------------------------------------------
    async def _copy(self, slot: int, tensors: Any, key: str) -> None:
        """Copy an adapter into a device slot (on the model, as its tenant's work)."""
        await self._on_model(lambda _: self.slots.load(slot, tensors), [key.split("/", 1)[0]])

    def _record_copy(self, key: str, t0: float) -> None:
        """Count a copy into a device slot as cold (this request read the adapter from the
        store) or warm (from host RAM); the time includes that read."""
        source, fetch_ms = self._fetched.pop(key, ("host", 0.0))
        kind = "store" if source == "store" else "host"
        ms = fetch_ms + (time.perf_counter() - t0) * 1e3
        self.stats.record(f"load_from_{kind}", ms)
        self.metrics.record(key, kind, ms / 1e3)

    async def load(self, key: str) -> ResidentAdapter:
        """The multiplexed loader's work: person -> a free device slot (in-place copy)."""
        t0 = time.perf_counter()
        entry = await self._io(self.entry, key)
        adapter, _ = await self._io(self._verified, entry)
        slot = self.pool.take()
        try:
            await self._copy(slot, adapter.tensors, key)
        except BaseException:
            self.pool.give(slot)
            raise
        self._record_copy(key, t0)
        return ResidentAdapter(key=key, slot=slot, pool=self.pool, sha256=entry.sha256, label=entry.label)

    async def touch(self, key: str) -> None:
        """Make a resident person the most recently used (nothing is loaded)."""
        if self.is_resident(key):
            await self._get(key)

    async def acquire(self, key: str, entry: Any) -> ResidentAdapter:
        """The person's adapter in a device slot, at ``entry``'s version (called holding the turn)."""
        for _ in range(3):
            was_resident = self.is_resident(key)
            resident: ResidentAdapter = await self._get(key)  # LRU: may evict and load
            if resident.released:  # evicted under us (not expected while holding the turn)
                continue
            if resident.sha256 != entry.sha256:  # new version published, or wiped by the sweeper
                t0 = time.perf_counter()
                adapter, _ = await self._io(self._verified, entry)
                await self._copy(resident.slot, adapter.tensors, key)
                resident.sha256, resident.label = entry.sha256, entry.label
                self._record_copy(key, t0)
            elif was_resident:
                self._fetched.pop(key, None)
                self.stats.record("device_hit")
                self.metrics.record(key, "device")
            self.metrics.holding(len(self.resident()), self.host.nbytes)
            return resident
        raise RuntimeError(f"could not keep an adapter slot for {key}")

    # -- forgetting (faces are biometric data) ----------------------------------------------------
    def ensure_sweeper(self, running: Callable[[], frozenset[str]]) -> None:
        """Start the periodic :meth:`sweep` (once, on the replica's event loop)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(running))

    async def _sweep_forever(self, running: Callable[[], frozenset[str]]) -> None:
        while True:
            await asyncio.sleep(self.settings.serve.sweep_interval_s)
            try:
                await self.sweep(running)
            except Exception:
                log.exception("adapter sweep failed")

    def _current(self, keys: set[str]) -> dict[str, str]:
        """``tenant/identity`` -> sha256 in the index now, for the people this replica holds only
        (lookups by key, their buckets re-read: a replica never reads whole tenants)."""
        out = {}
        for key in keys:
            tenant, _, identity = key.partition("/")
            entry = self.registry.index.get(tenant, identity, fresh=True)
            if entry is not None:
                out[key] = entry.sha256
        return out

    async def sweep(self, running: Callable[[], frozenset[str]] = frozenset) -> dict[str, int]:
        """Drop adapters whose person left the index (forgotten) from host RAM and device slots
        (slot tensors zeroed), except the people of requests ``running()`` once the sweep holds
        the turn (wiped at the next sweep, once they have ended); returns counts."""
        held = set(self.host.keys()) | set(self.resident())
        current = await self._io(self._current, held)
        host = self.host.discard(lambda key, sha: current.get(key) == sha)
        wiped = 0
        resident = self.resident()
        if any(k not in current for k in list(resident)):
            async with self.turns.turn(""):
                busy = running()
                for key in [k for k in list(resident) if k not in current and k not in busy]:
                    adapter = resident.pop(key, None)
                    if adapter is None:
                        continue
                    slot = adapter.slot
                    await self._on_model(lambda _, slot=slot: self.slots.clear(slot), [""])
                    adapter.sha256 = adapter.label = None
                    adapter.release()
                    wiped += 1
                announce_loaded_models(self._loader)
        self.forgotten["host"] += host
        self.forgotten["device"] += wiped
        return {"host": host, "device": wiped}
