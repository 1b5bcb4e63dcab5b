"""The token authentication the project sets up for every Ray it starts, checked without starting one:
the token file is ours (mode 0600) and every start path asks for it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pfstorer.ray_env import ensure_token, read_token


@pytest.fixture
def token_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    return path


def test_token_is_created_readable_by_its_owner_only(token_file):
    assert ensure_token() == token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert ensure_token() == token_file and read_token() == token  # kept, not replaced
    assert [p.name for p in token_file.parent.iterdir()] == ["auth_token"]  # no temporary file left


def test_an_existing_token_is_kept_and_made_private(token_file):
    token_file.parent.mkdir()
    token_file.write_text("a-token-from-before\n")
    token_file.chmod(0o644)
    ensure_token()
    assert token_file.read_text() == "a-token-from-before\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_without_a_writable_home_the_token_goes_to_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    # empty reads as unset; setenv (unlike delenv of an absent name) restores what ensure_token sets
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "")
    (tmp_path / "file").write_text("")
    home = tmp_path / "file" / "home"  # ~/.ray cannot be made there, not even by root
    monkeypatch.setenv("HOME", str(home))
    path = ensure_token()
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(path) and not str(path).startswith(str(home))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_token_in_the_environment_writes_no_file(token_file, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ensure_token() is None and not token_file.exists()
    assert read_token() == "from-env"


PREPARE = ("import json, os, sys; from pfstorer.ray_env import prepare_ray; prepare_ray(local=sys.argv[1] == 'local'); "
           "print(json.dumps({k: os.environ.get(k) for k in ('RAY_AUTH_MODE', 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER')}))")


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_prepare_ray_turns_token_auth_on_before_ray_is_imported(tmp_path, where):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", PREPARE, where], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    got = json.loads(out.stdout)
    token = tmp_path / ".ray" / "auth_token"
    if where == "local":  # a Ray of our own: token (created, private), loopback only
        assert got == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    else:  # joining a cluster: its token is the cluster's, never one made up here
        assert got == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None}
        assert not token.exists()
