"""Ray Serve application and HTTP API of pfstorer (multi-tenant personalized face restoration).

- :mod:`serving.app` - the Serve application: ``build_app(args)`` for Serve configs
  (``import_path: serving.app:build_app``).
- :mod:`serving.api` - the HTTP contract: request/response models, errors, OpenAPI.
- :mod:`serving.gateway` - the ``Gateway`` deployment (FastAPI ingress): keys, limits, tenants.
- :mod:`serving.messages` - the typed, frozen records the Gateway and a replica exchange.
- :mod:`serving.restorer` - the ``Restorer`` deployment: one base per replica; ``__init__``, the
  multiplexed adapter getter, ``restore``, ``ready``, ``check_health``.
- :mod:`serving.resident` - the people a replica holds: index entry -> host RAM -> device slot,
  and forgetting those who left the index.
- :mod:`serving.runner` - admitted requests on the model: start, slots, compute, batches.
- :mod:`serving.fair_share` - which request starts and which computes next, fairly per tenant.
- :mod:`serving.batching` - which waiting requests can run as one batch.
- :mod:`serving.adapters` - the tiers' primitives: device slot pool, resident adapter, the
  identity-affinity lock.
- :mod:`serving.auth` - API keys (stored as sha256 hashes) -> tenant.
- :mod:`serving.cli` - ``pfstorer serve`` and ``pfstorer restore-batch``.

Nothing heavy is imported here.
"""
