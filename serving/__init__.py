"""Ray Serve application and HTTP API of pfstorer (multi-tenant personalized face restoration).

- :mod:`serving.app` - the Serve application: ``build_app(args)`` for Serve configs
  (``import_path: serving.app:build_app``).
- :mod:`serving.api` - the HTTP contract: request/response models, errors, OpenAPI.
- :mod:`serving.gateway` - the ``Gateway`` deployment (FastAPI ingress): keys, limits, tenants.
- :mod:`serving.restorer` - the ``Restorer`` deployment: one base per replica, adapters in slots.
- :mod:`serving.batching` - which waiting requests can run as one batch.
- :mod:`serving.adapters` - adapter tiers on a replica: index -> sha256-verified bytes ->
  host-RAM LRU -> device slots (``@serve.multiplexed``), and the identity-affinity lock.
- :mod:`serving.auth` - API keys (stored as sha256 hashes) -> tenant.
- :mod:`serving.cli` - ``pfstorer serve`` and ``pfstorer restore-batch``.

Nothing heavy is imported here.
"""
