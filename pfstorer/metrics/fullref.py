"""Full-reference metrics: PSNR, SSIM and ST-LPIPS (restored image against its ground truth)."""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pfstorer.metrics._image import ImageLike, as_float_rgb, rgb_to_y, same_size
from pfstorer.metrics._models import MetricUnavailableError, find_stlpips_weights

PSNR_BACKEND = "numpy, RGB, data range 1"
SSIM_BACKEND = "own (Wang et al. 2004), Y of BT.601, Gaussian 11x11 sigma 1.5, valid window"
STLPIPS_BACKEND = "stlpips-pytorch 0.0.2, alex, shift-tolerant (ST-LPIPS, not the paper's LPIPS)"


def psnr(pred: ImageLike, gt: ImageLike, *, channel: Literal["rgb", "y"] = "rgb") -> float:
    """Peak signal-to-noise ratio in dB over all RGB pixels (``channel="y"``: on luma only).

    Images are compared in [0, 1]; identical images give ``inf``.
    """
    p, g = as_float_rgb(pred), as_float_rgb(gt)
    same_size(p, g, "PSNR")
    if channel == "y":
        p, g = rgb_to_y(p), rgb_to_y(g)
    mse = float(np.mean((p - g) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(1.0 / mse))


@lru_cache(maxsize=4)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(pred: ImageLike, gt: ImageLike, *, channel: Literal["y", "rgb"] = "y") -> float:
    """Structural similarity on the BT.601 luma (as the face-restoration literature reports it).

    Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, mean over the valid
    region (no padding): the formulation of Wang et al. and basicsr. ``channel="rgb"`` averages the
    three channels instead. Images smaller than 11 px fall back to a window of their size.
    """
    p, g = as_float_rgb(pred), as_float_rgb(gt)
    same_size(p, g, "SSIM")
    if channel == "y":
        a, b = rgb_to_y(p)[None] * 255.0, rgb_to_y(g)[None] * 255.0
    else:
        a, b = p.transpose(2, 0, 1) * 255.0, g.transpose(2, 0, 1) * 255.0
    x = torch.from_numpy(np.ascontiguousarray(a))[:, None]  # [C, 1, H, W] float64
    y = torch.from_numpy(np.ascontiguousarray(b))[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    win = _gaussian_window(size, 1.5 * size / 11)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean())


_STUBBED = ("torchvision", "torchvision.models", "IPython", "torchsummary")
_LOCK = threading.Lock()


@contextlib.contextmanager
def _stub_modules() -> Iterator[None]:
    """stlpips-pytorch imports torchvision, IPython and torchsummary at module level but the
    shift-tolerant path uses none of them: put empty stand-ins in ``sys.modules`` only while it is
    imported (where a real one is already imported it is left alone) and remove them afterwards."""
    added: list[str] = []
    stubs = {
        "torchvision": {"models": None},
        "torchvision.models": {},
        "IPython": {"embed": lambda *a, **k: None},
        "torchsummary": {"summary": lambda *a, **k: None},
    }
    try:
        for name in _STUBBED:
            if name in sys.modules:
                continue
            mod = types.ModuleType(name)
            mod.__dict__.update(stubs[name])
            sys.modules[name] = mod
            added.append(name)
        if "torchvision" in added:
            sys.modules["torchvision"].models = sys.modules["torchvision.models"]  # type: ignore[attr-defined]
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@lru_cache(maxsize=2)
def _stlpips_model(net: str = "alex") -> torch.nn.Module:
    weights = find_stlpips_weights(net)
    with _LOCK, _stub_modules():
        try:
            from stlpips_pytorch import stlpips as _st
        except Exception as exc:  # a broken optional install must not break the other metrics
            raise MetricUnavailableError(f"ST-LPIPS package failed to import: {exc}") from exc
    # pretrained=False then our own checked load: the package loads with strict=False, which would
    # hide a weights file that does not match (random features and a meaningless score). Only the
    # ``lins.N`` aliases of ``linN`` (same parameters, registered twice) may be absent from the file.
    model = _st.LPIPS(pretrained=False, net=net, variant="shift_tolerant", verbose=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("lins.")]
    if missing or unexpected:
        raise MetricUnavailableError(
            f"ST-LPIPS weights {weights} do not match the network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def stlpips(pred: ImageLike, gt: ImageLike, *, net: str = "alex") -> float:
    """Shift-tolerant LPIPS distance (lower is closer); named ST-LPIPS in every table because it is
    not numerically the LPIPS of the paper (no offline LPIPS weights exist here)."""
    p, g = as_float_rgb(pred), as_float_rgb(gt)
    same_size(p, g, "ST-LPIPS")
    model = _stlpips_model(net)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None]  # noqa: E731
    with torch.inference_mode():
        d = model(to_t(p), to_t(g), normalize=True)
    return float(d.reshape(-1)[0])
