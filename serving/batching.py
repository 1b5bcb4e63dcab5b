"""Cross-request batches on a serving replica: which waiting requests can run as one batch.

``@serve.batch`` hands the ``Restorer`` up to ``serve.max_batch_size`` requests at once. They
can share one ``restore_batch`` call (one forward pass per tile batch, each row with its own
person's adapter and seed) when they agree on everything that shapes the computation: image
size, scale, steps, sampler and colour fix (:func:`batch_signature`). A run also needs every one
of its people in a device slot at the same time, so it holds at most ``adapter_slots`` distinct
people (base-only rows use a reserved zero slot and count for none).

:func:`plan_runs` splits a batch into such runs, first fit in arrival order, so that requests of
the same person land in the same run. Acquiring a run's people one after another through the
multiplexed LRU cannot evict one of them for another: each is more recently used than every
adapter outside the run, and the run has no more people than there are slots. That, and holding
the replica's one turn from the first acquisition to the end of the run, is what pins the slots.

Pure functions and records, no Ray or torch: unit-tested alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

from pfstorer.deadline import Deadline
from pfstorer.restore_options import RestoreOptions

__all__ = ["BatchItem", "BatchStats", "batch_signature", "plan_runs"]


def batch_signature(shape: Sequence[int], options: RestoreOptions) -> tuple[Hashable, ...]:
    """What two requests must share to run in one ``restore_batch`` call: everything but the
    seed and the adapter strength (people may differ too)."""
    return (tuple(int(s) for s in shape[-2:]), *options.model_dump(exclude={"seed", "strength"}).values())


def plan_runs(items: Sequence[tuple[Hashable, str]], max_people: int) -> list[list[int]]:
    """Split a batch of ``(signature, person_key)`` items into runs of item indices.

    Items of one run share a signature and name at most ``max_people`` distinct non-empty person
    keys (``""`` is the base model alone). Runs come in the order of their first item; items keep
    their arrival order inside a run; an item joins the first open run of its signature that
    already holds its person or still has room for one more.
    """
    if max_people < 1:
        raise ValueError("max_people must be >= 1")
    runs: list[tuple[Hashable, set[str], list[int]]] = []
    for i, (sig, key) in enumerate(items):
        for run_sig, people, members in runs:
            if run_sig == sig and (not key or key in people or len(people) < max_people):
                if key:
                    people.add(key)
                members.append(i)
                break
        else:
            runs.append((sig, {key} if key else set(), [i]))
    return [members for _, _, members in runs]


class BatchStats:
    """What the batch queue formed: batches, runs (one ``restore_batch`` call each), rows."""

    def __init__(self) -> None:
        self.batches = self.runs = self.rows = self.mixed_runs = self.largest_run = 0

    def record(self, keys: list[str], runs: list[list[int]]) -> None:
        self.batches += 1
        self.rows += len(keys)
        self.runs += len(runs)
        for run in runs:
            self.largest_run = max(self.largest_run, len(run))
            self.mixed_runs += len({keys[i] for i in run}) > 1

    def summary(self) -> dict[str, int]:
        return dict(vars(self))


@dataclasses.dataclass(eq=False)
class BatchItem:
    """One request waiting in the replica's batch queue."""

    key: str  # "tenant/identity", "" = base only
    entry: Any  # its adapter index entry (None for base only)
    image: Any  # a uint8 tensor [3,H,W]; None until decoded from ``data`` (at its start)
    options: RestoreOptions  # resolved: the base's sampling defaults and the server's tiles filled in
    since: float  # when the request reached the replica
    deadline: Deadline = dataclasses.field(default_factory=Deadline)
    tenant: str = ""  # whose request it is (its fair share of the model)
    data: bytes = b""  # the encoded photo
