"""Torch helpers shared by tests that compare served outputs with offline restores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads: outputs are bit-identical only at the same thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def reassociation_atol(run32: torch.Tensor, run64: torch.Tensor, k: float = 4.0) -> float:
    """Tolerance for two float32 evaluations of one computation that only add in another order
    (batch sizes, thread counts, fused kernels): each lies within the float32 error ``e`` of the
    exact value, measured here as ``|run32 - run64|`` against the same computation in float64, so
    the two lie within ``2e`` of each other; ``k = 4`` leaves room for ``e`` to vary between orders.
    Measured on the machine that runs the test, the bound follows its arithmetic, not a constant
    seen on one CPU, and stays orders of magnitude below what a wrong tile or row would change."""
    return k * float((run32.double() - run64.double()).abs().max()) + 4 * torch.finfo(torch.float32).eps
