"""The people a reference prior trains on: those of a training split with two or more photos
(one photo is the target, another its reference), and the people held out for its probe."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pfstorer.errors import InputError


def pair_people(data: str, split: str = "train", limit: int | None = None, seed: int = 0) -> dict[str, list[str]]:
    """``{identity: [photo paths]}`` of every person of ``split`` with at least two photos, sorted
    by name (a seeded subset of ``limit`` people). The bench split, and any split sharing a person
    with it, is refused (:func:`pipelines.base_data.training_rows`)."""
    from pipelines.base_data import training_rows

    root = data.rstrip("/")
    photos: dict[str, list[str]] = defaultdict(list)
    for r in training_rows(data, split):
        photos[r["identity"]].append(f"{root}/{r['path']}")
    people = {k: sorted(v) for k, v in sorted(photos.items()) if len(v) >= 2}
    if len(people) < 2:
        raise InputError(f"split {split!r} of {data} has {len(people)} people with two or more photos; a prior needs pairs")
    if limit is not None and limit < len(people):
        keep = set(np.random.default_rng([seed, 23]).choice(sorted(people), size=limit, replace=False).tolist())
        people = {k: v for k, v in people.items() if k in keep}
    return people


def split_probe(people: dict[str, list[str]], n: int, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(train, probe)``: ``n`` whole people drawn in a seeded order for the probe (at most a
    tenth of them, at least one person left to train on)."""
    names = sorted(people)
    n = min(n, len(names) // 10) if n else 0
    held = set(np.random.default_rng([seed, 17]).permutation(names)[:n].tolist())
    return ({k: v for k, v in people.items() if k not in held}, {k: v for k, v in people.items() if k in held})
