"""The adapter index: (tenant, identity) -> the adapter to serve, a partitioned dataset at a URL.

Serving reads only this, so MLflow stays off the request path. Layout under the index URL::

    <url>/_index.json                                  created once: format and bucket count
    <url>/tenant=<t>/bucket=<hash(identity) % B>/<ts>-<d|c>-<uuid>.parquet

Every write adds small immutable delta files (one per bucket it touches), so an upsert costs
what its batch costs, never what the index holds; a background thread compacts a bucket's deltas
into one file once they pile up. Files appear whole (temp file + rename locally, one PUT on object
stores) and are never changed, so no reader sees a half-written index; a file that vanishes
under a reader (compacted away) makes it list the bucket again. Within a bucket the file that
sorts last wins; a removal is a tombstone row until compaction drops it.

A reader keeps only the rows of the people it was asked about (by bucket, in a bounded LRU
cache) and revalidates a bucket at most every ``max_age_s`` seconds: in the background when ``max_age_s > 0`` (a lookup
answers at once from what it has), at every lookup when it is 0.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from registry.keys import check_key, model_name
from registry.storage import default_storage_options, invalidate, is_local_url, url_to_fs

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("identity", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("base_fingerprint", pa.string()),
        pa.field("job_key", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)
# a delta file's rows: index rows plus a tombstone flag (a removal until compaction drops it)
DELTA_SCHEMA = INDEX_SCHEMA.append(pa.field("removed", pa.bool_(), nullable=False))

META_FILE = "_index.json"
INDEX_FORMAT = "pfstorer-index"
DEFAULT_BUCKETS = 32
_FILE_RE = re.compile(r"^\d{20}-[cd]-[0-9a-f]{12}\.parquet$")


@dataclasses.dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where serving finds a person's current adapter."""

    tenant: str
    identity: str
    version: int
    uri: str
    sha256: str
    base_fingerprint: str | None = None
    job_key: str | None = None
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        """``tenant/identity`` (serving's multiplexed model id)."""
        return f"{self.tenant}/{self.identity}"

    @property
    def model_name(self) -> str:
        return model_name(self.tenant, self.identity)

    @property
    def label(self) -> str:
        """``tenant/identity@version`` (the header serving answers with)."""
        return f"{self.key}@{self.version}"

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        if row["updated_at"] is None:
            row["updated_at"] = datetime.now(UTC)
        return row


def bucket_of(identity: str, buckets: int) -> int:
    """A person's bucket: a stable hash (the same in every process), not Python's ``hash``."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "big") % buckets


def delta_name(ts_ns: int | None = None, kind: str = "d") -> str:
    """A new file's name: sorts by time, so the newest file of a bucket wins."""
    return f"{time.time_ns() if ts_ns is None else ts_ns:020d}-{kind}-{uuid.uuid4().hex[:12]}.parquet"


