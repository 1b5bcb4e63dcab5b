"""pfstorer: personalized face restoration (PFStorer, CVPR 2024) as a pure torch + diffusers package.

The parts, each importable on its own (nothing heavy is imported here):
``pfstorer.model`` (``load_base``), ``pfstorer.training`` (``personalize``, ``personalize_many``),
``pfstorer.sampling`` (``restore``, ``restore_batch``), ``pfstorer.adapter`` (``Adapter``),
``pfstorer.images``, ``pfstorer.degradations``, ``pfstorer.metrics``, ``pfstorer.settings``.
No Ray and no MLflow inside: those live in ``pipelines`` and ``serving``.
"""

__version__ = "0.1.0"
