"""fsspec helpers: one way to turn a URL (local path, file://, s3://, memory://) into a filesystem."""

from __future__ import annotations

import contextlib
import functools
import os
from datetime import datetime
from collections.abc import Mapping
from typing import Any

import fsspec


_LOCAL_PROTOCOLS = {"file", "local"}
MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified")
"""Where fsspec implementations put a file's modification time in ``info`` (local, S3, GCS...)."""


@functools.lru_cache(maxsize=8)
def _s3_endpoint_setting(pfstorer_env: tuple[tuple[str, str], ...]) -> str | None:
    """The ``s3_endpoint_url`` setting, loaded once per ``PFSTORER_*`` environment: this runs per
    photo when manifests are probed, and loading Settings costs milliseconds."""
    from pfstorer.settings import Settings

    return Settings.load().s3_endpoint_url


def default_storage_options(url: str) -> dict[str, Any]:
    """Storage options from the environment for ``url``.

    For ``s3://`` URLs: an endpoint from the ``s3_endpoint_url`` setting (``PFSTORER_S3_ENDPOINT_URL``), ``MLFLOW_S3_ENDPOINT_URL``
    or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (e.g. a MinIO or moto server). Credentials come
    from the usual AWS variables through s3fs/botocore. Other protocols: none.
    """
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        pfstorer_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("PFSTORER_")))
        endpoint = _s3_endpoint_setting(pfstorer_env)
        if endpoint:
            return {"endpoint_url": endpoint}
        for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var):
                return {"endpoint_url": os.environ[var]}
    return {}


def is_local_url(url: str) -> bool:
    return fsspec.utils.get_protocol(str(url)) in _LOCAL_PROTOCOLS


def url_to_fs(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; ``storage_options`` apply to remote protocols only.

    ``None`` means :func:`default_storage_options`.
    """
    url = os.fspath(url)
    if is_local_url(url):
        return fsspec.core.url_to_fs(url)
    opts = default_storage_options(url) if storage_options is None else dict(storage_options)
    return fsspec.core.url_to_fs(url, **opts)


def invalidate(fs: fsspec.AbstractFileSystem, path: str | None = None) -> None:
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def join_url(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def modified_time(info: Mapping[str, Any]) -> float | None:
    """A file's modification time (seconds since the epoch) from an fsspec ``info`` entry:
    ``mtime`` on local disks, ``LastModified`` on S3, ``updated`` on GCS; None if absent."""
    for key in MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None