def delta_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """One delta file's bytes (rows as :meth:`IndexEntry.to_row` plus ``removed``)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=DELTA_SCHEMA), buf)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class _Bucket:
    files: tuple[str, ...]  # file names read, sorted
    rows: dict[str, IndexEntry | None]  # identity -> entry (None: removed)
    checked: float  # time.monotonic() of the listing


class AdapterIndex:
    """(tenant, identity) -> :class:`IndexEntry`, a partitioned dataset of small Parquet files.

    ``max_age_s``: how stale a lookup may be (0: every lookup lists its bucket; more: buckets are
    revalidated in the background, a lookup never waits). ``max_rows``: the cache bound (rows
    of the people a replica was asked about, present or not). ``compact_after``: a bucket with more delta
    files than this is compacted in the background after a write.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        max_age_s: float = 0.0,
        max_rows: int = 100_000,
        compact_after: int = 16,
        buckets: int = DEFAULT_BUCKETS,
    ):
        self.url = os.fspath(url)
        self.storage_options = (
            default_storage_options(self.url) if storage_options is None else dict(storage_options)
        )
        self.fs, self.path = url_to_fs(self.url, self.storage_options)
        self.path = self.path.rstrip("/")
        self.local = is_local_url(self.url)
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        self.compact_after = compact_after
        self._new_buckets = buckets
        self._lock = threading.RLock()
        self._cache: collections.OrderedDict[tuple[str, int], _Bucket] = collections.OrderedDict()
        self._cached_rows = 0
        self._meta: dict[str, Any] | None = None
        self._meta_error: Exception | None = None
        self._meta_checked = float("-inf")
        self._tasks: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._pending: set[tuple[Any, ...]] = set()
        self._worker: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self.stats: collections.Counter[str] = collections.Counter()  # files/rows read and written

    def __repr__(self) -> str:
        return f"AdapterIndex({self.url!r})"

    # -- layout -------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join((self.path, *parts))

    def _bucket_dir(self, tenant: str, bucket: int) -> str:
        return self._join(f"tenant={tenant}", f"bucket={bucket:04d}")

    @property
    def buckets(self) -> int:
        """Buckets per tenant (fixed when the index was created)."""
        meta = self._meta or self._read_meta() or {}
        return int(meta.get("buckets", self._new_buckets))

    def _read_meta(self) -> dict[str, Any] | None:
        """The index's ``_index.json`` (None: no index here yet); raises if unreadable."""
        path = self._join(META_FILE)
        try:
            data = self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError):
            if self.fs.isfile(self.path):
                raise ValueError(f"adapter index {self.url} is a single file from an earlier version, "
                                 "not an index folder: rebuild it with AdapterIndex.import_file") from None
            return None
        except IsADirectoryError as exc:
            raise ValueError(f"adapter index {self.url} is unreadable: {exc}") from exc
        try:
            meta = json.loads(data)
            if meta.get("format") != INDEX_FORMAT or int(meta["buckets"]) < 1:
                raise ValueError(meta)
        except Exception as exc:
            raise ValueError(f"adapter index {self.url} is unreadable: bad {META_FILE}") from exc
        return meta

    def _load_meta(self) -> None:
        invalidate(self.fs, self._join(META_FILE))
        try:
            meta, error = self._read_meta(), None
        except Exception as exc:
            meta, error = None, exc
        with self._lock:
            self._meta, self._meta_error, self._meta_checked = meta, error, time.monotonic()

    def _ensure_meta(self) -> bool:
        """Whether the index exists; raises if its meta is unreadable. With ``max_age_s > 0`` the
        meta is re-read every ``max_age_s`` by a background thread (a probe or a lookup sees a
        damaged or deleted index that soon, without waiting for the read); else at every call."""
        if self._meta_checked == float("-inf") or self.max_age_s <= 0:
            self._load_meta()
        if self.max_age_s > 0 and self._ticker is None:
            with self._lock:
                if self._ticker is None:
                    self._ticker = threading.Thread(target=_tick_meta, args=(weakref.ref(self), self.max_age_s),
                                                    name="adapter-index-meta", daemon=True)
                    self._ticker.start()
        if self._meta_error is not None:
            raise self._meta_error
        return self._meta is not None

    def _create(self) -> dict[str, Any]:
        """Write ``_index.json`` unless there is one; the meta in force."""
        meta = self._read_meta()
        if meta is None:
            meta = {"format": INDEX_FORMAT, "layout": 1, "buckets": self._new_buckets}
            self._put(self._join(META_FILE), json.dumps(meta).encode())
        with self._lock:
            self._meta, self._meta_error, self._meta_checked = meta, None, time.monotonic()
        return meta

    # -- files --------------------------------------------------------------------------------
    def _put(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see all of it or nothing."""
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: an object appears whole
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _list_bucket(self, tenant: str, bucket: int) -> tuple[str, ...]:
        folder = self._bucket_dir(tenant, bucket)
        self.stats["lists"] += 1
        if self.local:
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                return ()
        else:
            invalidate(self.fs, folder)
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
            except FileNotFoundError:
                return ()
        return tuple(sorted(n for n in names if _FILE_RE.match(n)))

    def _read_file(self, path: str) -> dict[str, list[Any]]:
        data = self.fs.cat_file(path)
        cols = pq.read_table(io.BytesIO(data)).to_pydict()
        self.stats["files_read"] += 1
        self.stats["rows_read"] += len(cols.get("identity", ()))
        return cols

    @staticmethod
    def _apply(rows: dict[str, IndexEntry | None], tenant: str, cols: dict[str, list[Any]],
               keep: set[str] | None) -> None:
        n = len(cols.get("identity", ()))
        opt = [cols.get(k) or [None] * n for k in ("base_fingerprint", "job_key", "updated_at", "removed")]
        for i, v, u, h, b, j, at, gone in zip(cols["identity"], cols["version"], cols["uri"], cols["sha256"],
                                              *opt, strict=True):
            if keep is None or i in keep:
                rows[i] = None if gone else IndexEntry(tenant, i, int(v), u, h, b, j, at)

    def _load_bucket(self, tenant: str, bucket: int, old: _Bucket | None = None,
                     want: Iterable[str] | None = None) -> _Bucket:
        """A bucket as stored now, keeping the rows of ``want`` and of ``old`` only (all rows when
        both are None): a replica holds the people it was asked about, not whole buckets. Reads
        only the files added since ``old`` when they sort after its files and it knows every
        person wanted, else all of them. A file that vanished meanwhile (compacted) means
        listing again."""
        keep = None if old is None and want is None else {*(old.rows if old else ()), *(want or ())}
        for attempt in range(30):
            if attempt:
                time.sleep(min(0.05, 0.002 * attempt))  # a compaction is deleting what it merged
            checked = time.monotonic()
            files = self._list_bucket(tenant, bucket)
            known = old is not None and keep is not None and keep <= old.rows.keys()
            if known and files == old.files:
                return _Bucket(old.files, old.rows, checked)
            new = files
            rows: dict[str, IndexEntry | None] = {}
            if known and old.files and set(old.files) <= set(files):
                added = [f for f in files if f not in set(old.files)]
                if added and min(added) > old.files[-1]:
                    new, rows = tuple(added), dict(old.rows)
            else:
                rows = dict.fromkeys(keep or (), None)  # not in any file: known to be absent
            try:
                folder = self._bucket_dir(tenant, bucket)
                for name in new:
                    self._apply(rows, tenant, self._read_file(f"{folder}/{name}"), keep)
            except FileNotFoundError:
                old = None
                continue
            return _Bucket(files, rows, checked)
        raise RuntimeError(f"adapter index {self.url}: bucket {tenant}/{bucket} kept changing while read")

    def _store(self, key: tuple[str, int], b: _Bucket) -> None:
        with self._lock:
            prev = self._cache.pop(key, None)
            if prev is not None:
                self._cached_rows -= len(prev.rows)
            self._cache[key] = b
            self._cached_rows += len(b.rows)
            while self._cached_rows > self.max_rows and len(self._cache) > 1:
                _, gone = self._cache.popitem(last=False)
                self._cached_rows -= len(gone.rows)

    # -- background ---------------------------------------------------------------------------
    def _schedule(self, task: tuple[Any, ...]) -> None:
        with self._lock:
            if task in self._pending:
                return
            self._pending.add(task)
            self._tasks.put(task)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="adapter-index", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """Background refreshes and compactions, one at a time; the thread ends after 30 s idle."""
        while True:
            try:
                task = self._tasks.get(timeout=30.0)
            except queue.Empty:
                with self._lock:
                    if self._tasks.empty():
                        self._worker = None
                        return
                continue
            try:
                if task[0] == "bucket":
                    key = task[1]
                    with self._lock:
                        old = self._cache.get(key)
                    if old is not None:  # evicted meanwhile: nothing to refresh
                        self._store(key, self._load_bucket(*key, old))
                elif task[0] == "compact":
                    self.compact_bucket(*task[1])
            except Exception:
                log.warning("adapter index %s: background %s failed", self.url, task[0], exc_info=True)
            finally:
                with self._lock:
                    self._pending.discard(task)
                self._tasks.task_done()

    def wait_background(self, timeout_s: float = 30.0) -> None:
        """Block until the background refreshes and compactions queued so far are done."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- reading ------------------------------------------------------------------------------
    def get(self, tenant: str, identity: str, *, fresh: bool = False) -> IndexEntry | None:
        """This person's row: from the cache (revalidated at most every ``max_age_s``); only the
        first lookup of a bucket waits for its files. ``fresh`` reads the bucket's new files now,
        for callers off the request path that must not act on a stale row (forgetting)."""
        if not self._ensure_meta():
            return None
        key = (tenant, bucket_of(identity, self.buckets))
        with self._lock:
            b = self._cache.get(key)
            if b is not None:
                self._cache.move_to_end(key)
        if b is None or identity not in b.rows:  # a person not asked about before: read the bucket
            b = self._load_bucket(*key, b, [identity])
            self._store(key, b)
        elif fresh or time.monotonic() - b.checked >= self.max_age_s:
            if fresh or self.max_age_s <= 0:
                b = self._load_bucket(*key, b)
                self._store(key, b)
            else:
                self._schedule(("bucket", key))
        return b.rows.get(identity)

    def refresh(self, force: bool = False) -> bool:
        """Forget what is cached (``force``) or mark it stale, so lookups see the files as they
        are now; True when something was cached."""
        with self._lock:
            had = bool(self._cache)
            if force:
                self._cache.clear()
                self._cached_rows = 0
            else:
                for k, b in self._cache.items():
                    self._cache[k] = _Bucket(b.files, b.rows, float("-inf"))
        self._load_meta()
        return had

    def check(self) -> None:
        """Raise unless the index exists and reads: what readiness probes ask (its meta only,
        re-read at most every ``max_age_s``; no bucket is read)."""
        if not self._ensure_meta():
            raise FileNotFoundError(f"adapter index {self.url} does not exist (no adapter was published yet)")

    def tenants(self) -> list[str]:
        """Tenants with a folder in the index, sorted."""
        if not self._ensure_meta():
            return []
        invalidate(self.fs, self.path)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return sorted(n.removeprefix("tenant=") for n in names if n.startswith("tenant="))

    def list(self, tenant: str | None = None) -> list[IndexEntry]:
        """Entries of one tenant (or all), sorted by (tenant, identity). Reads every bucket of the
        tenant (not through the cache): an administrative call, not a lookup."""
        if not self._ensure_meta():
            return []
        out: list[IndexEntry] = []
        for t in [tenant] if tenant is not None else self.tenants():
            for b in range(self.buckets):
                out.extend(e for e in self._load_bucket(t, b).rows.values() if e is not None)
        return sorted(out, key=lambda e: (e.tenant, e.identity))

    def __len__(self) -> int:
        return len(self.list())

    # -- writing ------------------------------------------------------------------------------
    def _write_rows(self, groups: dict[tuple[str, int], list[dict[str, Any]]]) -> None:
        """One new delta file per bucket, written in parallel; the buckets written are
        then checked for compaction in the background."""

        def one(item: tuple[tuple[str, int], list[dict[str, Any]]]) -> None:
            (tenant, bucket), rows = item
            self._put(f"{self._bucket_dir(tenant, bucket)}/{delta_name()}", delta_bytes(rows))

        items = list(groups.items())
        if len(items) < 2:
            for item in items:
                one(item)
        else:  # PUTs and fsyncs wait on I/O, not on the GIL
            with ThreadPoolExecutor(min(16, len(items))) as pool:
                list(pool.map(one, items))
        self.stats["files_written"] += len(items)
        with self._lock:
            for key in groups:
                gone = self._cache.pop(key, None)
                if gone is not None:
                    self._cached_rows -= len(gone.rows)
        if self.compact_after > 0:
            for key in groups:
                self._schedule(("compact", key))

    def upsert(self, entries: Iterable[IndexEntry]) -> None:
        """Insert or replace the rows of these people: one small file per bucket touched, nothing
        read, so the cost is the batch's, whatever the index holds."""
        new = list(entries)
        for e in new:
            check_key(e.tenant, "tenant")
            check_key(e.identity)
        if not new:
            return
        meta = self._meta if self._meta is not None and self._meta_error is None else self._create()
        groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        for e in new:  # the last row of a person in the batch wins
            groups[(e.tenant, bucket_of(e.identity, int(meta["buckets"])))][e.identity] = e.to_row() | {"removed": False}
        self._write_rows({k: [v[i] for i in sorted(v)] for k, v in groups.items()})

    def remove(self, tenant: str, identity: str) -> bool:
        """Drop a person's row (a tombstone in a new delta file); True if there was one."""
        if not self._ensure_meta():
            return False
        key = (tenant, bucket_of(identity, self.buckets))
        if self._load_bucket(*key).rows.get(identity) is None:
            return False
        tomb = {"tenant": tenant, "identity": identity, "version": 0, "uri": "", "sha256": "",
                "base_fingerprint": None, "job_key": None, "updated_at": datetime.now(UTC), "removed": True}
        self._write_rows({key: [tomb]})
        return True

    def compact_bucket(self, tenant: str, bucket: int, *, min_files: int | None = None) -> bool:
        """Merge a bucket's files into one (when it has more than ``min_files``, default
        ``compact_after``); True if it did. The merged file is written before the old ones are
        deleted and sorts just before the newest of them, so readers never miss a row."""
        files = self._list_bucket(tenant, bucket)
        if len(files) <= (self.compact_after if min_files is None else min_files):
            return False
        try:
            merged = self._load_bucket(tenant, bucket)
        except RuntimeError:
            return False
        if merged.files != files:  # changed meanwhile: next time
            return False
        rows = [e.to_row() | {"removed": False} for _, e in sorted(merged.rows.items()) if e is not None]
        folder = self._bucket_dir(tenant, bucket)
        newest_ts = int(files[-1].split("-", 1)[0])
        self._put(f"{folder}/{delta_name(newest_ts, 'c')}", delta_bytes(rows))
        self.stats["compactions"] += 1
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{folder}/{name}")
        if self.local:  # temp files of writers that died (an hour old: no live write is that slow)
            for name in os.listdir(folder):
                p = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.startswith(".tmp-") and time.time() - os.stat(p).st_mtime > 3600:
                        os.unlink(p)
        return True

    def compact(self, tenant: str | None = None, *, min_files: int = 1) -> int:
        """Compact every bucket of a tenant (or of all) with more than ``min_files`` files."""
        n = 0
        for t in [tenant] if tenant is not None else self.tenants():
            for b in range(self.buckets):
                n += self.compact_bucket(t, b, min_files=min_files)
        return n

    def import_file(self, path: str | os.PathLike[str]) -> int:
        """Upsert every row of a single-file Parquet index (the earlier layout); how many."""
        fs, p = url_to_fs(os.fspath(path), self.storage_options)
        cols = pq.read_table(io.BytesIO(fs.cat_file(p))).to_pydict()
        n = len(cols.get("identity", ()))
        opt = [cols.get(k) or [None] * n for k in ("base_fingerprint", "job_key", "updated_at")]
        self.upsert(IndexEntry(t, i, int(v), u, h, b, j, at) for t, i, v, u, h, b, j, at in zip(
            cols["tenant"], cols["identity"], cols["version"], cols["uri"], cols["sha256"], *opt, strict=True))
        return n


def _tick_meta(ref: weakref.ref[AdapterIndex], every_s: float) -> None:
    """Re-read an index's meta every ``every_s`` seconds for as long as the index object lives."""
    while True:
        time.sleep(every_s)
        index = ref()
        if index is None:
            return
        index._load_meta()
        del index


def write_bulk(url: str | os.PathLike[str], tenant: str, entries: list[IndexEntry], buckets: int = DEFAULT_BUCKETS,
               storage_options: Mapping[str, Any] | None = None) -> int:
    """Write one tenant's rows as one compacted file per bucket (building a large index without
    one upsert per batch: benchmarks, imports). The index must not hold this tenant yet."""
    index = AdapterIndex(url, storage_options, buckets=buckets, compact_after=0)
    meta = index._create()
    groups: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in entries:
        groups[bucket_of(e.identity, int(meta["buckets"]))].append(e.to_row() | {"removed": False})
    for b, rows in groups.items():
        rows.sort(key=lambda r: r["identity"])
        index._put(f"{index._bucket_dir(tenant, b)}/{delta_name(kind='c')}", delta_bytes(rows))
    return len(groups)
