"""Images as tensors: decoding under explicit limits, encoding, resizing, listing.

Every photo that enters pfstorer (CLI, pipelines, the HTTP API) comes through :func:`load_image`;
the checks on untrusted bytes live in :mod:`pfstorer.image_checks` (no torch) and are
re-exported here. Outputs carry no colour profile, which viewers read as sRGB.

Convention everywhere in pfstorer: an image is a float32 tensor ``[3, H, W]`` (RGB, values in
[0, 1]); batched code uses ``[B, 3, H, W]``. Sizes are given as ``(height, width)`` like torch.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from typing import Literal

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pfstorer.errors import InputError
from pfstorer.image_checks import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    ImageLimits,
    is_url,
    check_size,
    decode_photo,
    probe_image,
    read_bytes,
    to_srgb,
)

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "ImageLimits",
    "check_quality",
    "check_size",
    "decode_image",
    "encode_image",
    "encode_png",
    "output_format",
    "probe_image",
    "to_srgb",
    "from_pil",
    "list_images",
    "load_image",
    "read_bytes",
    "resize",
    "save_image",
    "to_pil",
]

OUTPUT_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output file extension -> format (what :func:`save_image` and the HTTP API write)."""
MEDIA_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def decode_image(
    data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, name: str = "image", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode untrusted bytes to ``[3, H, W]`` RGB (float in [0, 1], or uint8), checking limits first
    (:func:`~pfstorer.image_checks.decode_photo`); alpha is composited on white; palette, grey,
    CMYK and 16-bit images become 8-bit RGB."""
    return from_pil(decode_photo(data, limits=limits, name=name), dtype)


def load_image(
    source: str | os.PathLike[str] | bytes, *, limits: ImageLimits = DEFAULT_LIMITS, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Read and decode one image (path, fsspec URL or raw bytes) under ``limits``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits=limits, name="image", dtype=dtype)
    name = os.fspath(source)
    return decode_image(read_bytes(name, limits=limits), limits=limits, name=name, dtype=dtype)


def _rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode to an ``H x W x 3`` uint8 array (alpha composited on white)."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float32)
        arr = arr / (65535.0 if arr.max(initial=0) > 255 else 255.0)
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0.0, 1.0)
        arr = np.round(arr * 255.0).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def from_pil(im: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pillow image (any mode) to ``[3, H, W]``: float in [0, 1], or uint8 (``dtype=torch.uint8``,
    4x smaller: what large restores use); no EXIF handling here."""
    arr = np.require(_rgb_array(im), requirements=["C", "W"])
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    if dtype == torch.uint8:
        return chw.contiguous()
    return chw.to(dtype).div_(255.0).contiguous()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] or float [0,1] pixels -> float32 [0,1]."""
    y = x.to(torch.float32, copy=True)  # always a copy: callers update bands in place
    return y.div_(255.0) if x.dtype == torch.uint8 else y


def from_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float [0,1] -> ``dtype`` (uint8: rounded to nearest), clamped."""
    x = x.clamp(0, 1)
    return x.mul_(255.0).round_().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


def _as_chw(img: torch.Tensor) -> torch.Tensor:
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3,H,W], got shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    if img.dtype == torch.uint8:
        return np.ascontiguousarray(_as_chw(img).detach().cpu().permute(1, 2, 0).numpy())
    img = _as_chw(img).detach().to("cpu", torch.float32)
    img = torch.nan_to_num(img, nan=0.0)
    u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(u8.permute(1, 2, 0).numpy())


