"""The reference prior: the personalization blocks' starting weights, trained across many people.

A fresh adapter starts with random projections and alpha = 0, so it ignores the references until
fine-tuning has taught it to use them. A prior is one slot of block weights (every tensor of
:data:`~pfstorer.personalization.TRAINABLE_KEYS` per block, alpha included, and the token)
trained on many people's reference -> target pairs over the frozen base (``pfstorer
train-prior``); an adapter started from it restores with the person's cached references at
0 fine-tuning steps, and fine-tuning starts from there. An adapter made from a prior is an
ordinary adapter: the prior only changes where training starts.

File: ``prior.safetensors``, the tensors plus, in the safetensors header, the fingerprint and
preset of the base it was trained on and a JSON record of how (settings, data, steps, losses).
It ships beside a base's weights (``<weights folder>/prior.safetensors``) and is used by default
when personalizing on that base (:func:`resolve_prior`).

A prior is bound to its base. Named explicitly, a prior of another base is refused with an error
naming both fingerprints. Found implicitly beside the base (the default), a mismatched one is
skipped with a warning and personalization starts from zero: retraining a base into the same
folder leaves the old prior there until it is retrained, and that must not stop personalization
nor be used silently; the adapter's metadata records which prior (if any) it started from.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter_meta import sha256_bytes
from .errors import PriorError, PriorMismatchError

PRIOR_FILE = "prior.safetensors"
USE_BASE_PRIOR = "base"
NO_PRIOR = "none"


@dataclass
class Prior:
    """One slot of personalization-block weights and the base they belong to."""

    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    base_preset: str
    info: dict[str, Any] = field(default_factory=dict)  # training settings, data, steps, losses
    sha256: str = ""  # of the file it was read from or written to

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        header = {"base_fingerprint": self.base_fingerprint, "base_preset": self.base_preset,
                  "info": json.dumps(self.info, sort_keys=True)}
        return save({k: self.tensors[k].contiguous() for k in sorted(self.tensors)}, metadata=header)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a ``.safetensors`` file) atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        self.sha256 = sha256_bytes(data)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Prior:
        """Read a prior file (local path or fsspec URL); only safetensors is parsed."""
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(str(path))
            data = fs.cat_file(root)
        except (FileNotFoundError, IsADirectoryError):
            raise PriorError(f"no reference prior at {path} (expected a {PRIOR_FILE} file)") from None
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "prior") -> Prior:
        """A prior from a file's bytes: its tensors and the header's base and training record."""
        from safetensors.torch import load

        try:
            tensors = load(data)
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except Exception as exc:  # safetensors raises its own error types
            raise PriorError(f"{source} is not a valid safetensors file: {exc}") from None
        if not meta.get("base_fingerprint") or "token" not in tensors:
            raise PriorError(f"{source} is not a reference prior (no base fingerprint or token in it)")
        try:
            info = json.loads(meta.get("info") or "{}")
        except ValueError:
            raise PriorError(f"{source}: its training record is not valid JSON") from None
        return cls(tensors, meta["base_fingerprint"], meta.get("base_preset", "?"), info, sha256_bytes(data))

    def check_base(self, model) -> None:
        """Refuse a base other than the one this prior was trained on, naming both."""
        if self.base_fingerprint != model.fingerprint:
            raise PriorMismatchError(
                f"reference prior was trained on base {self.base_fingerprint} ({self.base_preset}) "
                f"but the loaded base is {model.fingerprint} ({model.config.name})"
            )


def base_prior_path(model) -> str | None:
    """Where the base's own prior would be: ``prior.safetensors`` beside its weights (None for
    seeded random weights, which have no folder)."""
    return _prior_file(getattr(model, "weights_location", None))


def _prior_file(location: str | None) -> str | None:
    """``prior.safetensors`` in the weights folder ``location`` (None: no folder)."""
    return None if location is None else f"{str(location).rstrip('/')}/{PRIOR_FILE}"


def _prior_beside(location: str | None) -> Prior | None:
    """The prior file in the weights folder ``location``, whichever base it was trained on (None:
    no folder, or no prior in it)."""
    import fsspec

    path = _prior_file(location)
    if path is None:
        return None
    fs, root = fsspec.core.url_to_fs(path)
    return Prior.load(path) if fs.exists(root) else None


def planned_prior_sha256(base: str, weights: str | None, fingerprint: str, choice: str) -> str | None:
    """The sha256 of the prior that :func:`resolve_prior` would give a base, read without loading
    the base (None: start from zero).

    A run's planner puts it in each job's key, so a retrained prior retrains people, while the
    same prior under another path does not. The rules are :func:`resolve_prior`'s: a prior of
    another base beside the weights is skipped; one named explicitly is keyed by its content
    (training refuses it, naming both fingerprints).
    """
    from .model import base_weights_location

    if choice == NO_PRIOR:
        return None
    if choice != USE_BASE_PRIOR:
        return Prior.load(choice).sha256
    prior = _prior_beside(base_weights_location(base, weights=weights))
    return None if prior is None or prior.base_fingerprint != fingerprint else prior.sha256


def resolve_prior(model, choice: str) -> Prior | None:
    """The prior a personalization on ``model`` starts from.

    ``choice``: ``"base"`` — the base's own prior if it ships one (a mismatched one is skipped
    with a warning, see the module docstring), ``"none"`` — start from zero, anything else — the
    path or URL of a prior file, refused if it belongs to another base.
    """
    if choice == NO_PRIOR:
        return None
    if choice != USE_BASE_PRIOR:
        prior = Prior.load(choice)
        prior.check_base(model)
        return prior
    prior = _prior_beside(getattr(model, "weights_location", None))
    if prior is None:
        return None
    try:
        prior.check_base(model)
    except PriorMismatchError as exc:
        warnings.warn(f"skipping the reference prior beside the base ({base_prior_path(model)}): {exc}; "
                      "adapters start from zero until it is retrained with `pfstorer train-prior`", stacklevel=2)
        return None
    return prior
