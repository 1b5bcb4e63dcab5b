"""No-reference quality: NIQE (own implementation) and BRISQUE (OpenCV contrib).

The paper reports MUSIQ, whose weights cannot be obtained offline; NIQE and BRISQUE are the
no-reference scores we can compute honestly here (lower is better for both).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma

from pfstorer.errors import InputError
from pfstorer.metrics._image import ImageLike, as_float_rgb, as_uint8_rgb, rgb_to_y
from pfstorer.metrics._models import MetricUnavailableError, find_brisque_models, find_niqe_params

NIQE_BACKEND = (
    "own NIQE (Mittal et al. 2013), MATLAB pristine params (basicsr 1.4.2 npz), Y channel, 96 px blocks"
)
BRISQUE_BACKEND = "OpenCV 5 contrib cv2.quality BRISQUE, LIVE model (opencv-data)"
NIQE_BLOCK = 96

# --- NIQE -----------------------------------------------------------------------------------------
_GAM = np.arange(0.2, 10.001, 0.001)
_R_GAM = gamma(2 / _GAM) ** 2 / (gamma(1 / _GAM) * gamma(3 / _GAM))


@lru_cache(maxsize=1)
def _niqe_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(find_niqe_params()) as d:
        return d["mu_pris_param"][0], d["cov_pris_param"], d["gaussian_window"]


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Fit an asymmetric generalised Gaussian by moment matching over MATLAB's grid of shapes."""
    x = x.ravel()
    left = np.sqrt(np.mean(x[x < 0] ** 2)) if np.any(x < 0) else 0.0
    right = np.sqrt(np.mean(x[x > 0] ** 2)) if np.any(x > 0) else 0.0
    ghat = left / right if right > 0 else np.inf
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x**2) if np.any(x) else 0.0
    rnorm = rhat * (ghat**3 + 1) * (ghat + 1) / (ghat**2 + 1) ** 2
    alpha = _GAM[np.argmin((_R_GAM - rnorm) ** 2)]
    k = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return float(alpha), float(left * k), float(right * k)


def _block_features(block: np.ndarray) -> list[float]:
    """18 NSS features: AGGD of the MSCN block and of its 4 oriented pairwise products."""
    alpha, bl, br = _aggd(block)
    feat = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        feat += [a, (br - bl) * gamma(2 / a) / gamma(1 / a), bl, br]
    return feat


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1) + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def _matlab_resize_axis(img: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """MATLAB ``imresize`` (bicubic, antialiased when shrinking, symmetric borders) along one axis."""
    n_in = img.shape[axis]
    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    w = scale * _cubic((u[:, None] - idx) * scale) if scale < 1 else _cubic(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(int) - 1, 2 * n_in)]
    moved = np.moveaxis(img, axis, 0)
    out = np.einsum("ok,ok...->o...", w, moved[idx])
    return np.moveaxis(out, 0, axis)


def _block_offsets(n: int) -> list[int]:
    """Block starts along one side: MATLAB's non-overlapping 96 px grid; a side of 96..191 px holds
    only one block, so there we take two overlapping blocks (start and end, even offset) so that a
    128 px face still yields 4 blocks and a covariance estimate (MATLAB allows block overlap too)."""
    count = n // NIQE_BLOCK
    if count >= 2:
        return [i * NIQE_BLOCK for i in range(count)]
    return [0, (n - NIQE_BLOCK) // 2 * 2]


def niqe(img: ImageLike) -> float:
    """NIQE (lower is better): Mahalanobis-like distance of the image's natural-scene statistics from
    the MATLAB pristine model, on the rounded BT.601 luma in [0, 255], 96 px blocks, two scales.

    Matches MATLAB / basicsr for images of 192 px and more per side; smaller faces (96-191 px) use
    overlapping blocks (see :func:`_block_offsets`). Needs at least 96x96 px.
    """
    mu_p, cov_p, window = _niqe_params()
    y = np.round(rgb_to_y(as_float_rgb(img)) * 255.0)
    h, w = y.shape
    if h < NIQE_BLOCK or w < NIQE_BLOCK:
        raise InputError(f"NIQE needs at least {NIQE_BLOCK}x{NIQE_BLOCK} px, got {w}x{h}")
    oy, ox = _block_offsets(h), _block_offsets(w)
    y = y[: oy[-1] + NIQE_BLOCK, : ox[-1] + NIQE_BLOCK]
    feats = []
    for scale in (1, 2):
        mu = convolve(y, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(y * y, window, mode="nearest") - mu * mu))
        mscn = (y - mu) / (sigma + 1)
        b = NIQE_BLOCK // scale
        feats.append(
            np.array(
                [
                    _block_features(mscn[r // scale : r // scale + b, c // scale : c // scale + b])
                    for c in ox
                    for r in oy
                ]
            )
        )
        if scale == 1:
            y = _matlab_resize_axis(_matlab_resize_axis(y / 255.0, 0.5, 0), 0.5, 1) * 255.0
    dist = np.concatenate(feats, axis=1)
    mu_d = np.nanmean(dist, axis=0)
    clean = dist[~np.isnan(dist).any(axis=1)]
    cov_d = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros_like(cov_p)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff))


# --- BRISQUE --------------------------------------------------------------------------------------
def brisque(img: ImageLike) -> float:
    """BRISQUE score (lower is better, roughly 0-100) from OpenCV's LIVE-trained SVR model."""
    model, rng = find_brisque_models()
    import cv2

    bgr = np.ascontiguousarray(as_uint8_rgb(img)[:, :, ::-1])
    try:
        score = cv2.quality.QualityBRISQUE_compute(bgr, str(model), str(rng))
    except cv2.error as exc:
        raise MetricUnavailableError(f"OpenCV BRISQUE failed: {str(exc).strip().splitlines()[-1]}") from exc
    return float(score[0])
