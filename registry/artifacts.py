"""The artifact store: adapter files under ``{store}/{tenant}/{identity}/{job_key}/``.

Uploads go to a temporary key, are read back and sha256-verified, and only then moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from pfstorer.errors import AdapterError, PFStorerError
from registry.keys import ADAPTER_FILES, ADAPTER_JSON, ADAPTER_TENSORS, JOB_KEY_RE, check_key, sha256_file
from registry.storage import default_storage_options, invalidate, is_local_url, join_url, modified_time, url_to_fs


def adapter_tags(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage an adapter's own metadata gives its registered version (base, config, losses)."""
    return {
        "base_fingerprint": meta.get("base_fingerprint"),
        "format_version": meta.get("format_version"),
        "config": meta.get("config"),
        "metrics": meta.get("final_losses"),
        "steps": meta.get("steps"),
    }


def read_adapter_meta(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``adapter.json`` of a local adapter directory (raises :class:`AdapterError`)."""
    d = Path(local_dir)
    for name in ADAPTER_FILES:
        if not (d / name).is_file():
            raise AdapterError(f"adapter directory {d} has no {name}")
    try:
        meta = json.loads((d / ADAPTER_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{d / ADAPTER_JSON} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"{d / ADAPTER_JSON} is not a JSON object")
    return meta


class ArtifactStore:
    """Adapter files under an fsspec URL (local directory, ``file://``, ``s3://``, ...).

    Layout: ``{url}/{tenant}/{identity}/{job_key}/adapter.safetensors|adapter.json``. Temporary
    uploads live at ``{url}/{tenant}/{identity}/.tmp-{job_key}-{random}/`` and are removed on
    failure; those of a killed uploader are removed by the next upload of that person once
    older than :attr:`STALE_UPLOAD_S`.
    """

    STALE_UPLOAD_S = 3600.0
    """A temporary upload untouched this long belongs to a dead uploader (a live one takes seconds)."""

    def __init__(
        self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ):
        self.url = os.fspath(url)
        self.storage_options = (
            default_storage_options(self.url) if storage_options is None else dict(storage_options)
        )
        self.fs, self.root = url_to_fs(self.url, self.storage_options)
        self.local = is_local_url(self.url)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # -- paths -------------------------------------------------------------------------------
    def _identity_path(self, tenant: str, identity: str) -> str:
        return join_url(self.root, check_key(tenant, "tenant"), check_key(identity))

    def _job_path(self, tenant: str, identity: str, job_key: str) -> str:
        if not JOB_KEY_RE.match(job_key or ""):
            raise PFStorerError(f"job key {job_key!r} is not a safe key")
        return join_url(self._identity_path(tenant, identity), job_key)

    def uri_of(self, tenant: str, identity: str, job_key: str) -> str:
        """The URI an adapter of this job has (or would have) in the store."""
        return self.fs.unstrip_protocol(self._job_path(tenant, identity, job_key))

    # -- write -------------------------------------------------------------------------------
    def _upload(self, local_path: Path, remote_path: str) -> None:
        """Copy one file into the store (one place, so tests can inject a faulty transport)."""
        self.fs.put_file(str(local_path), remote_path)

    def put_adapter(
        self, local_dir: str | os.PathLike[str], tenant: str, identity: str, job_key: str
    ) -> tuple[str, str]:
        """Upload an adapter directory; return ``(uri, sha256 of adapter.safetensors)``.

        The local tensors' hash must match ``tensors_sha256`` in ``adapter.json`` when present;
        both files are written to a temporary key, read back and compared, and only then moved to
        ``uri``. Any mismatch raises :class:`AdapterError` and leaves nothing at ``uri``.
        """
        local = Path(local_dir)
        meta = read_adapter_meta(local)
        final = self._job_path(tenant, identity, job_key)
        sha = sha256_file(local / ADAPTER_TENSORS)
        declared = meta.get("tensors_sha256")
        if declared is not None and declared != sha:
            raise AdapterError(
                f"adapter {local} is corrupt: adapter.safetensors has sha256 {sha[:12]}..., "
                f"adapter.json says {str(declared)[:12]}..."
            )
        json_sha = sha256_file(local / ADAPTER_JSON)
        self.sweep_uploads(tenant, identity)
        tmp = join_url(
            self._identity_path(tenant, identity), f".tmp-{job_key}-{uuid.uuid4().hex[:12]}"
        )
        try:
            if self.local:
                self.fs.makedirs(tmp, exist_ok=True)
            for name in ADAPTER_FILES:
                self._upload(local / name, join_url(tmp, name))
            invalidate(self.fs, tmp)
            for name, want in ((ADAPTER_TENSORS, sha), (ADAPTER_JSON, json_sha)):
                got = sha256_file(join_url(tmp, name), self.fs)
                if got != want:
                    raise AdapterError(
                        f"upload of {name} to {self.fs.unstrip_protocol(tmp)} is corrupt: "
                        f"sha256 {got[:12]}... != {want[:12]}..."
                    )
            self._move_into_place(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp, recursive=True)
            raise
        # the move kept the bytes: the sizes must agree (a cheap check, no second download)
        invalidate(self.fs, final)
        size = self.fs.size(join_url(final, ADAPTER_TENSORS))
        if size != (local / ADAPTER_TENSORS).stat().st_size:
            raise AdapterError(f"adapter at {self.fs.unstrip_protocol(final)} has the wrong size")
        return self.fs.unstrip_protocol(final), sha

    def sweep_uploads(self, tenant: str, identity: str, older_than_s: float | None = None) -> int:
        """Remove this person's temporary uploads whose newest file is older than ``older_than_s``
        (default :attr:`STALE_UPLOAD_S`): what a killed uploader left behind. Returns how many."""
        limit = self.STALE_UPLOAD_S if older_than_s is None else older_than_s
        root = self._identity_path(tenant, identity)
        try:
            entries = self.fs.ls(root, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        removed = 0
        now = time.time()
        for entry in entries:
            name = entry["name"].rstrip("/")
            if not name.rsplit("/", 1)[-1].startswith(".tmp-"):
                continue
            files = self.fs.find(name, detail=True).values() or [entry]
            times = [modified_time(f) for f in files]
            if any(t is None or now - t < limit for t in times):
                continue  # still being written, or its age cannot be told: keep it
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(name, recursive=True)
                removed += 1
        return removed

    def _move_into_place(self, tmp: str, final: str) -> None:
        invalidate(self.fs)
        if self.local:
            # a directory rename is atomic on one filesystem; a leftover from a crashed run that
            # was never registered (same job key) is replaced.
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            return
        # object stores: per-file server-side copy, JSON last (its presence marks completeness)
        for name in ADAPTER_FILES:
            self.fs.copy(join_url(tmp, name), join_url(final, name))
        self.fs.rm(tmp, recursive=True)

    # -- read --------------------------------------------------------------------------------
    def fetch_adapter(
        self, uri: str, dest_dir: str | os.PathLike[str], expected_sha256: str
    ) -> Path:
        """Download the adapter at ``uri`` into ``dest_dir`` and verify its sha256.

        Files are written beside ``dest_dir`` first and renamed into place only after the
        tensors' sha256 equals ``expected_sha256`` (and ``adapter.json`` agrees); otherwise
        :class:`AdapterError` is raised and nothing is left behind.
        """
        dest = Path(dest_dir)
        opts = self.storage_options if not is_local_url(uri) else None
        fs, root = url_to_fs(uri, opts)
        invalidate(fs, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for name in ADAPTER_FILES:
                try:
                    fs.get_file(join_url(root, name), str(tmp / name))
                except FileNotFoundError as exc:
                    raise AdapterError(f"adapter at {uri} has no {name}") from exc
            got = sha256_file(tmp / ADAPTER_TENSORS)
            if got != expected_sha256:
                raise AdapterError(
                    f"adapter at {uri} fails verification: sha256 {got[:12]}... "
                    f"!= expected {str(expected_sha256)[:12]}..."
                )
            declared = read_adapter_meta(tmp).get("tensors_sha256")
            if declared is not None and declared != got:
                raise AdapterError(f"adapter at {uri}: adapter.json disagrees with its tensors")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def read_adapter(self, uri: str, expected_sha256: str) -> tuple[bytes, dict[str, Any]]:
        """The adapter at ``uri`` in memory: ``(safetensors bytes, adapter.json dict)``, verified
        against ``expected_sha256`` (for a host-RAM cache that never touches local disk)."""
        opts = self.storage_options if not is_local_url(uri) else None
        fs, root = url_to_fs(uri, opts)
        invalidate(fs, root)
        try:
            data = fs.cat_file(join_url(root, ADAPTER_TENSORS))
            meta = json.loads(fs.cat_file(join_url(root, ADAPTER_JSON)))
        except FileNotFoundError as exc:
            raise AdapterError(f"adapter at {uri} is missing a file") from exc
        except ValueError as exc:
            raise AdapterError(f"adapter at {uri} has an unreadable adapter.json") from exc
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise AdapterError(
                f"adapter at {uri} fails verification: sha256 {got[:12]}... "
                f"!= expected {str(expected_sha256)[:12]}..."
            )
        if meta.get("tensors_sha256") not in (None, got):
            raise AdapterError(f"adapter at {uri}: adapter.json disagrees with its tensors")
        return data, meta

    # -- delete / inspect ----------------------------------------------------------------------
    def exists(self, tenant: str, identity: str, job_key: str | None = None) -> bool:
        """Whether anything is stored for the person (or the complete adapter of one job)."""
        path = (
            join_url(self._job_path(tenant, identity, job_key), ADAPTER_JSON)
            if job_key
            else self._identity_path(tenant, identity)
        )
        invalidate(self.fs)
        return bool(self.fs.exists(path))

    def list_files(self, tenant: str | None = None, identity: str | None = None) -> list[str]:
        """URIs of every stored file (of a tenant, or of one person)."""
        path = self.root
        if tenant is not None:
            path = join_url(path, check_key(tenant, "tenant"))
            if identity is not None:
                path = join_url(path, check_key(identity))
        invalidate(self.fs)
        if not self.fs.exists(path):
            return []
        return sorted(self.fs.unstrip_protocol(p) for p in self.fs.find(path))

    def delete_identity(self, tenant: str, identity: str) -> int:
        """Remove every file of one person (all jobs, leftovers); return how many were removed."""
        path = self._identity_path(tenant, identity)
        invalidate(self.fs)
        if not self.fs.exists(path):
            return 0
        n = len(self.fs.find(path))
        self.fs.rm(path, recursive=True)
        invalidate(self.fs)
        return n
