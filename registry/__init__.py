"""The one shared adapter layer: artifact store, adapter index and MLflow model registry.

``pipelines`` (publishing adapters after personalization) and ``serving`` (resolving and loading
them per request) both import this package, and it imports neither; nothing here imports Ray or
torch, and MLflow is
imported only when a :class:`ModelRegistry` first talks to it: serving builds the registry without
a tracking URI (``AdapterRegistry.from_urls(store, None, index)``) and never touches MLflow.

Modules: :mod:`registry.keys` (names, hashes, adapter file names), :mod:`registry.storage`
(fsspec URLs), :mod:`registry.artifacts`, :mod:`registry.index`, :mod:`registry.models` and
:mod:`registry.facade` (:class:`AdapterRegistry`). Import from ``registry`` itself.

Three places hold an adapter, each behind a URL:

- **store** (:class:`ArtifactStore`, any fsspec URL, local directory by default): the files,
  ``{store}/{tenant}/{identity}/{job_key}/adapter.safetensors`` and ``adapter.json``. Uploads go
  to a temporary key, are read back and sha256-verified, and only then moved into place.
- **registry** (:class:`ModelRegistry`, MLflow; SQLite by default, any tracking URI): one
  registered model per person, ``pfstorer.{tenant}.{identity}``; each version's source is the
  store URI, its tags carry the lineage and the job run it came from. A run per publishing
  batch (experiment ``pfstorer/{tenant}``) holds the batch's params and, per person, a tag
  ``job.{identity}`` with the job's params, metrics and loss curve.
- **index** (:class:`AdapterIndex`, a dataset of small Arrow files per tenant and hash bucket
  at a URL): (tenant, identity) -> (version, uri, sha256, base fingerprint, job key). Serving
  reads only this, so MLflow stays off the request path. A write adds immutable delta files
  (cost of the batch, not of the index), compacted in the background; a replica caches the
  buckets it was asked about, whole (bounded), and revalidates them in the background.

:class:`AdapterRegistry` ties them together: ``publish`` (idempotent by job key, write -> verify
-> register -> index), ``resolve``, ``fetch`` (sha256-verified, cached) and ``forget`` (faces are
biometric data: removes the index row, the registered model, the person's jobs from the runs,
and the files).

Keys: tenants match ``[A-Za-z0-9][A-Za-z0-9_-]{0,63}`` (no dots, so the registered model name
``pfstorer.{tenant}.{identity}`` is unambiguous); identities match
``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without ``..``. Serving's multiplexed model id is
``tenant/identity`` (:func:`model_key`).

Concurrency: the registry retries transient database errors (SQLite locks); index writers
never read-modify-write (each adds its own files), so any number may write, locally or on object
stores; two writers of the same person at once: the later file wins.
"""

from registry.artifacts import ArtifactStore, adapter_tags, read_adapter_meta
from registry.facade import AdapterRegistry, ForgetReport, StoredRegistration, entry_of_version, local_defaults
from registry.index import INDEX_SCHEMA, AdapterIndex, IndexEntry, write_bulk
from registry.keys import (
    ADAPTER_FILES,
    ADAPTER_JSON,
    ADAPTER_TENSORS,
    DEFAULT_STATE_DIR,
    MODEL_PREFIX,
    TENANT_KEY_RE,
    check_key,
    is_safe_key,
    job_key,
    model_key,
    model_name,
    parse_model_key,
    sha256_file,
)
from registry.models import JobSummary, ModelRegistry, ModelVersionInfo, Registration
from registry.storage import default_storage_options, is_local_url, url_to_fs

__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_JSON",
    "ADAPTER_TENSORS",
    "DEFAULT_STATE_DIR",
    "INDEX_SCHEMA",
    "MODEL_PREFIX",
    "TENANT_KEY_RE",
    "AdapterIndex",
    "AdapterRegistry",
    "ArtifactStore",
    "ForgetReport",
    "IndexEntry",
    "JobSummary",
    "write_bulk",
    "ModelRegistry",
    "Registration",
    "StoredRegistration",
    "ModelVersionInfo",
    "adapter_tags",
    "check_key",
    "default_storage_options",
    "entry_of_version",
    "is_local_url",
    "is_safe_key",
    "job_key",
    "local_defaults",
    "model_key",
    "model_name",
    "parse_model_key",
    "read_adapter_meta",
    "sha256_file",
    "url_to_fs",
]
