"""API keys of the HTTP API: each key belongs to one tenant; only sha256 hashes are stored.

A caller sends its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The server
hashes it (sha256) and looks the hash up; no key, or an unknown one, answers 401. A tenant's key
reaches that tenant's adapters only (``serving.app`` resolves identities inside the caller's
tenant; another tenant's person is "not found", exactly like a person who does not exist).

Key file (YAML or JSON; ``--api-keys FILE``, ``PFSTORER_SERVE__API_KEYS_FILE`` or the settings'
``serve.api_keys_file``)::

    # tenants -> sha256 hashes of their keys ("sha256:" + 64 hex digits; bare hex also accepted)
    tenants:
      acme:
        - sha256:3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7
      globex:
        - sha256:...
        - sha256:...          # several keys per tenant: rotate by adding the new one first

The same document (as JSON or YAML text) may instead be given in the environment variable
``PFSTORER_API_KEYS`` (used when no file is configured). The file is re-read when it changes
(checked at most every ``reload_s`` seconds), so keys rotate without a restart.

Make a key and its line with ``pfstorer serve --new-key`` (prints a random key and its hash) or
hash an existing one with ``pfstorer serve --hash-key KEY`` (``-`` reads it from stdin);
:func:`hash_key` does the same in Python. Keys are long random tokens, not passwords, so one
sha256 is enough (no salt or stretching needed); the plain key is never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pfstorer.errors import PFStorerError
from registry.keys import TENANT_KEY_RE

__all__ = [
    "API_KEYS_ENV",
    "ApiKeys",
    "KeyFileError",
    "extract_key",
    "generate_key",
    "hash_key",
]

API_KEYS_ENV = "PFSTORER_API_KEYS"
_HASH_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
MIN_KEY_LENGTH = 16


class KeyFileError(PFStorerError):
    """An API key file or document that cannot be used."""


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<64 hex digits>``."""
    if not isinstance(key, str) or not key.strip():
        raise KeyFileError("an API key must be a non-empty string")
    return "sha256:" + hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


def generate_key(prefix: str = "pfs_") -> str:
    """A fresh random API key (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents (``Authorization: Bearer`` first, then ``X-API-Key``)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


def _parse_document(doc: Any, where: str) -> dict[str, str]:
    """``{"tenants": {tenant: [hash, ...]}}`` -> ``{hex digest: tenant}``."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("tenants"), Mapping):
        raise KeyFileError(f"{where}: expected a mapping with a 'tenants' mapping (tenant -> hashes)")
    out: dict[str, str] = {}
    for tenant, hashes in doc["tenants"].items():
        if not isinstance(tenant, str) or not TENANT_KEY_RE.match(tenant):
            raise KeyFileError(f"{where}: tenant {tenant!r} is not a safe tenant key")
        if isinstance(hashes, str):
            hashes = [hashes]
        if not isinstance(hashes, list):
            raise KeyFileError(f"{where}: tenant {tenant!r} needs a list of key hashes")
        for h in hashes:
            m = _HASH_RE.match(str(h).strip().lower()) if isinstance(h, str) else None
            if m is None:
                raise KeyFileError(
                    f"{where}: tenant {tenant!r} has an entry that is not 'sha256:<64 hex>' "
                    "(store hashes, never plain keys: pfstorer serve --hash-key KEY)"
                )
            digest = m.group(1)
            if out.get(digest, tenant) != tenant:
                raise KeyFileError(f"{where}: one key hash is listed under two tenants")
            out[digest] = tenant
    return out


def _load_text(text: str, where: str) -> dict[str, str]:
    try:
        doc = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise KeyFileError(f"{where} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    return _parse_document(doc, where)


class ApiKeys:
    """Key hash -> tenant, from a file (re-read when it changes), the environment or a mapping."""

    def __init__(
        self,
        hashes: Mapping[str, str] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        reload_s: float = 5.0,
    ) -> None:
        self._by_hash: dict[str, str] = dict(hashes or {})
        self.path = Path(path).expanduser() if path is not None else None
        self.reload_s = reload_s
        self._sig: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        if self.path is not None:
            self._reload(force=True)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_document(cls, doc: Any, where: str = "API keys") -> ApiKeys:
        return cls(_parse_document(doc, where))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], reload_s: float = 5.0) -> ApiKeys:
        return cls(path=path, reload_s=reload_s)

    @classmethod
    def from_settings(cls, settings: Any = None) -> ApiKeys | None:
        """The keys of the ``api_keys`` setting (``$PFSTORER_API_KEYS``), or None."""
        from pfstorer.settings import Settings

        text = ((settings or Settings.load()).api_keys or "").strip()
        return cls(_load_text(text, f"${API_KEYS_ENV}")) if text else None

    @classmethod
    def configured(cls, path: str | os.PathLike[str] | None) -> ApiKeys:
        """The keys a server uses: ``path`` if given, else ``$PFSTORER_API_KEYS``; none is an error."""
        if path is not None:
            return cls.from_file(path)
        keys = cls.from_settings()
        if keys is None:
            raise KeyFileError(
                "no API keys configured: pass --api-keys FILE (serve.api_keys_file, "
                f"PFSTORER_SERVE__API_KEYS_FILE) or set ${API_KEYS_ENV}"
            )
        return keys

    # -- file reloads --------------------------------------------------------------------------
    def _reload(self, force: bool = False) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError as exc:
            if force:
                raise KeyFileError(f"API key file {self.path} cannot be read: {exc}") from None
            return  # keep the last good keys if the file disappears for a moment (rotation)
        sig = (st.st_mtime_ns, st.st_size)
        if not force and sig == self._sig:
            return
        try:
            by_hash = _load_text(self.path.read_text(), str(self.path))
        except (KeyFileError, OSError):
            if force:
                raise
            return  # a half-written file: keep the last good keys
        self._by_hash, self._sig = by_hash, sig

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.reload_s:
                return
            self._checked = now
            self._reload()

    # -- lookups -------------------------------------------------------------------------------
    def tenant_for(self, key: str | None) -> str | None:
        """The tenant owning ``key``, or None (no key, too short, unknown)."""
        if not key or len(key) < MIN_KEY_LENGTH or len(key) > 4096:
            return None
        self._maybe_reload()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self._by_hash.get(digest)

    @property
    def tenants(self) -> set[str]:
        self._maybe_reload()
        return set(self._by_hash.values())

    def __len__(self) -> int:
        return len(self._by_hash)

    def document(self) -> dict[str, Any]:
        """The key document (hashes only), e.g. to write a file."""
        tenants: dict[str, list[str]] = {}
        for digest, tenant in sorted(self._by_hash.items()):
            tenants.setdefault(tenant, []).append(f"sha256:{digest}")
        return {"tenants": tenants}

    def dump(self) -> str:
        return json.dumps(self.document(), indent=2)
