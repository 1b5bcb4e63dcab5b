"""Synthetic low-quality faces: the paper's second-order degradation pipeline (section 3.3).

The base model, personalization (the LQ of each reference photo) and the benchmarks all need
LQ/HQ pairs whose degradations look like real ones. The paper trains on "second-order
degradations with ISP noise, motion and median blur" and passes the clean image through with
``p_HQ = 0.03``; its supplementary, which would give the exact parameters, is not available, so
the parameters below are ours, chosen from Real-ESRGAN (Wang et al. 2021) and from the camera
noise model of "Unprocessing images" (Brooks et al. 2019), then shrunk so that ``light`` keeps
the identity readable on a 128 px face and ``heavy`` does not.

Pipeline (one *stage*, run twice, the second with its own probability ``second.p``)::

    blur (iso / aniso / generalized Gaussian, motion line, median)  -> resize down
    -> noise (Gaussian colour/grey, or ISP: unprocess to a linear Bayer mosaic through a random
       colour matrix and white balance, add shot + read noise, bilinear demosaic, process back:
       noise that is signal-dependent, spatially and colour-correlated like a phone's)
    -> JPEG
    ...second stage...  -> resize back to the input size (bilinear or bicubic)

Units: blur sigmas and lengths are in pixels *of the image at that point* (cameras and codecs
act on pixels, as in Real-ESRGAN); kernels are ``2*ceil(3*sigma)+1`` wide, capped at
``max_kernel``; resize scales are log-uniform factors of the current size; Gaussian noise sigma is
in 8-bit levels; ISP shot noise is log-uniform, read noise follows it as in Brooks et al.
(``log read = 2.18 log shot + 1.2 + N(0, 0.26)``); white-balance gains are drawn in
[1.9, 2.4] (red) and [1.5, 1.9] (blue); the camera-to-sRGB colour matrix is
``I + s (I - 1/3) + E`` with ``s`` in [0.4, 1] and ``E ~ N(0, 0.05)`` made row-sum-free, so
white stays white. The median blur is the separable median (rows, then
columns): it removes impulses and keeps edges like the 2-D median at a fraction of the cost.
A "p" is the probability that a step runs; a dict gives relative weights of the kinds.

Parameters (``pfstorer.degradations.parameter_table()`` prints this from the code; a test keeps
them in sync):

| parameter | light | heavy |
| --- | --- | --- |
| stage 1: blur p | 0.8 | 1 |
| stage 1: blur kinds | iso 0.5, aniso 0.3, generalized 0.1, motion 0.05, median 0.05 | iso 0.3, aniso 0.3, generalized 0.1, motion 0.2, median 0.1 |
| stage 1: blur sigma (px) | 0.4-1.5 | 1-3 |
| stage 1: generalized beta | 0.5-4 | 0.5-4 |
| stage 1: motion length (px) | 2-5 | 5-13 |
| stage 1: median sizes | 3 | 3, 5 |
| stage 1: max kernel (px) | 21 | 21 |
| stage 1: resize p | 1 | 1 |
| stage 1: resize scale | 0.45-0.9 | 0.25-0.6 |
| stage 1: noise p | 0.7 | 1 |
| stage 1: noise kinds | gaussian 0.5, isp 0.5 | gaussian 0.5, isp 0.5 |
| stage 1: gaussian sigma (/255) | 2-8 | 8-25 |
| stage 1: grey noise p | 0.4 | 0.4 |
| stage 1: ISP shot noise | 0.0002-0.002 | 0.002-0.012 |
| stage 1: JPEG p | 0.9 | 1 |
| stage 1: JPEG quality | 50-90 | 25-60 |
| stage 2: p | 0.3 | 1 |
| stage 2: blur p | 0.5 | 0.8 |
| stage 2: blur kinds | iso 0.5, aniso 0.3, generalized 0.1, motion 0.05, median 0.05 | iso 0.3, aniso 0.3, generalized 0.1, motion 0.2, median 0.1 |
| stage 2: blur sigma (px) | 0.2-0.8 | 0.4-1.5 |
| stage 2: generalized beta | 0.5-4 | 0.5-4 |
| stage 2: motion length (px) | 2-3 | 2-5 |
| stage 2: median sizes | 3 | 3 |
| stage 2: max kernel (px) | 21 | 21 |
| stage 2: resize p | 0.5 | 1 |
| stage 2: resize scale | 0.8-1 | 0.6-1 |
| stage 2: noise p | 0.3 | 0.8 |
| stage 2: noise kinds | gaussian 0.5, isp 0.5 | gaussian 0.5, isp 0.5 |
| stage 2: gaussian sigma (/255) | 1-4 | 3-15 |
| stage 2: grey noise p | 0.4 | 0.4 |
| stage 2: ISP shot noise | 0.0001-0.001 | 0.001-0.006 |
| stage 2: JPEG p | 0.5 | 1 |
| stage 2: JPEG quality | 70-95 | 30-70 |
| resize modes (down) | area, bilinear, bicubic | area, bilinear, bicubic |
| final resize modes (back up) | bilinear, bicubic | bilinear, bicubic |

Reproducibility: every random number comes from the ``numpy.random.Generator`` passed in (never
global numpy/torch state), in a fixed order, and every operation (FFT convolution via pocketfft,
torch interpolation, libjpeg) is deterministic on the CPU, so the same seed gives bit-identical
output, and identities trained side by side with their own generators see exactly what they
would see alone. Work is done on the CPU in float32; the result goes back to the input's device.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

from pfstorer.errors import InputError
from pfstorer.images import resize

__all__ = [
    "HEAVY",
    "LEVELS",
    "LIGHT",
    "BlurConfig",
    "DegradationConfig",
    "NoiseConfig",
    "StageConfig",
    "blur_kernel",
    "degrade",
    "draw_lq",
    "median_blur",
    "motion_kernel",
    "parameter_table",
    "random_crop_resize",
    "resolve_level",
    "synthesize_lq",
    "synthesize_sr_lq",
]

BLUR_KINDS = ("iso", "aniso", "generalized", "motion", "median")
NOISE_KINDS = ("gaussian", "isp")
RESIZE_MODES = ("area", "bilinear", "bicubic")


def _check_range(name: str, r: tuple[float, float], lo: float = 0.0, hi: float = math.inf) -> None:
    if not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {r}")


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_weights(name: str, w: dict[str, float], known: Sequence[str]) -> None:
    bad = set(w) - set(known)
    if bad:
        raise ValueError(f"{name}: unknown kinds {sorted(bad)} (known: {', '.join(known)})")
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"{name}: weights must be >= 0 with a positive sum")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlurConfig(_Frozen):
    """Which blur a stage applies and how strong."""

    p: float
    kinds: dict[str, float]
    sigma: tuple[float, float]
    beta: tuple[float, float] = (0.5, 4.0)
    motion_length: tuple[float, float]
    median_sizes: tuple[int, ...] = (3,)
    max_kernel: int = 21

    @model_validator(mode="after")
    def _valid(self) -> BlurConfig:
        _check_p("blur.p", self.p)
        _check_weights("blur.kinds", self.kinds, BLUR_KINDS)
        _check_range("blur.sigma", self.sigma, 0.05)
        _check_range("blur.beta", self.beta, 0.1)
        _check_range("blur.motion_length", self.motion_length, 1.0)
        if not self.median_sizes or any(s not in (3, 5) for s in self.median_sizes):
            raise ValueError("blur.median_sizes must be a non-empty choice of 3 and 5")
        if self.max_kernel < 3 or self.max_kernel % 2 == 0:
            raise ValueError("blur.max_kernel must be odd and >= 3")
        return self


class NoiseConfig(_Frozen):
    """Signal-independent Gaussian noise or camera (ISP) noise."""

    p: float
    kinds: dict[str, float]
    gaussian_sigma: tuple[float, float]
    gray_p: float = 0.4
    isp_shot: tuple[float, float]

    @model_validator(mode="after")
    def _valid(self) -> NoiseConfig:
        _check_p("noise.p", self.p)
        _check_p("noise.gray_p", self.gray_p)
        _check_weights("noise.kinds", self.kinds, NOISE_KINDS)
        _check_range("noise.gaussian_sigma", self.gaussian_sigma, 0.0, 255.0)
        _check_range("noise.isp_shot", self.isp_shot, 1e-8, 1.0)
        return self


class StageConfig(_Frozen):
    """One order of the pipeline: blur -> resize -> noise -> JPEG."""

    p: float = 1.0
    blur: BlurConfig
    resize_p: float
    resize_scale: tuple[float, float]
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise: NoiseConfig
    jpeg_p: float
    jpeg_quality: tuple[int, int]

    @model_validator(mode="after")
    def _valid(self) -> StageConfig:
        _check_p("stage.p", self.p)
        _check_p("resize_p", self.resize_p)
        _check_p("jpeg_p", self.jpeg_p)
        _check_range("resize_scale", self.resize_scale, 0.01, 1.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(f"resize_modes must be chosen from {RESIZE_MODES}")
        return self


class DegradationConfig(_Frozen):
    """A named degradation level: two stages, then a resize back to the input size."""

    name: str
    first: StageConfig
    second: StageConfig
    final_modes: tuple[str, ...] = ("bilinear", "bicubic")

    @model_validator(mode="after")
    def _valid(self) -> DegradationConfig:
        if not self.final_modes or any(m not in ("bilinear", "bicubic") for m in self.final_modes):
            raise ValueError("final_modes must be chosen from ('bilinear', 'bicubic')")
        return self


_LIGHT_KINDS = {"iso": 0.5, "aniso": 0.3, "generalized": 0.1, "motion": 0.05, "median": 0.05}
_HEAVY_KINDS = {"iso": 0.3, "aniso": 0.3, "generalized": 0.1, "motion": 0.2, "median": 0.1}
_NOISE_KINDS = {"gaussian": 0.5, "isp": 0.5}

LIGHT = DegradationConfig(
    name="light",
    first=StageConfig(
        blur=BlurConfig(p=0.8, kinds=_LIGHT_KINDS, sigma=(0.4, 1.5), motion_length=(2, 5)),
        resize_p=1.0,
        resize_scale=(0.45, 0.9),
        noise=NoiseConfig(p=0.7, kinds=_NOISE_KINDS, gaussian_sigma=(2, 8), isp_shot=(2e-4, 2e-3)),
        jpeg_p=0.9,
        jpeg_quality=(50, 90),
    ),
    second=StageConfig(
        p=0.3,
        blur=BlurConfig(p=0.5, kinds=_LIGHT_KINDS, sigma=(0.2, 0.8), motion_length=(2, 3)),
        resize_p=0.5,
        resize_scale=(0.8, 1.0),
        noise=NoiseConfig(p=0.3, kinds=_NOISE_KINDS, gaussian_sigma=(1, 4), isp_shot=(1e-4, 1e-3)),
        jpeg_p=0.5,
        jpeg_quality=(70, 95),
    ),
)

HEAVY = DegradationConfig(
    name="heavy",
    first=StageConfig(
        blur=BlurConfig(
            p=1.0, kinds=_HEAVY_KINDS, sigma=(1.0, 3.0), motion_length=(5, 13), median_sizes=(3, 5)
        ),
        resize_p=1.0,
        resize_scale=(0.25, 0.6),
        noise=NoiseConfig(p=1.0, kinds=_NOISE_KINDS, gaussian_sigma=(8, 25), isp_shot=(2e-3, 1.2e-2)),
        jpeg_p=1.0,
        jpeg_quality=(25, 60),
    ),
    second=StageConfig(
        p=1.0,
        blur=BlurConfig(p=0.8, kinds=_HEAVY_KINDS, sigma=(0.4, 1.5), motion_length=(2, 5)),
        resize_p=1.0,
        resize_scale=(0.6, 1.0),
        noise=NoiseConfig(p=0.8, kinds=_NOISE_KINDS, gaussian_sigma=(3, 15), isp_shot=(1e-3, 6e-3)),
        jpeg_p=1.0,
        jpeg_quality=(30, 70),
    ),
)

LEVELS: dict[str, DegradationConfig] = {"light": LIGHT, "heavy": HEAVY}


def _fmt(x: float) -> str:
    return f"{x:g}"


def parameter_table(levels: Sequence[DegradationConfig] = (LIGHT, HEAVY)) -> str:
    """The Markdown table of the levels' parameters (the module docstring shows it)."""

    def rng_(r: tuple[float, float]) -> str:
        return f"{_fmt(r[0])}-{_fmt(r[1])}"

    def kinds(w: dict[str, float]) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in w.items())

    rows: list[tuple[str, list[str]]] = []
    for tag, get in (("stage 1", lambda c: c.first), ("stage 2", lambda c: c.second)):
        st = [get(c) for c in levels]
        if tag == "stage 2":
            rows.append((f"{tag}: p", [_fmt(s.p) for s in st]))
        rows += [
            (f"{tag}: blur p", [_fmt(s.blur.p) for s in st]),
            (f"{tag}: blur kinds", [kinds(s.blur.kinds) for s in st]),
            (f"{tag}: blur sigma (px)", [rng_(s.blur.sigma) for s in st]),
            (f"{tag}: generalized beta", [rng_(s.blur.beta) for s in st]),
            (f"{tag}: motion length (px)", [rng_(s.blur.motion_length) for s in st]),
            (f"{tag}: median sizes", [", ".join(map(str, s.blur.median_sizes)) for s in st]),
            (f"{tag}: max kernel (px)", [str(s.blur.max_kernel) for s in st]),
            (f"{tag}: resize p", [_fmt(s.resize_p) for s in st]),
            (f"{tag}: resize scale", [rng_(s.resize_scale) for s in st]),
            (f"{tag}: noise p", [_fmt(s.noise.p) for s in st]),
            (f"{tag}: noise kinds", [kinds(s.noise.kinds) for s in st]),
            (f"{tag}: gaussian sigma (/255)", [rng_(s.noise.gaussian_sigma) for s in st]),
            (f"{tag}: grey noise p", [_fmt(s.noise.gray_p) for s in st]),
            (f"{tag}: ISP shot noise", [rng_(s.noise.isp_shot) for s in st]),
            (f"{tag}: JPEG p", [_fmt(s.jpeg_p) for s in st]),
            (f"{tag}: JPEG quality", [rng_(s.jpeg_quality) for s in st]),
        ]
    rows.append(("resize modes (down)", [", ".join(c.first.resize_modes) for c in levels]))
    rows.append(("final resize modes (back up)", [", ".join(c.final_modes) for c in levels]))
    head = "| parameter | " + " | ".join(c.name for c in levels) + " |"
    sep = "| --- |" + " --- |" * len(levels)
    return "\n".join([head, sep] + [f"| {k} | " + " | ".join(v) + " |" for k, v in rows])


