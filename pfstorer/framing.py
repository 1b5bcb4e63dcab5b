"""Face framing: a whole photo cut to a square around its largest face, framed like the base's
training crops.

The base model learned faces as they sit in the 128 px lfw crops: the detected face box spans
about 90 of 128 px (``FRAME_SCALE`` = 1.42 box sides) and its centre lies 7 % of a box side below
the crop's centre. A reference photo of a whole scene shows the face at a quarter of that size, so
an adapter trained on crops of it learns little of the face. Framing references (and photos to
score) to that geometry puts the person's features where the model looks for them.

This is a cut, not an alignment (no landmarks, no rotation), so a detector that fails costs
nothing: photos with no detectable face are returned unchanged, as are photos whose face already
fills the frame (lfw crops, passport shots) and every photo on machines without a face detector
(the ``eval`` extra). Framing never refuses a photo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FRAME_SCALE = 128 / 90  # crop side / detected face-box side, measured on the lfw128 bench crops
FRAME_DROP = 0.07  # the crop's centre lies this many box sides above the box's centre
MIN_GAIN = 0.8  # frame only when the framed square is below this fraction of the long side


def face_square(height: int, width: int, box: tuple[int, int, int, int]) -> tuple[int, int, int] | None:
    """(top, left, side) of the framed square around ``box`` (left, top, right, bottom), at most
    the photo's short side and moved inside it; ``None`` when that square would be nearly the
    whole photo anyway (a face crop)."""
    left, top, right, bottom = box
    side = min(round(max(right - left, bottom - top) * FRAME_SCALE), height, width)
    if side >= MIN_GAIN * max(height, width):
        return None
    cx = (left + right) / 2
    cy = (top + bottom) / 2 - FRAME_DROP * (bottom - top)
    x0 = min(max(0, round(cx - side / 2)), width - side)
    y0 = min(max(0, round(cy - side / 2)), height - side)
    return y0, x0, side


def frame_face(img: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``img`` [3,H,W] cut to the framed square around its largest face (see module doc), resized
    to ``size`` when given; unchanged when it has no detectable face or the face fills it."""
    from pfstorer.metrics.identity import find_face, has_face_detector

    if not has_face_detector():
        return img
    h, w = img.shape[-2:]
    box = find_face(img.float().clamp(0, 1))
    if box is None or box.source == "whole-image":
        return img
    sq = face_square(h, w, (box.left, box.top, box.right, box.bottom))
    if sq is None:
        return img
    y0, x0, side = sq
    crop = img[..., y0 : y0 + side, x0 : x0 + side]
    if size is None or size == side:
        return crop
    out = F.interpolate(crop.float().unsqueeze(0), size=(size, size), mode="bicubic", antialias=side > size,
                        align_corners=False)[0]
    return out.clamp(0, 1).to(img.dtype)
