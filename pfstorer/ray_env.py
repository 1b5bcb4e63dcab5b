"""The environment every Ray we start or join runs in: token authentication, loopback-only servers.

Ray 2.60's gRPC servers (GCS, raylet, workers, dashboard agent) listen on every interface of a
cluster node, and anyone who reaches one with authentication off can run code as us. Two switches
close that on a single machine, and both are read once, when ``ray`` is imported, so they are set
here, before it is:

- ``RAY_AUTH_MODE=token``: every RPC and dashboard/job API call must carry the token
  (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``). We create the token file
  ourselves, mode 0600: Ray would write it world-readable.
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (local Ray only): Ray's single-machine mode, as on a
  laptop, so the node address is 127.0.0.1 and every server and metrics port binds loopback.
  Ray ignores ``_node_ip_address="127.0.0.1"`` (it swaps it for the host's address).

Processes Ray starts (raylet, workers, Serve replicas, job drivers) inherit both. No Ray import here.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

__all__ = ["AUTH_MODE_ENV", "SINGLE_HOST_ENV", "ensure_token", "prepare_ray", "read_token", "token_path"]

AUTH_MODE_ENV = "RAY_AUTH_MODE"
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TOKEN_ENV, _TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def token_path() -> Path:
    """Where Ray looks for the token file: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get(_TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def ensure_token() -> Path | None:
    """Make sure a token exists for Ray to find, readable by this user only; return its file
    (None when ``$RAY_AUTH_TOKEN`` holds it).

    A missing file is written whole and then linked into place, so a process racing us never
    reads it half-written; an existing one keeps its token and loses group/other permissions.
    """
    if os.environ.get(_TOKEN_ENV):
        return None
    path = token_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:  # no writable home (a locked-down CI user): a private folder, for this process tree
        if os.environ.get(_TOKEN_PATH_ENV):
            raise
        path = Path(tempfile.mkdtemp(prefix="pfstorer-ray-")) / "auth_token"
        os.environ[_TOKEN_PATH_ENV] = str(path)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))  # 256 bits, Ray's own format
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process won the race: keep its token
                pass
        finally:
            os.unlink(tmp)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return path


def read_token() -> str:
    """The token this process presents (``$RAY_AUTH_TOKEN``, else the token file)."""
    return os.environ.get(_TOKEN_ENV) or token_path().read_text().strip()


def prepare_ray(local: bool) -> None:
    """Call before ``ray.init``: ``local`` for a Ray of our own, False to join a cluster.

    Token authentication is on unless ``RAY_AUTH_MODE`` says otherwise; a local Ray also gets its
    token (created if missing) and single-machine mode. If ``ray`` is already imported, the
    switches can no longer be set; Ray then turns token auth on for a local Ray by itself.
    """
    if "ray" not in sys.modules:
        os.environ.setdefault(AUTH_MODE_ENV, "token")
        if local:
            os.environ.setdefault(SINGLE_HOST_ENV, "0")
    if local and os.environ.get(AUTH_MODE_ENV, "token").lower() == "token":
        ensure_token()
