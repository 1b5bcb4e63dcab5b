"""Ray jobs over Parquet manifests: validate, personalize at scale, register, forget.

Submodules (import what you need; nothing heavy is imported here):

- :mod:`pipelines.manifest` - the manifest schema (pydantic + pyarrow), read/write, hashing.
- :mod:`pipelines.validate` - checks before any training; bad rows become quarantine rows.
- the adapters go to :mod:`registry` (its own package, shared with ``serving``): artifact
  store (fsspec), adapter index (Parquet at a URL) and the MLflow model registry.
- :mod:`pipelines.cli` - ``pfstorer manifest ...`` and ``pfstorer forget`` sub-commands.
"""
