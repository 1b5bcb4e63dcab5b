"""Training data of ``pfstorer train-base``: photo sources, held-out people, and the HQ/LQ pairs.

A base must restore faces at every size a photo has (a face of 64 px in a group photo, of 1000 px
in a portrait), and it restores tile by tile at the photo's own pixel scale. So a training crop is
a *native-scale* tile of a photo rescaled at random: each draw picks a source (weighted), a photo,
a face size ``F`` log-uniform in ``face_scale`` (pixels), rescales the photo by ``F / face_px`` (the
source's typical face size; never enlarged past its native size, an enlarged photo is a blur
taught as truth), and cuts a random ``crop`` x ``crop`` square. Without ``face_scale`` the crop is
a random fraction ``crop_scale`` of the short side resized to ``crop`` (the original scheme).

The LQ is drawn as :func:`pfstorer.degradations.synthesize_lq` draws it (light/heavy, clean with
``p_hq``) or, with probability ``p_sr``, is a x4 super-resolution input: the crop shrunk 4x,
degraded ``light``, then enlarged back with the bicubic upscale ``restore --scale`` uses. Each row
says which it is, so the detail objectives can act on some kinds of input only.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Source", "draw_batch", "holdout_people", "input_kinds", "load_split", "native_crop", "probe_holdout", "training_rows"]


class Source(BaseModel):
    """One folder or URL of photos with an ``index.csv`` (``identity,path,split``)."""

    model_config = ConfigDict(frozen=True)

    data: str
    face_px: float = Field(90.0, gt=0, description="typical face width in its photos, in pixels "
                           "(lfw128: ~90; faces1024: ~450)")
    weight: float = Field(1.0, gt=0, description="relative share of the training draws")


def _read_index(data: str) -> list[dict[str, str]]:
    import fsspec

    from pfstorer.errors import InputError

    url = data.rstrip("/") + "/index.csv"
    try:
        with fsspec.open(url, "r", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise InputError(f"no index.csv in {data} (expected identity,path,split)") from None
    if rows and not {"identity", "path", "split"} <= set(rows[0]):
        raise InputError(f"{url} needs the columns identity,path,split; got {sorted(rows[0])}")
    return rows


def training_rows(data: str, split: str = "train") -> list[dict[str, str]]:
    """The ``index.csv`` rows of ``split``, refusing the bench split and any split that shares an
    identity with it (benchmarks must never have seen their people)."""
    from pfstorer.errors import InputError

    if split == "bench":
        raise InputError("refusing to train on split=bench: those people are the personalization benchmark")
    rows = _read_index(data)
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        raise InputError(f"split {split!r} of {data} has no photos (splits: {sorted({r['split'] for r in rows})})")
    bench = {r["identity"] for r in rows if r["split"] == "bench"}
    leak = sorted({r["identity"] for r in chosen} & bench)
    if leak:
        raise InputError(f"split {split!r} shares {len(leak)} identities with bench (e.g. {leak[:3]}): refusing")
    return chosen


def load_split(data: str, split: str = "train", limit: int | None = None,
               seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Decode every photo of ``split`` once: ``(uint8 arrays [H,W,3], identities)``.

    Refuses the bench split, and any split that shares an identity with it.
    """
    import fsspec
    from PIL import Image


    chosen = training_rows(data, split)
    if limit is not None and limit < len(chosen):
        pick = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
        chosen = [chosen[i] for i in sorted(pick)]
    base = data.rstrip("/")
    arrays = []
    for r in chosen:
        with fsspec.open(f"{base}/{r['path']}", "rb") as fh:
            arrays.append(np.asarray(Image.open(io.BytesIO(fh.read())).convert("RGB"), dtype=np.uint8))
    return arrays, [r["identity"] for r in chosen]


def holdout_people(identities: Sequence[str], photos: int, seed: int = 0) -> list[int]:
    """Indices of whole people, drawn in a seeded order, until at least ``photos`` photos are held out."""
    counts = Counter(identities)
    people = sorted(counts)
    chosen: set[str] = set()
    held = 0
    for k in np.random.default_rng([seed, 17]).permutation(len(people)):
        if held >= photos:
            break
        chosen.add(people[k])
        held += counts[people[k]]
    return [i for i, ident in enumerate(identities) if ident in chosen]


def probe_holdout(identities: Sequence[str], holdout: int, seed: int = 0) -> list[int]:
    """The photos ``train-base --holdout`` keeps out of one source for its probe: whole people, at
    most a tenth of the source's photos (but 2: one probed heavy, one light). Settings are tuned
    on these people (``benchmarks/bench_base.py --photo-split tune``), never on the bench."""
    return holdout_people(identities, min(holdout, max(2, len(identities) // 10)), seed)


def native_crop(photo: np.ndarray, crop: int, face_px: float, face_scale: tuple[float, float],
                rng: np.random.Generator):
    """A ``crop`` x ``crop`` tile of ``photo`` rescaled so its face is ``F`` px, ``F`` log-uniform in
    ``face_scale`` (capped at the photo's native size): a float tensor [3,crop,crop] in [0, 1]."""
    import torch

    from pfstorer.images import resize

    lo, hi = face_scale
    f = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    s = min(1.0, f / face_px)
    h, w = photo.shape[:2]
    side = max(1, min(h, w, round(crop / s)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    tile = torch.from_numpy(np.array(photo[top:top + side, left:left + side])).permute(2, 0, 1)  # a writable copy
    return resize(tile.float() / 255.0, (crop, crop), mode="bicubic")


def input_kinds(levels: Sequence[str]) -> tuple[str, ...]:
    """What a training LQ of :func:`draw_batch` can be: ``clean``, one of ``levels``, or ``x4``."""
    return ("clean", *levels, "x4")


def draw_batch(sources: Sequence[tuple[Sequence[np.ndarray], Source]], n: int, crop: int, c: Any,
               rank: int, step: int):
    """HQ crops, their LQ and each row's kind of input (``clean``, a level name, or ``x4``) for one
    worker's step; randomness from (seed, rank, step) only.

    ``c`` is the run's :class:`~pipelines.train_base.TrainBaseConfig` (crop scheme, levels,
    ``p_hq``, ``p_sr``)."""
    import torch

    from pfstorer.degradations import (
        draw_lq,
        random_crop_resize,
        synthesize_sr_lq,
    )

    rng = np.random.default_rng([c.seed, rank, step])
    weights = np.array([s.weight for _, s in sources], dtype=float)
    weights /= weights.sum()
    hq, lq, kinds = [], [], []
    for _ in range(n):
        photos, src = sources[int(rng.choice(len(sources), p=weights))] if len(sources) > 1 else sources[0]
        photo = photos[int(rng.integers(len(photos)))]
        if c.face_scale is None:
            img = torch.from_numpy(np.array(photo)).permute(2, 0, 1)
            x = random_crop_resize(img.float() / 255.0, crop, rng, c.crop_scale)
        else:
            x = native_crop(photo, crop, src.face_px, c.face_scale, rng)
            if rng.random() < 0.5:
                x = x.flip(-1)
        hq.append(x)
        if c.p_sr > 0 and rng.random() < c.p_sr:
            lq.append(synthesize_sr_lq(x, rng, factor=4, level="light"))
            kinds.append("x4")
        else:
            y, k = draw_lq(x, rng, c.levels, c.p_hq)
            lq.append(y)
            kinds.append("clean" if k is None else c.levels[k])
    return torch.stack(hq), torch.stack(lq), tuple(kinds)
