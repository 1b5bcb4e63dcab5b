"""``python -m pipelines.train_prior``: the ``pfstorer train-prior`` command on its own."""

import sys

from pipelines.train_prior.cli import main

sys.exit(main())
