"""Adapters as pfstorer writes them, for the registry tests on local files, S3 and MLflow."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from registry import AdapterIndex, ArtifactStore, IndexEntry

BASE = "tiny-0123456789abcdef"


class FlakyStore(ArtifactStore):
    """A store whose transport flips one byte of the tensors on the way (the bytes that land
    differ from the bytes sent)."""

    def _upload(self, local_path: Path, remote_path: str) -> None:
        data = bytearray(local_path.read_bytes())
        if local_path.name == "adapter.safetensors":
            data[len(data) // 2] ^= 0x01
        self.fs.pipe_file(remote_path, bytes(data))


def make_adapter(
    root: Path, tenant: str | None, identity: str, seed: int = 0, *, corrupt: bool = False
) -> Path:
    """An adapter directory as pfstorer writes it (tensors + JSON with their sha256)."""
    d = root / f"{identity}-{seed}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"x": rng.standard_normal(4).astype(np.float32)}, str(d / "adapter.safetensors"))
    meta = {
        "format_version": 1,
        "identity": identity,
        "tenant": tenant,
        "base_fingerprint": BASE,
        "config": {"steps": 5, "lr": 1e-3},
        "steps": 5,
        "final_losses": {"diff": 0.1 + seed, "gen": 0.2},
        "tensors_sha256": hashlib.sha256((d / "adapter.safetensors").read_bytes()).hexdigest(),
    }
    (d / "adapter.json").write_text(json.dumps(meta))
    if corrupt:  # bytes change after the JSON was written: the hash no longer matches
        data = bytearray((d / "adapter.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (d / "adapter.safetensors").write_bytes(bytes(data))
    return d


def write_concurrently(indexes: tuple[AdapterIndex, AdapterIndex], people: int, uri_prefix: str) -> None:
    """Two writers upsert ``people`` people each (a0.., b0..) at the same time, one row per call."""

    def write(index: AdapterIndex, prefix: str) -> None:
        for i in range(people):
            index.upsert([IndexEntry("acme", f"{prefix}{i}", 1, f"{uri_prefix}{prefix}{i}", "e" * 64)])

    threads = [threading.Thread(target=write, args=(ix, p)) for ix, p in zip(indexes, ("a", "b"), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
