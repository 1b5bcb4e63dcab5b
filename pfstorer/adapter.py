"""The adapter artifact: ``adapter.safetensors`` (tensors) + ``adapter.json`` (metadata).

The tensors are everything inference needs (see :mod:`pfstorer.personalization`), including the
cached reference keys/values, so restoring never needs the reference photos. Only safetensors is
read or written (no pickle). ``tensors_sha256`` in the JSON is the sha256 of the safetensors file's
bytes; loading verifies it, and loading onto a base with another fingerprint fails, naming both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .adapter_meta import FORMAT_VERSION, METADATA_FILE, TENSORS_FILE, AdapterMetadata, sha256_bytes
from .errors import AdapterError, AdapterMismatchError

__all__ = ["FORMAT_VERSION", "METADATA_FILE", "TENSORS_FILE", "Adapter", "AdapterMetadata", "sha256_bytes"]


class Adapter:
    """One identity's personalization: inference tensors + metadata."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: AdapterMetadata) -> None:
        self.tensors = tensors
        self.metadata = metadata

    @property
    def identity(self) -> str:
        return self.metadata.identity

    def tensor_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: self.tensors[k].contiguous() for k in sorted(self.tensors)})

    def save(self, directory: str | os.PathLike) -> Path:
        """Write both files; the JSON carries the sha256 of the tensor file just written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        data = self.tensor_bytes()
        self.metadata.tensors_sha256 = sha256_bytes(data)
        tmp = d / (TENSORS_FILE + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(d / TENSORS_FILE)
        (d / METADATA_FILE).write_text(self.metadata.model_dump_json(indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = True) -> Adapter:
        """Read an adapter folder (local path or fsspec URL); verify the tensors' sha256."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(directory).rstrip("/"))
        try:
            meta_raw = fs.cat_file(f"{root}/{METADATA_FILE}")
            data = fs.cat_file(f"{root}/{TENSORS_FILE}")
        except FileNotFoundError:
            raise AdapterError(f"{directory} is not an adapter folder (needs {TENSORS_FILE} and {METADATA_FILE})") from None
        return cls.from_bytes(data, meta_raw, source=str(directory), verify=verify)

    @classmethod
    def from_bytes(cls, data: bytes, metadata: bytes | str | dict[str, Any], *, source: str = "adapter",
                   verify: bool = True) -> Adapter:
        """An adapter from the tensor file's bytes and its metadata (JSON text or dict).

        The one place that parses adapters: the metadata is validated, the sha256 of ``data`` is
        checked against it (``verify``), and only safetensors is parsed (never pickle).
        """
        from safetensors.torch import load

        try:
            meta = (AdapterMetadata.model_validate(metadata) if isinstance(metadata, dict)
                    else AdapterMetadata.model_validate_json(metadata))
        except ValueError as exc:
            raise AdapterError(f"{source}: invalid adapter metadata: {str(exc).splitlines()[0]}") from None
        if meta.format_version > FORMAT_VERSION:
            raise AdapterError(f"{source}: adapter format {meta.format_version} is newer than this pfstorer ({FORMAT_VERSION})")
        if verify and sha256_bytes(data) != meta.tensors_sha256:
            raise AdapterError(f"{source}: {TENSORS_FILE} does not match its sha256 (corrupt or tampered)")
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise AdapterError(f"{source}: {TENSORS_FILE} is not a valid safetensors file: {exc}") from None
        return cls(tensors, meta)

    def check_base(self, model) -> None:
        """Refuse a base other than the one this adapter was trained on."""
        if self.metadata.base_fingerprint != model.fingerprint:
            raise AdapterMismatchError(
                f"adapter {self.identity!r} was trained on base {self.metadata.base_fingerprint} "
                f"({self.metadata.base_preset}) but the loaded base is {model.fingerprint} ({model.config.name})"
            )

    def summary(self) -> dict[str, Any]:
        return json.loads(self.metadata.model_dump_json(exclude={"loss_curve"}))
