"""Adapters kept in host RAM, for whoever restores many people with one base: serving
replicas (the tier between the store and the device slots) and batch-restore actors.

:class:`HostAdapterCache` is an LRU of verified, parsed adapters keyed by the tensors' sha256, so
a new version of a person is simply another key and an evicted adapter comes back without
touching the store; :class:`LoadStats` counts where loads came from and how long they took.
No torch, no Ray: unit-tested alone.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pfstorer.adapter import Adapter

__all__ = ["HostAdapterCache", "LoadStats"]


class LoadStats:
    """Counters and recent latencies (ms) of adapter loads, by source."""

    def __init__(self, keep: int = 2048) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=keep)
        )

    def record(self, kind: str, ms: float | None = None) -> None:
        with self._lock:
            self.counts[kind] += 1
            if ms is not None:
                self.latencies[kind].append(ms)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"counts": dict(self.counts)}
            for kind, values in self.latencies.items():
                if values:
                    v = np.asarray(values, dtype=np.float64)
                    out[f"{kind}_ms"] = {
                        "n": len(values),
                        "mean": float(v.mean()),
                        "p50": float(np.quantile(v, 0.5)),
                        "p95": float(np.quantile(v, 0.95)),
                        "max": float(v.max()),
                    }
            return out


@dataclass
class _HostEntry:
    adapter: Adapter
    key: str  # tenant/identity
    nbytes: int


class HostAdapterCache:
    """LRU of verified adapters in host RAM, keyed by the tensors' sha256 (thread-safe).

    ``capacity`` 0 keeps nothing (every load reads the store). Concurrent misses of one sha256
    load it once; the others wait for that load.
    """

    def __init__(self, capacity: int, stats: LoadStats | None = None) -> None:
        self.capacity = max(0, int(capacity))
        self.stats = stats or LoadStats()
        self._lru: collections.OrderedDict[str, _HostEntry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._lru

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._lru.values())

    def _lookup(self, sha256: str) -> Adapter | None:
        with self._lock:
            hit = self._lru.get(sha256)
            if hit is not None:
                self._lru.move_to_end(sha256)
                return hit.adapter
        return None

    def get(self, sha256: str, key: str, load: Callable[[], Adapter]) -> tuple[Adapter, str]:
        """The adapter with these tensors; ``load()`` (store read + verify + parse) on a miss.

        Returns ``(adapter, source)`` with source ``"host"`` or ``"store"``.
        """
        t0 = time.perf_counter()
        hit = self._lookup(sha256)
        if hit is not None:
            self.stats.record("host_hit", (time.perf_counter() - t0) * 1e3)
            return hit, "host"
        with self._lock:
            gate = self._loading.setdefault(sha256, threading.Lock())
        with gate:
            hit = self._lookup(sha256)  # loaded by a concurrent miss meanwhile
            if hit is not None:
                self.stats.record("host_hit", (time.perf_counter() - t0) * 1e3)
                return hit, "host"
            try:
                adapter = load()
            finally:
                with self._lock:
                    self._loading.pop(sha256, None)
            self.stats.record("store_read", (time.perf_counter() - t0) * 1e3)
            if self.capacity > 0:
                nbytes = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
                with self._lock:
                    self._lru[sha256] = _HostEntry(adapter, key, nbytes)
                    self._lru.move_to_end(sha256)
                    while len(self._lru) > self.capacity:
                        self._lru.popitem(last=False)
                        self.stats.record("host_evict")
            return adapter, "store"

    def keys(self) -> list[str]:
        """The ``tenant/identity`` keys held (what a sweep must look up)."""
        with self._lock:
            return [e.key for e in self._lru.values()]

    def discard(self, keep: Callable[[str, str], bool]) -> int:
        """Drop every entry for which ``keep(key, sha256)`` is false; return how many."""
        with self._lock:
            gone = [sha for sha, e in self._lru.items() if not keep(e.key, sha)]
            for sha in gone:
                del self._lru[sha]
        return len(gone)