def resolve_level(level: str | DegradationConfig) -> DegradationConfig:
    """A level name (case-insensitive) or a config; unknown names are the user's error."""
    if isinstance(level, DegradationConfig):
        return level
    cfg = LEVELS.get(str(level).strip().lower()) if isinstance(level, str) else None
    if cfg is None:
        raise InputError(f"unknown degradation level {level!r} (known: {', '.join(sorted(LEVELS))})")
    return cfg


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _loguniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))) if r[1] > r[0] else float(r[0])


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    w = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


# --------------------------------------------------------------------------- kernels


def blur_kernel(
    sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0, max_kernel: int = 21
) -> np.ndarray:
    """Normalised (generalized) Gaussian kernel, rotated by ``theta`` radians, odd square size.

    ``beta = 1`` is the ordinary Gaussian; smaller is peakier with heavy tails, larger is
    plateau-like (Real-ESRGAN's generalized Gaussian). Size ``2*ceil(3*sigma)+1`` capped at
    ``max_kernel`` so the support follows the blur instead of truncating it at random.
    """
    sy = sigma_x if sigma_y is None else sigma_y
    r = max(1, math.ceil(3.0 * max(sigma_x, sy)))
    r = min(r, max_kernel // 2)
    ax = np.arange(-r, r + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    q = (u / sigma_x) ** 2 + (v / sy) ** 2
    k = np.exp(-0.5 * q**beta)
    return (k / k.sum()).astype(np.float32)


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """A straight motion streak of ``length`` px at ``angle`` radians (counter-clockwise from +x).

    The segment is sampled densely and splatted bilinearly, so any angle gives a smooth,
    centred kernel that sums to 1.
    """
    length = max(float(length), 1.0)
    r = math.ceil(length / 2.0) + 1
    size = 2 * r + 1
    k = np.zeros((size, size), dtype=np.float64)
    n = max(2, int(math.ceil(length * 8)))
    t = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, n)
    xs = r + t * math.cos(angle)
    ys = r - t * math.sin(angle)  # image rows grow downwards
    x0 = np.floor(xs).astype(int)
    y0 = np.floor(ys).astype(int)
    fx = xs - x0
    fy = ys - y0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(k, (y0 + dy, x0 + dx), wy * wx)
    return (k / k.sum()).astype(np.float32)


def _convolve(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Same-size convolution of ``[C,H,W]`` with a centred odd kernel (reflect borders, FFT)."""
    r = k.shape[0] // 2
    if r == 0:
        return x * k[0, 0]
    p = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
    ph, pw = p.shape[1:]
    shape = (sfft.next_fast_len(ph, real=True), sfft.next_fast_len(pw, real=True))
    spec = sfft.rfft2(p, s=shape) * sfft.rfft2(k, s=shape)
    out = sfft.irfft2(spec, s=shape)
    h, w = x.shape[1:]
    return np.ascontiguousarray(out[:, 2 * r : 2 * r + h, 2 * r : 2 * r + w], dtype=np.float32)


def _sort2(v: list[np.ndarray], a: int, b: int) -> None:
    lo = np.minimum(v[a], v[b])
    v[b] = np.maximum(v[a], v[b])
    v[a] = lo


def _median_1d(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    r = size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    p = np.pad(x, pad, mode="reflect" if x.shape[axis] > 1 else "edge")
    n = x.shape[axis]
    v = []
    for i in range(size):  # shifted views, no copies
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(i, i + n)
        v.append(p[tuple(sl)])
    if size == 3:
        return np.maximum(np.minimum(v[0], v[1]), np.minimum(np.maximum(v[0], v[1]), v[2]))
    # median of 5 with 7 compare-exchanges (Devillard's opt_med5 network)
    for a, b in ((0, 1), (3, 4), (0, 3), (1, 4), (1, 2), (2, 3), (1, 2)):
        _sort2(v, a, b)
    return v[2]


def median_blur(x: np.ndarray, size: int) -> np.ndarray:
    """Separable median filter of ``[C,H,W]`` (size 3 or 5): rows, then columns.

    Like the 2-D median it deletes impulses and keeps step edges (and it is the "median blur"
    look of cheap denoisers), at ~4x less work, which matters on 1024 px photos.
    """
    if size not in (3, 5):
        raise ValueError("median size must be 3 or 5")
    return _median_1d(_median_1d(x, size, axis=2), size, axis=1)


def _blur(x: np.ndarray, cfg: BlurConfig, rng: np.random.Generator) -> np.ndarray:
    kind = _pick(rng, cfg.kinds)
    if kind == "median":
        size = int(cfg.median_sizes[int(rng.integers(len(cfg.median_sizes)))])
        return median_blur(x, size)
    if kind == "motion":
        k = motion_kernel(_uniform(rng, cfg.motion_length), float(rng.uniform(0.0, math.pi)))
    elif kind == "iso":
        k = blur_kernel(_uniform(rng, cfg.sigma), max_kernel=cfg.max_kernel)
    else:
        sx, sy = _uniform(rng, cfg.sigma), _uniform(rng, cfg.sigma)
        theta = float(rng.uniform(0.0, math.pi))
        beta = 1.0
        if kind == "generalized":
            lo, hi = cfg.beta
            if lo < 1.0 < hi:  # half the time peaky (< 1), half plateau-like (> 1), as Real-ESRGAN
                beta = _uniform(rng, (lo, 1.0) if rng.random() < 0.5 else (1.0, hi))
            else:
                beta = _uniform(rng, cfg.beta)
        k = blur_kernel(sx, sy, theta, beta, max_kernel=cfg.max_kernel)
    return _convolve(x, k)


# --------------------------------------------------------------------------- noise


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055).astype(np.float32)


def _bayer_masks(h: int, w: int, phase: int) -> np.ndarray:
    """``[3,H,W]`` 0/1 masks of an RGGB mosaic shifted by ``phase`` (0..3) pixels."""
    dy, dx = divmod(phase, 2)
    yy = (np.arange(h)[:, None] + dy) % 2
    xx = (np.arange(w)[None, :] + dx) % 2
    r = (yy == 0) & (xx == 0)
    b = (yy == 1) & (xx == 1)
    g = ~(r | b)
    return np.stack([r, g, b]).astype(np.float32)


def _conv3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3x3 convolution of ``[C,H,W]`` with zero borders (for normalised convolution)."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    out = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            if k[i, j] != 0:
                out += k[i, j] * p[:, i : i + h, j : j + w]
    return out


_K_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
_K_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=np.float32)


def _demosaic(mosaic: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Bilinear demosaic as normalised convolution (exact at borders and at sampled sites)."""
    sparse = masks * mosaic[None]
    out = np.empty_like(masks)
    for c, k in ((0, _K_RB), (1, _K_G), (2, _K_RB)):
        num = _conv3(sparse[c : c + 1], k)
        den = _conv3(masks[c : c + 1], k)
        out[c] = num[0] / np.maximum(den[0], 1e-6)
    return out


def _random_ccm(rng: np.random.Generator) -> np.ndarray:
    """A camera-to-sRGB colour correction matrix: rows sum to 1 (white stays white), strong
    diagonal, negative off-diagonals, like real sensors' matrices; it is what makes phone noise
    colourful (chroma noise), since it mixes and amplifies the raw channels' noise."""
    sat = rng.uniform(0.4, 1.0)
    jitter = rng.normal(0.0, 0.05, (3, 3))
    m = np.eye(3) + sat * (np.eye(3) - np.full((3, 3), 1.0 / 3.0)) + jitter - jitter.mean(1, keepdims=True)
    return m.astype(np.float32)


def _isp_noise(x: np.ndarray, cfg: NoiseConfig, rng: np.random.Generator) -> np.ndarray:
    """Camera noise: unprocess sRGB to a linear Bayer mosaic (inverse gamma, inverse colour
    matrix, inverse white balance), add shot + read noise, then demosaic and process back."""
    h, w = x.shape[1:]
    ccm = _random_ccm(rng)
    gains = np.array([rng.uniform(1.9, 2.4), 1.0, rng.uniform(1.5, 1.9)], dtype=np.float32)[:, None, None]
    phase = int(rng.integers(4))
    shot = _loguniform(rng, cfg.isp_shot)
    read = math.exp(2.18 * math.log(shot) + 1.2 + float(rng.normal(0.0, 0.26)))
    masks = _bayer_masks(h, w, phase)
    cam = np.tensordot(np.linalg.inv(ccm).astype(np.float32), _srgb_to_linear(x), axes=1)
    raw = (masks * np.clip(cam / gains, 0.0, 1.0)).sum(0)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    raw = raw + np.sqrt(np.maximum(shot * raw + read, 0.0)).astype(np.float32) * noise
    rgb = np.tensordot(ccm, _demosaic(raw.astype(np.float32), masks) * gains, axes=1)
    return _linear_to_srgb(rgb)


def _noise(x: np.ndarray, cfg: NoiseConfig, rng: np.random.Generator) -> np.ndarray:
    kind = _pick(rng, cfg.kinds)
    if kind == "isp":
        return _isp_noise(x, cfg, rng)
    sigma = _uniform(rng, cfg.gaussian_sigma) / 255.0
    gray = rng.random() < cfg.gray_p
    c, h, w = x.shape
    n = rng.standard_normal((1 if gray else c, h, w), dtype=np.float32)
    return np.clip(x + np.float32(sigma) * n, 0.0, 1.0)


# --------------------------------------------------------------------------- resize, JPEG


_PIL_FILTERS = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _resize_np(x: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    """Resize ``[C,H,W]`` float32 with Pillow (antialiased when shrinking, single-threaded).

    Pillow rather than torch here: on small images torch's thread wake-up costs milliseconds
    on a busy machine, which would dominate a 128 px degradation.
    """
    if tuple(x.shape[1:]) == hw:
        return x
    f = _PIL_FILTERS[mode]
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((hw[1], hw[0]), f))
        for c in x
    ]
    return np.clip(np.stack(chans), 0.0, 1.0)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    u8 = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(u8)).save(buf, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        out = np.asarray(im.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1)) / np.float32(255.0)