def to_pil(img: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` tensor to an 8-bit RGB Pillow image (clamped, rounded to nearest)."""
    return Image.fromarray(_to_uint8(img))


def encode_png(img: torch.Tensor) -> bytes:
    """Lossless PNG bytes, identical for identical tensors (no timestamps or metadata)."""
    return encode_image(img, "PNG")


OutputFormat = Literal["PNG", "JPEG", "WEBP"]
DEFAULT_QUALITY = 92


def check_quality(quality: int) -> None:
    """Refuse a JPEG/WebP quality outside [1, 100] (callers with many photos check it before any work)."""
    if not 1 <= quality <= 100:
        raise InputError(f"quality must be in [1, 100], got {quality}")


def encode_image(img: torch.Tensor, fmt: OutputFormat = "PNG", quality: int = DEFAULT_QUALITY) -> bytes:
    """PNG (lossless; ``quality`` unused), JPEG (4:4:4 chroma) or WebP bytes, without metadata:
    identical tensors give identical bytes. ``quality`` in [1, 100]."""
    check_quality(quality)
    buf = io.BytesIO()
    im = to_pil(img)
    if fmt == "PNG":
        im.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "JPEG":
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "WEBP":
        im.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise InputError(f"cannot write {fmt}; output formats: PNG, JPEG, WEBP")
    return buf.getvalue()


def output_format(dest: str | os.PathLike[str]) -> OutputFormat:
    """The output format a file name asks for, by extension (a clear error otherwise)."""
    dst = os.fspath(dest)
    fmt = OUTPUT_FORMATS.get(os.path.splitext(dst)[1].lower())
    if fmt is None:
        raise InputError(f"{dst}: cannot tell the output format; use a .png, .jpg, .jpeg or .webp name")
    return fmt  # type: ignore[return-value]


def save_image(img: torch.Tensor, dest: str | os.PathLike[str], quality: int = DEFAULT_QUALITY) -> None:
    """Write PNG, JPEG or WebP (chosen by extension) to a path or fsspec URL, creating local folders.

    A local file appears whole or not at all (written beside it, then renamed), so a run stopped
    mid-write leaves no truncated image that a rerun with ``--skip-existing`` would keep.
    """
    dst = os.fspath(dest)
    data = encode_image(img, output_format(dst), quality)
    if is_url(dst):
        fs, path = fsspec.core.url_to_fs(dst)
    else:
        fs, path = LocalFileSystem(), os.path.abspath(dst)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    part = f"{path}.{os.getpid()}.part"
    try:
        with open(part, "wb") as fh:
            fh.write(data)
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(part)
        raise


def list_images(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand folders (one level, sorted, image extensions only); keep files as given.

    A path that does not exist is an error rather than an empty result, so a typo in a batch job
    fails fast instead of restoring nothing.
    """
    out: list[str] = []
    for p in paths:
        src = os.fspath(p)
        if is_url(src):
            fs, path = fsspec.core.url_to_fs(src)
            if fs.isdir(path):
                names = sorted(
                    (e for e in fs.ls(path, detail=True) if e.get("type") == "file"),
                    key=lambda e: os.path.basename(e["name"].rstrip("/")),
                )
                for e in names:
                    base = os.path.basename(e["name"].rstrip("/"))
                    if not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS:
                        out.append(src.rstrip("/") + "/" + base)  # keep the caller's spelling
            elif fs.exists(path):
                out.append(src)
            else:
                raise InputError(f"{src}: no such file or folder")
            continue
        if os.path.isdir(src):
            for base in sorted(os.listdir(src)):
                full = os.path.join(src, base)
                if (
                    not base.startswith(".")
                    and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS
                    and os.path.isfile(full)
                ):
                    out.append(full)
        elif os.path.exists(src):
            out.append(src)
        else:
            raise InputError(f"{src}: no such file or folder")
    return out


_MODES = ("bicubic", "bilinear", "nearest", "area")


def resize(
    img: torch.Tensor,
    size: tuple[int, int],
    mode: Literal["bicubic", "bilinear", "nearest", "area"] = "bicubic",
) -> torch.Tensor:
    """Resize ``[3,H,W]`` or ``[B,3,H,W]`` to ``size = (height, width)``, clamped to [0, 1].

    Antialiased when shrinking (otherwise downscaled faces alias into moire that the model then
    learns as "detail"); bicubic overshoot is clamped away.
    """
    if mode not in _MODES:
        raise InputError(f"unknown resize mode {mode!r} (known: {', '.join(_MODES)})")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise InputError(f"cannot resize to {h}x{w}")
    batched = img.ndim == 4
    x = img if batched else img.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected [3,H,W] or [B,3,H,W], got shape {tuple(img.shape)}")
    if tuple(x.shape[-2:]) == (h, w):
        y = x.clamp(0, 1)
    else:
        dtype = x.dtype
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if mode in ("bicubic", "bilinear"):
            down = h < x.shape[-2] or w < x.shape[-1]
            y = F.interpolate(xf, size=(h, w), mode=mode, align_corners=False, antialias=down)
        elif mode == "area":
            y = F.interpolate(xf, size=(h, w), mode="area")
        else:
            y = F.interpolate(xf, size=(h, w), mode="nearest-exact")
        y = y.clamp_(0, 1).to(dtype)
    return y if batched else y[0]
