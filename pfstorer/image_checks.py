"""Judging untrusted image bytes, without torch: limits, file types, headers, pixels.

Every photo that enters pfstorer is judged here first: sizes are checked from the header *before*
any pixel is decoded (a 50 KB PNG can declare 50000x50000 pixels and ask for 7.5 GB), only a
short list of formats is handed to Pillow at all, and every refusal is a one-line
:class:`~pfstorer.errors.PFStorerError` that the serving layer maps to 413/415/400.

This module imports no torch, so manifest validation workers start in a fraction of a second;
:mod:`pfstorer.images` builds the tensor side on it.

Colour: a photo with an embedded ICC profile (Display P3 from phones, Adobe RGB from cameras) is
converted to sRGB on decode, so the model and every output work in sRGB. HEIC/HEIF (the iPhone
default) needs the optional ``heic`` extra (``pillow-heif``); AVIF is decoded by Pillow itself
where it was built with libavif.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, field_validator

from pfstorer.errors import InputError, TooLargeError, TooSmallError, UnsupportedMediaError

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "ImageLimits",
    "check_size",
    "decode_photo",
    "is_url",
    "probe_image",
    "read_bytes",
    "to_srgb",
]

MiB = 1024 * 1024
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"})
_PIL_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"})
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


def is_url(source: str) -> bool:
    """Whether ``source`` names an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in source


def read_bytes(source: str | os.PathLike[str], *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Read a local file or fsspec URL, refusing oversized files before reading them whole.

    Where the store reports a size we refuse up front; otherwise we read at most
    ``max_bytes + 1`` bytes, so a huge or endless stream cannot fill memory either.
    """
    src = os.fspath(source)
    try:
        if is_url(src):
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
        # only the parser of the sniffed type: for PNG, JPEG and BMP Pillow then loads none of its
        # ~40 other plugins (tens of ms of every start-up)
        im = Image.open(io.BytesIO(data), formats=[kind])
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
        raise TooSmallError(f"{name} is {w}x{h}, smaller than the minimum side of {limits.min_side} px")
    return im


def probe_image(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, name: str = "image") -> tuple[int, int]:
    """``(height, width)`` from the header, with every check :func:`decode_image` makes before it
    decodes pixels: what a front end needs to refuse a request without decoding the photo."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open(data, limits, name) as im:
            w, h = im.size
    return h, w


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


def decode_photo(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, name: str = "image") -> Image.Image:
    """Decode untrusted bytes to a Pillow image in sRGB, upright, checking limits first.

    Order matters: byte size, then file type by magic bytes, then the header's pixel count, and
    only then are pixels decoded. EXIF orientation is applied (phones store rotated pixels) and
    an ICC profile is converted to sRGB.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(data, limits, name)
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
        return to_srgb(im)