def _stage(x: np.ndarray, st: StageConfig, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < st.blur.p:
        x = _blur(x, st.blur, rng)
    if rng.random() < st.resize_p:
        s = _loguniform(rng, st.resize_scale)
        mode = st.resize_modes[int(rng.integers(len(st.resize_modes)))]
        h, w = x.shape[1:]
        x = _resize_np(x, (max(2, round(h * s)), max(2, round(w * s))), mode)
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < st.noise.p:
        x = _noise(x, st.noise, rng)
    if rng.random() < st.jpeg_p:
        x = _jpeg(x, int(rng.integers(st.jpeg_quality[0], st.jpeg_quality[1] + 1)))
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def _degrade_one(img: torch.Tensor, cfg: DegradationConfig, rng: np.random.Generator) -> torch.Tensor:
    if img.ndim != 3 or img.shape[0] != 3:
        raise InputError(f"expected an image tensor [3,H,W], got shape {tuple(img.shape)}")
    h, w = img.shape[1:]
    x = np.clip(img.detach().to("cpu", torch.float32).numpy(), 0.0, 1.0)  # a copy: input untouched
    x = _stage(x, cfg.first, rng)
    if rng.random() < cfg.second.p:
        x = _stage(x, cfg.second, rng)
    mode = cfg.final_modes[int(rng.integers(len(cfg.final_modes)))]
    x = _resize_np(x, (h, w), mode)
    out = torch.from_numpy(np.clip(x, 0.0, 1.0).astype(np.float32, copy=False).copy())
    return out.to(device=img.device, dtype=img.dtype if img.is_floating_point() else torch.float32)


def degrade(
    img: torch.Tensor, level: str | DegradationConfig, rng: np.random.Generator | int
) -> torch.Tensor:
    """Degrade ``[3,H,W]`` (or each image of ``[B,3,H,W]``) at ``level``; same size, in [0, 1].

    ``rng`` may be a seed; the same seed gives bit-identical output.
    """
    cfg = resolve_level(level)
    gen = _as_rng(rng)
    if img.ndim == 4:
        return torch.stack([_degrade_one(im, cfg, gen) for im in img])
    return _degrade_one(img, cfg, gen)


def draw_lq(
    hq: torch.Tensor, rng: np.random.Generator, levels: Sequence[str | DegradationConfig], p_hq: float
) -> tuple[torch.Tensor, int | None]:
    """One training LQ for ``[3,H,W]`` ``hq`` as :func:`synthesize_lq` draws it, and the index in
    ``levels`` it was degraded at (None: the clean image itself), for callers that need each
    row's level."""
    if not levels:
        raise InputError("a training LQ needs at least one degradation level")
    _check_p("p_hq", p_hq)
    if rng.random() < p_hq:
        return hq.clone(), None
    k = int(rng.integers(len(levels)))
    return _degrade_one(hq, resolve_level(levels[k]), rng), k


def synthesize_lq(
    hq: torch.Tensor,
    rng: np.random.Generator,
    *,
    levels: Sequence[str | DegradationConfig] = ("light", "heavy"),
    p_hq: float = 0.03,
) -> torch.Tensor:
    """The training LQ for ``hq``: with probability ``p_hq`` the clean image itself (the paper's
    p_HQ, so the model learns to leave good photos alone), else a degradation at a random level.

    Batched input draws independently per image.
    """
    cfgs = [resolve_level(lv) for lv in levels]
    gen = _as_rng(rng)

    def one(im: torch.Tensor) -> torch.Tensor:
        return draw_lq(im, gen, cfgs, p_hq)[0]

    if hq.ndim == 4:
        return torch.stack([one(im) for im in hq])
    return one(hq)


def synthesize_sr_lq(
    hq: torch.Tensor,
    rng: np.random.Generator | int,
    *,
    factor: int = 4,
    level: str | DegradationConfig = "light",
) -> torch.Tensor:
    """A super-resolution input for ``hq`` ``[3,H,W]``: shrunk ``factor`` x (antialiased bicubic),
    degraded at ``level`` at that size, and enlarged back to ``H x W`` bicubically, as
    ``restore --scale factor`` enlarges a small photo before restoring it."""
    if hq.ndim != 3 or hq.shape[0] != 3:
        raise InputError(f"expected an image tensor [3,H,W], got shape {tuple(hq.shape)}")
    h, w = hq.shape[1:]
    small = resize(hq, (max(2, round(h / factor)), max(2, round(w / factor))), mode="bicubic")
    return resize(degrade(small, level, rng), (h, w), mode="bicubic")


def random_crop_resize(
    img: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
) -> torch.Tensor:
    """A random square crop (side a uniform fraction ``scale`` of the short side) resized to
    ``size``: the paper trains on random crops instead of aligned faces, so the model copes with
    any pose and position and can restore tiles of larger photos.
    """
    if img.ndim != 3 or img.shape[0] != 3:
        raise InputError(f"expected an image tensor [3,H,W], got shape {tuple(img.shape)}")
    if size < 1:
        raise InputError(f"crop size must be >= 1, got {size}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise InputError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    gen = _as_rng(rng)
    h, w = img.shape[1:]
    side = max(1, min(min(h, w), round(_uniform(gen, scale) * min(h, w))))
    top = int(gen.integers(0, h - side + 1))
    left = int(gen.integers(0, w - side + 1))
    crop = img[:, top : top + side, left : left + side]
    return resize(crop, (size, size), mode="bicubic")
