"""``pfstorer train-prior``: a base's reference prior, the personalization blocks' shared start.

A plain torch loop in one process (:mod:`~pipelines.train_prior.loop`): the prior is one small
set of block weights on a frozen base, so there is nothing to shard; checkpoints every
``--checkpoint-every`` steps and ``--resume`` make a long run stoppable. Modules:
:mod:`~pipelines.train_prior.config`, :mod:`~pipelines.train_prior.data` (people with pairs, the
probe's people), :mod:`~pipelines.train_prior.loop` (the step), :mod:`~pipelines.train_prior.outputs`
(checkpoints, loss curve), :mod:`~pipelines.train_prior.driver` and :mod:`~pipelines.train_prior.cli`.
"""

from pipelines.train_prior.cli import main, register_cli

__all__ = ["main", "register_cli"]
