"""Face sharpness against the truth: how much fine detail a restoration has, relative to the original.

PSNR rewards the posterior mean, a blur; a restorer can gain dB while its faces have no skin, eye
or hair detail left. The Laplacian variance (the energy of the image's second derivative, a
classic focus measure) of the face box, divided by the same for the truth, says how much of the
truth's fine detail the output carries: 1 is as sharp as the truth, a blur is near 0, noise or
overdone texture is above 1. It is a ratio to the truth, so it is only defined with a reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


from ._image import ImageLike, as_float_rgb

if TYPE_CHECKING:
    from .identity import FaceBox

__all__ = ["SHARPNESS_BACKEND", "face_sharpness", "laplacian_variance"]

SHARPNESS_BACKEND = "variance of the 4-neighbour Laplacian of the luma, face box over the truth's (numpy)"


def laplacian_variance(img: ImageLike) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (8-bit grey levels), over the interior."""
    rgb = as_float_rgb(img) * 255.0
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    if min(y.shape) < 3:
        return 0.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def face_sharpness(pred: ImageLike, gt: ImageLike, box: FaceBox | None = None) -> float | None:
    """Laplacian variance of ``pred`` over the truth's, on ``box`` (default: the face found in the
    truth; the whole image when there is none); ``None`` when the truth is flat."""
    from .identity import find_face

    p, g = as_float_rgb(pred), as_float_rgb(gt)
    if box is None:
        try:
            box = find_face(g)
        except Exception:  # no detector installed: the whole image
            box = None
    if box is not None:
        p = p[box.top:box.bottom, box.left:box.right]
        g = g[box.top:box.bottom, box.left:box.right]
    ref = laplacian_variance(g)
    return None if ref <= 1e-9 else laplacian_variance(p) / ref
