"""Image input and output with explicit limits.

Every photo that enters pfstorer (CLI, pipelines, the HTTP API) comes through :func:`load_image`,
so this is where untrusted bytes are judged: sizes are checked from the header *before* any pixel
is decoded (a 50 KB PNG can declare 50000x50000 pixels and ask for 7.5 GB), only a short list of
formats is handed to Pillow at all, and every refusal is a one-line :class:`~pfstorer.errors.
PFStorerError` that the serving layer maps to 413/415/400.

Colour: a photo with an embedded ICC profile (Display P3 from phones, Adobe RGB from cameras) is
converted to sRGB on decode, so the model and every output work in sRGB; outputs carry no profile,
which viewers read as sRGB. HEIC/HEIF (the iPhone default) needs the optional ``heic`` extra
(``pillow-heif``); AVIF is decoded by Pillow itself where it was built with libavif.

Convention everywhere in pfstorer: an image is a float32 tensor ``[3, H, W]`` (RGB, values in
[0, 1]); batched code uses ``[B, 3, H, W]``. Sizes are given as ``(height, width)`` like torch.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from typing import Literal

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, field_validator

from pfstorer.errors import InputError, TooLargeError, UnsupportedMediaError

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "ImageLimits",
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

MiB = 1024 * 1024
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"})
_PIL_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"})
OUTPUT_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output file extension -> format (what :func:`save_image` and the HTTP API write)."""
MEDIA_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
HEIC_EXTRA = "pip install 'pfstorer[heic]'"


def _heif_available() -> bool:
    """Register pillow-heif's opener if the ``heic`` extra is installed (once)."""
    global _HEIF
    if _HEIF is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _HEIF = False
        else:
            register_heif_opener()
            _HEIF = True
    return _HEIF


_HEIF: bool | None = None


def _decodable(formats: frozenset[str]) -> frozenset[str]:
    """The formats of ``formats`` this installation can decode (AVIF and HEIF depend on it)."""
    from PIL import features

    out = set(formats)
    if "AVIF" in out and not features.check("avif"):
        out.discard("AVIF")
    if "HEIF" in out and not _heif_available():
        out.discard("HEIF")
    return frozenset(out)


class ImageLimits(BaseModel):
    """What we are willing to decode; the defaults fit photos, not posters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = 32 * MiB
    max_pixels: int = 4096 * 4096
    min_side: int = 16
    formats: frozenset[str] = frozenset(_PIL_FORMATS)

    @field_validator("max_bytes", "max_pixels", "min_side")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: frozenset[str]) -> frozenset[str]:
        v = frozenset(f.upper() for f in v)
        unknown = v - _PIL_FORMATS
        if unknown or not v:
            raise ValueError(f"formats must be a non-empty subset of {sorted(_PIL_FORMATS)}")
        return v


DEFAULT_LIMITS = ImageLimits()


def _is_url(source: str) -> bool:
    return "://" in source


def read_bytes(source: str | os.PathLike[str], *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Read a local file or fsspec URL, refusing oversized files before reading them whole.

    Where the store reports a size we refuse up front; otherwise we read at most
    ``max_bytes + 1`` bytes, so a huge or endless stream cannot fill memory either.
    """
    src = os.fspath(source)
    try:
        if _is_url(src):
            fs, path = fsspec.core.url_to_fs(src)
        else:
            fs, path = LocalFileSystem(), os.path.abspath(src)
        try:
            info = fs.info(path)  # one round trip: existence, kind and size
        except (FileNotFoundError, PermissionError):
            raise
        except Exception:  # some stores (plain HTTP) cannot say: fall back to a bounded read
            info = {}
        if info.get("type") == "directory":
            raise InputError(f"{src} is a directory, not an image file")
        size = info.get("size")
        if size is not None and size > limits.max_bytes:
            raise TooLargeError(
                f"{src} is {size / MiB:.1f} MiB, over the limit of {limits.max_bytes / MiB:.1f} MiB"
            )
        with fs.open(path, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{src}: no such file") from None
    except PermissionError:
        raise InputError(f"{src}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{src} is a directory, not an image file") from None
    if len(data) > limits.max_bytes:
        raise TooLargeError(f"{src} is over the limit of {limits.max_bytes / MiB:.1f} MiB")
    return data


def _sniff(data: bytes) -> str:
    """Name the file type from its magic bytes, for messages and to gate Pillow's parsers."""
    head = data[:32]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace").strip().upper()
        return {"AVIF": "AVIF", "AVIS": "AVIF", "HEIC": "HEIC", "HEIX": "HEIC", "MIF1": "HEIF"}.get(
            brand, f"ISO media ({brand})"
        )
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"PK\x03\x04"):
        return "ZIP archive"
    stripped = head.lstrip()
    if stripped.startswith(b"<"):
        return "SVG/XML/HTML text"
    if not data:
        return "empty file"
    try:
        data[:4096].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown binary data"


# what Pillow raises on damaged files, varying by plugin
_CORRUPT = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError
)


