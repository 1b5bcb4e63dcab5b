"""Names: tenant/identity keys, registered-model names, job keys, adapter file names, hashes.

Torch-free and Ray-free: the one place that says what a safe name is and what an adapter
folder holds, for the pipeline, the server and the model library's users alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec

from pfstorer.adapter_meta import ADAPTER_FILES, METADATA_FILE, TENSORS_FILE
from pfstorer.errors import PFStorerError

ADAPTER_TENSORS, ADAPTER_JSON = TENSORS_FILE, METADATA_FILE  # one definition: pfstorer.adapter_meta
__all__ = ["ADAPTER_FILES", "ADAPTER_JSON", "ADAPTER_TENSORS"]  # re-exported
MODEL_PREFIX = "pfstorer"
DEFAULT_STATE_DIR = ".pfstorer-state"
_CHUNK = 8 * 1024 * 1024

IDENTITY_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENANT_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_safe_key(value: object, kind: str = "identity") -> bool:
    """True if ``value`` can be a path segment, an MLflow name part and a multiplex id part.

    ``kind`` is ``"identity"`` (letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit;
    at most 128 characters; no ``..``) or ``"tenant"`` (the same without ``.``, at most 64).
    """
    if not isinstance(value, str):
        return False
    if kind == "tenant":
        return bool(TENANT_KEY_RE.match(value))
    return bool(IDENTITY_KEY_RE.match(value)) and ".." not in value


def check_key(value: object, kind: str = "identity") -> str:
    """Return ``value`` if :func:`is_safe_key`, else raise :class:`PFStorerError`."""
    if not is_safe_key(value, kind):
        rule = (
            "letters, digits, '_' and '-', starting with a letter or digit, at most 64"
            if kind == "tenant"
            else "letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', "
            "at most 128"
        )
        raise PFStorerError(f"{kind} {value!r} is not a safe key ({rule})")
    return value  # type: ignore[return-value]


def model_key(tenant: str, identity: str) -> str:
    """Serving's multiplexed model id for a person: ``tenant/identity``."""
    return f"{check_key(tenant, 'tenant')}/{check_key(identity)}"


def parse_model_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`model_key`; raises :class:`PFStorerError` for anything else."""
    tenant, sep, identity = (key or "").partition("/")
    if not sep:
        raise PFStorerError(f"model key {key!r} is not 'tenant/identity'")
    return check_key(tenant, "tenant"), check_key(identity)


def model_name(tenant: str, identity: str) -> str:
    """The registered model of one person: ``pfstorer.{tenant}.{identity}``."""
    return f"{MODEL_PREFIX}.{check_key(tenant, 'tenant')}.{check_key(identity)}"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def job_key(rows_sha256s: Iterable[str], base_fingerprint: str, config: Mapping[str, Any]) -> str:
    """Idempotency key of one personalization job (32 hex characters).

    A hash of the person's reference photos (their content sha256s, order-independent: renaming
    or reordering files does not retrain), the base model fingerprint and the training config.
    """
    payload = {
        "refs": sorted(str(s) for s in rows_sha256s),
        "base": str(base_fingerprint),
        "config": dict(config),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:32]


def sha256_file(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 hex of a file's bytes, streamed (local path, or a path on ``fs``)."""
    h = hashlib.sha256()
    opener = fs.open(path, "rb") if fs is not None else open(path, "rb")
    with opener as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
