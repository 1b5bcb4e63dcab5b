"""Ray Serve application and HTTP API of pfstorer (multi-tenant personalized face restoration).

- :mod:`serving.app` - the ``Gateway`` (FastAPI ingress) and ``Restorer`` (model) deployments,
  ``build_app(args)`` for Serve configs (``import_path: serving.app:build_app``).
- :mod:`serving.adapters` - adapter tiers on a replica: index -> sha256-verified bytes ->
  host-RAM LRU -> device slots (``@serve.multiplexed``), and the identity-affinity scheduler.
- :mod:`serving.auth` - API keys (stored as sha256 hashes) -> tenant.
- :mod:`serving.cli` - ``pfstorer serve`` and ``pfstorer restore-batch``.

Nothing heavy is imported here.
"""
