"""What an adapter folder holds, torch-free: its file names and its metadata (``adapter.json``).

The model library writes these (:mod:`pfstorer.adapter`), the registry stores and indexes them,
and the server reads them; one definition for all of them, importable without torch.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
METADATA_FILE = "adapter.json"
ADAPTER_FILES = (TENSORS_FILE, METADATA_FILE)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AdapterMetadata(BaseModel):
    """``adapter.json``: who the adapter is for, which base it needs, how it was trained."""

    format_version: int = FORMAT_VERSION
    identity: str
    tenant: str | None = None
    base_fingerprint: str
    base_preset: str
    config: dict[str, Any] = Field(default_factory=dict)
    steps: int = 0
    final_losses: dict[str, float] = Field(default_factory=dict)
    loss_curve: list[float] = Field(default_factory=list)
    references: list[str] = Field(default_factory=list, description="names/hashes of the references used")
    tensors_sha256: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    pfstorer_version: str = "0.1.0"
