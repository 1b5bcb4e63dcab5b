"""Ray jobs over Parquet manifests: validate, personalize at scale, register, forget.

Submodules (import what you need; nothing heavy is imported here):

- :mod:`pipelines.cluster` - joining a Ray cluster (or starting one here) and waiting for workers.
- :mod:`pipelines.manifest` - the manifest schema (pydantic + pyarrow), read/write, hashing.
- :mod:`pipelines.probe` - judging one photo (a stat, then a read only if it changed).
- :mod:`pipelines.validate` - checks before any training, on Ray Data; bad rows become
  quarantine rows.
- :mod:`pipelines.batch_restore` - ``pfstorer restore-batch``, streaming on Ray Data.
- the adapters go to :mod:`registry` (its own package, shared with ``serving``): artifact
  store (fsspec), adapter index (Parquet at a URL) and the MLflow model registry.
- :mod:`pipelines.cli` - ``pfstorer manifest ...``, ``forget`` and ``restore-batch`` sub-commands.
"""
