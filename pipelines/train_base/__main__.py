"""``python -m pipelines.train_base``: the ``pfstorer train-base`` command on its own."""

import sys

from pipelines.train_base.cli import main

sys.exit(main())
