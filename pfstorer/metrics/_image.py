"""Image conversions shared by the metrics: one place that decides ranges, channel order and Y.

Metrics accept our convention (``torch.float32 [3, H, W]`` RGB in [0, 1]) and, because many callers
hold OpenCV/PIL arrays, ``H x W x 3`` numpy arrays too (uint8 in [0, 255], float in [0, 1]) and
paths (decoded with :func:`pfstorer.images.load_image`).
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch

from pfstorer.errors import InputError

ImageLike = Union[torch.Tensor, np.ndarray, str, os.PathLike]


def _load(path: str | os.PathLike) -> torch.Tensor:
    from pfstorer.images import load_image  # lazy: keeps `import pfstorer.metrics` light

    return load_image(path)


def as_float_rgb(img: ImageLike) -> np.ndarray:
    """Any accepted image to ``H x W x 3`` float64 RGB in [0, 1] (grey is repeated to 3 channels)."""
    if isinstance(img, (str, os.PathLike)):
        img = _load(img)
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu", torch.float64)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise InputError(f"expected an image tensor [3, H, W], got shape {tuple(img.shape)}")
        arr = t.permute(1, 2, 0).numpy()
    elif isinstance(img, np.ndarray):
        arr = img
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise InputError(f"expected an H x W x 3 image array, got shape {img.shape}")
        arr = arr[..., :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float64) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float64) / 65535.0
        else:
            arr = arr.astype(np.float64)
    else:
        raise InputError(f"expected an image tensor, array or path, got {type(img).__name__}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError("empty image")
    return np.clip(np.nan_to_num(arr), 0.0, 1.0)


def as_uint8_rgb(img: ImageLike) -> np.ndarray:
    """Any accepted image to a contiguous ``H x W x 3`` uint8 RGB array (what dlib and OpenCV want)."""
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    return np.ascontiguousarray(np.round(as_float_rgb(img) * 255.0).astype(np.uint8))


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Luma of MATLAB's ``rgb2ycbcr`` (BT.601, studio range 16..235), input and output in [0, 1].

    This is the Y the super-resolution literature (and basicsr) evaluates SSIM and NIQE on.
    """
    return (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def same_size(pred: np.ndarray, gt: np.ndarray, metric: str) -> None:
    """Full-reference metrics compare pixel by pixel: refuse mismatched sizes with a clear message."""
    if pred.shape != gt.shape:
        raise InputError(
            f"{metric}: restored image is {pred.shape[1]}x{pred.shape[0]} but ground truth is "
            f"{gt.shape[1]}x{gt.shape[0]}; they must be the same size"
        )
