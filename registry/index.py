"""The adapter index: one Parquet file at a URL, (tenant, identity) -> the adapter to serve.

Serving reads only this, so MLflow stays off the request path. Writes replace the file
atomically; readers notice a change by its size/mtime/ETag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from registry.keys import check_key, model_name
from registry.storage import invalidate, default_storage_options, is_local_url, url_to_fs


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


@dataclasses.dataclass(frozen=True)
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


_UNREAD = object()  # an index whose file was never read


class AdapterIndex:
    """(tenant, identity) -> :class:`IndexEntry`, one Parquet file at a URL.

    Reads are served from memory; before each read the file's signature (size + mtime/inode on
    local disks, ETag/LastModified on object stores) is checked - at most every ``max_age_s``
    seconds - and the file re-read when it changed, so a long-running server sees new adapters.
    Writes re-read, merge and replace the whole file atomically (temp file + rename locally, a
    single PUT on object stores); local writers also take a file lock.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        max_age_s: float = 0.0,
    ):
        self.url = os.fspath(url)
        self.storage_options = (
            default_storage_options(self.url) if storage_options is None else dict(storage_options)
        )
        self.fs, self.path = url_to_fs(self.url, self.storage_options)
        self.local = is_local_url(self.url)
        self.max_age_s = max_age_s
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()  # one thread parses the file at a time
        self._entries: dict[tuple[str, str], IndexEntry] = {}
        self._sig: object = _UNREAD
        self._error: Exception | None = None  # why the last read failed, until one succeeds
        self._checked_at = float("-inf")

    def __repr__(self) -> str:
        return f"AdapterIndex({self.url!r})"

    # -- reading ------------------------------------------------------------------------------
    def _signature(self) -> object:
        invalidate(self.fs, self.path)
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        return tuple(
            str(info.get(k))
            for k in ("size", "mtime", "ino", "ETag", "LastModified", "created")
            if info.get(k) is not None
        )

    def _read(self) -> dict[tuple[str, str], IndexEntry]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return {}
        cols = pq.read_table(io.BytesIO(data)).to_pydict()  # columns, not a dict per row
        n = len(cols.get("tenant", ()))
        optional = [cols.get(k) or [None] * n for k in ("base_fingerprint", "job_key", "updated_at")]
        return {
            (t, i): IndexEntry(t, i, int(v), u, h, b, j, at)
            for t, i, v, u, h, b, j, at in zip(
                cols["tenant"], cols["identity"], cols["version"], cols["uri"], cols["sha256"], *optional,
                strict=True,
            )
        }

    def refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed (checked at most every ``max_age_s`` unless ``force``);
        True if the entries were reloaded.

        The file is parsed outside the lock lookups take, and the new entries replace the old
        ones in one assignment: a lookup never waits for a parse. While one thread parses, the
        others answer from the entries they have (only the very first read is waited for).
        """
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < self.max_age_s:
                return False
            self._checked_at = now
        if not self._reload_lock.acquire(blocking=force or self._sig is _UNREAD):
            return False
        try:
            sig = self._signature()
            if not force and sig == self._sig and self._error is None:
                return False
            try:
                entries = self._read() if sig is not None else {}
            except Exception as exc:
                self._error = exc
                raise
            with self._lock:
                self._entries, self._sig, self._error = entries, sig, None
            return True
        finally:
            self._reload_lock.release()

    def check(self) -> None:
        """Raise unless the index exists and its last read succeeded: what readiness probes ask.

        Costs what a lookup costs (a signature check at most every ``max_age_s``; the file is
        parsed again only if it changed), never a forced reload.
        """
        self.refresh()
        if self._error is not None:
            raise self._error
        if self._sig is None or self._sig is _UNREAD:
            raise FileNotFoundError(f"adapter index {self.url} does not exist (no adapter was published yet)")

    def get(self, tenant: str, identity: str) -> IndexEntry | None:
        self.refresh()
        return self._entries.get((tenant, identity))

    def list(self, tenant: str | None = None) -> list[IndexEntry]:
        """Entries of one tenant (or all), sorted by (tenant, identity)."""
        self.refresh()
        return [e for k, e in sorted(self._entries.items()) if tenant is None or k[0] == tenant]

    def __len__(self) -> int:
        self.refresh()
        return len(self._entries)

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock:
            if not self.local:
                yield
                return
            import fcntl

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.path}.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, entries: dict[tuple[str, str], IndexEntry]) -> None:
        rows = [entries[k].to_row() for k in sorted(entries)]
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        if self.local:
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(self.path, data)  # one PUT: readers see the old or the new file
        self._entries, self._sig, self._error = entries, self._signature(), None
        self._checked_at = time.monotonic()

    def _modify(self, fn: Callable[[dict[tuple[str, str], IndexEntry]], bool]) -> bool:
        with self._write_lock():
            entries = dict(self._read()) if self._signature() is not None else {}
            changed = fn(entries)
            if changed:
                self._write(entries)
            else:
                self._entries, self._sig, self._error = entries, self._signature(), None
            return changed

    def upsert(self, entries: Iterable[IndexEntry]) -> None:
        """Insert or replace the rows of these people."""
        new = list(entries)
        for e in new:
            check_key(e.tenant, "tenant")
            check_key(e.identity)

        def apply(cur: dict[tuple[str, str], IndexEntry]) -> bool:
            for e in new:
                cur[(e.tenant, e.identity)] = e
            return bool(new)

        self._modify(apply)

    def remove(self, tenant: str, identity: str) -> bool:
        """Drop a person's row; True if there was one."""
        return self._modify(lambda cur: cur.pop((tenant, identity), None) is not None)