def check_size(nbytes: int, limits: ImageLimits, name: str = "image") -> None:
    """Refuse a file of ``nbytes`` over ``limits.max_bytes`` (:class:`TooLargeError`); a caller that
    reads only a file's header checks its full size here."""
    if nbytes > limits.max_bytes:
        raise TooLargeError(
            f"{name} is {nbytes / MiB:.1f} MiB, over the limit of {limits.max_bytes / MiB:.1f} MiB"
        )


def _open(data: bytes, limits: ImageLimits, name: str) -> Image.Image:
    """Open (header only) after the byte-size and file-type checks, then check the pixel count."""
    check_size(len(data), limits, name)
    formats = _decodable(limits.formats)
    allowed = ", ".join(sorted(formats))
    kind = _sniff(data)
    if kind == "HEIC":
        kind = "HEIF"
    if kind == "HEIF" and "HEIF" in limits.formats and "HEIF" not in formats:
        raise UnsupportedMediaError(f"{name} is HEIC/HEIF, which needs the optional extra: {HEIC_EXTRA}")
    if kind not in formats:
        raise UnsupportedMediaError(f"{name} is {kind}, not a supported image type (accepted: {allowed})")
    try:
        im = Image.open(io.BytesIO(data), formats=sorted(formats))
    except Image.DecompressionBombError:
        raise TooLargeError(f"{name} declares too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is corrupt or truncated (unreadable {kind} header)") from None
    except _CORRUPT:
        raise InputError(f"{name} is corrupt or truncated") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        im.close()
        raise TooLargeError(f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,} pixels")
    if min(w, h) < limits.min_side:
        im.close()
        raise InputError(f"{name} is {w}x{h}, smaller than the minimum side of {limits.min_side} px")
    return im


def probe_image(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, name: str = "image") -> tuple[int, int]:
    """``(height, width)`` from the header, with every check :func:`decode_image` makes before it
    decodes pixels: what a front end needs to refuse a request without decoding the photo."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open(data, limits, name) as im:
            w, h = im.size
    return h, w


def decode_image(
    data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, name: str = "image", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode untrusted bytes to ``[3, H, W]`` RGB (float in [0, 1], or uint8), checking limits first.

    Order matters: byte size, then file type by magic bytes, then the header's pixel count, and
    only then are pixels decoded. EXIF orientation is applied (phones store rotated pixels);
    an ICC profile is converted to sRGB; alpha is composited on white; palette, grey, CMYK and
    16-bit images become 8-bit RGB.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open(data, limits, name) as im:
            try:
                im.load()
            except Image.DecompressionBombError:
                raise TooLargeError(f"{name} declares too many pixels to decode safely") from None
            except _CORRUPT:
                raise InputError(f"{name} is corrupt or truncated") from None
            try:
                im = ImageOps.exif_transpose(im) or im
            except Exception:  # a broken EXIF block should not cost the user the photo
                pass
            return from_pil(to_srgb(im), dtype)


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        from PIL import ImageCms

        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


_SRGB = None


def to_srgb(im: Image.Image) -> Image.Image:
    """Convert a photo with an embedded ICC profile to sRGB (relative colorimetric), dropping the
    profile; a photo without one, or tagged sRGB, is returned as it is.

    Wide-gamut photos (Display P3, Adobe RGB) otherwise look washed out or shifted once their
    profile is lost, which every output of pfstorer would do. A profile LittleCMS cannot read is
    ignored: a broken tag should not cost the user the photo.
    """
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return im
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(src) or "").lower().replace(" ", ""):
            return im
        alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
        base = im.convert({"RGBA": "RGB", "LA": "L"}.get(im.mode, im.mode))
        out = ImageCms.profileToProfile(base, src, _srgb_profile(), renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                        outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im
    if out is None:
        return im
    if alpha is not None:
        out.putalpha(alpha)
    out.info.pop("icc_profile", None)
    return out


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


def encode_image(img: torch.Tensor, fmt: OutputFormat = "PNG", quality: int = DEFAULT_QUALITY) -> bytes:
    """PNG (lossless; ``quality`` unused), JPEG (4:4:4 chroma) or WebP bytes, without metadata:
    identical tensors give identical bytes. ``quality`` in [1, 100]."""
    if not 1 <= quality <= 100:
        raise InputError(f"quality must be in [1, 100], got {quality}")
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
    """Write PNG, JPEG or WebP (chosen by extension) to a path or fsspec URL, creating local folders."""
    dst = os.fspath(dest)
    data = encode_image(img, output_format(dst), quality)
    if _is_url(dst):
        fs, path = fsspec.core.url_to_fs(dst)
    else:
        fs, path = LocalFileSystem(), os.path.abspath(dst)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def list_images(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand folders (one level, sorted, image extensions only); keep files as given.

    A path that does not exist is an error rather than an empty result, so a typo in a batch job
    fails fast instead of restoring nothing.
    """
    out: list[str] = []
    for p in paths:
        src = os.fspath(p)
        if _is_url(src):
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
