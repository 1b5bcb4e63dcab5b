"""Manifest rows with extra columns, shared by the local and S3 manifest tests."""

from __future__ import annotations

ROWS = [
    {"tenant": "acme", "identity": "alice", "role": "ref", "uri": "/p/alice/1.jpg", "credit": "me"},
    {"tenant": "acme", "identity": "alice", "role": "restore", "uri": "/p/alice/2.jpg"},
    {"tenant": "001", "identity": "bob.b", "role": "ref", "uri": "s3://b/bob/1.jpg", "notes": "x"},
]


def rows_with_extra() -> list[dict]:
    return [dict(r, camera=f"cam{i}", iso=100 * i) for i, r in enumerate(ROWS)]



