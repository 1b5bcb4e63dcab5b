"""Shared bits of the benchmark scripts: where results go and how the machine is named."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TUNE_PEOPLE = 30  # bench people on which personalization settings may be chosen; the rest report


def bench_split(names: list[str], part: str, exclude: set[str] = frozenset(), tune: int = TUNE_PEOPLE) -> list[str]:
    """The ``tune`` or ``report`` part of the bench people ``names``, in the order given.

    Fixed once, by name: the ``tune`` people are the ``tune`` names with the smallest SHA-256, so
    the split depends on nobody's results and adding a person moves no one else. Settings are
    chosen on ``tune``; what is reported comes from ``report``. ``exclude`` (the demo's people)
    are in neither.
    """
    import hashlib

    if part not in ("tune", "report"):
        raise ValueError(f"part must be 'tune' or 'report', got {part!r}")
    kept = [n for n in names if n not in exclude]
    chosen = set(sorted(kept, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:tune])
    return [n for n in kept if (n in chosen) == (part == "tune")]


def bootstrap_interval(values: list[float], groups: list[int], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of ``values`` when whole ``groups`` (people) are resampled:
    photos of one person are not independent, so people, not photos, are drawn."""
    import numpy as np

    by: dict[int, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        by.setdefault(g, []).append(v)
    sums = np.array([sum(v) for v in by.values()])
    counts = np.array([len(v) for v in by.values()])
    pick = np.random.default_rng(seed).integers(0, len(sums), size=(draws, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where that is missing)."""
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def lfw_people(lfw: Path, split: str | None = "bench") -> dict[str, list[Path]]:
    """People of one split of an ``index.csv`` (``identity,path,split``; ``None``: every split),
    sorted by name, each with their photos sorted by file name (the first ones are references)."""
    import csv

    people: dict[str, list[Path]] = {}
    with open(lfw / "index.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if split is None or row["split"] == split:
                people.setdefault(row["identity"], []).append(lfw / row["path"])
    return {k: sorted(v) for k, v in sorted(people.items())}


def device_name(device: str) -> str:
    """The card (GPU) or the CPU, as results must name it."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (benchmarks serve on loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def write_results(stem: str, payload: dict[str, Any], table_md: str) -> tuple[Path, Path]:
    """benchmarks/results/<stem>.json + .md, each naming the machine and the command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    js.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md.write_text(f"# {stem}\n\nMachine: {payload.get('device')}\n\nCommand: `{payload.get('command')}`\n\n{table_md}\n")
    return js, md


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table of rows that may not share every column (one suite scores more metrics than
    another): every column any row has, each after the one it follows in its row; blank where a
    row lacks it."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        for i, c in enumerate(r):
            if c not in cols:
                cols.insert(cols.index(list(r)[i - 1]) + 1 if i else 0, c)
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        cells = (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
