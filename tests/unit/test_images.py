"""pfstorer.images: untrusted bytes are judged before decoding; I/O round-trips exactly."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pfstorer.errors import InputError, PFStorerError, TooLargeError, UnsupportedMediaError
from pfstorer.images import (
    DEFAULT_LIMITS,
    ImageLimits,
    decode_image,
    encode_png,
    from_pil,
    list_images,
    load_image,
    read_bytes,
    resize,
    save_image,
    to_pil,
)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)  # a sliver of (all-black) rows; the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if anything decodes pixels (Pillow's lazy load) during the test."""
    calls: list[str] = []

    def boom(self: ImageFile.ImageFile) -> None:
        calls.append(self.format or "?")
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    return calls


@pytest.mark.parametrize("side", [50_000, 5_000])
def test_decompression_bomb_refused_from_header(side: int, no_pixel_decoding: list[str]) -> None:
    # 50000^2 also trips Pillow's own bomb guard; 5000^2 (25 MP) is under Pillow's but over ours.
    data = _bomb_png(side, side)
    assert len(data) < 2000
    with pytest.raises(TooLargeError) as ei:
        decode_image(data, name="bomb.png")
    assert ei.value.status == 413
    assert no_pixel_decoding == []


def test_pixel_limit_is_configurable() -> None:
    data = _png_bytes(Image.new("RGB", (200, 100)))
    assert decode_image(data).shape == (3, 100, 200)
    with pytest.raises(TooLargeError, match="200x100"):
        decode_image(data, limits=ImageLimits(max_pixels=100 * 100))


def test_byte_limit_in_decode_and_read(tmp_path: Path) -> None:
    data = _png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))
    small = ImageLimits(max_bytes=len(data) - 1)
    with pytest.raises(TooLargeError):
        decode_image(data, limits=small)
    f = tmp_path / "a.png"
    f.write_bytes(data)
    with pytest.raises(TooLargeError):
        read_bytes(f, limits=small)
    with pytest.raises(TooLargeError):
        load_image(f, limits=small)
    assert read_bytes(f) == data


def test_read_refuses_known_size_without_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/limits/big.bin", b"x" * 5000)

    def no_open(*a: object, **k: object) -> None:
        raise AssertionError("opened a file that is known to be too large")

    monkeypatch.setattr(type(fs), "_open", no_open)
    with pytest.raises(TooLargeError):
        read_bytes("memory://limits/big.bin", limits=ImageLimits(max_bytes=1000))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "face.png"
    with pytest.raises(InputError, match="face.png") as ei:
        load_image(missing)
    assert ei.value.status == 400
    with pytest.raises(InputError, match="no such file"):
        read_bytes("memory://does/not/exist.png")
    with pytest.raises(InputError, match="directory"):
        read_bytes(tmp_path)


def test_text_file_is_unsupported_media(tmp_path: Path) -> None:
    f = tmp_path / "notes.png"
    f.write_text("hello, this is not an image\n")
    with pytest.raises(UnsupportedMediaError) as ei:
        load_image(f)
    assert ei.value.status == 415
    msg = str(ei.value)
    assert "text" in msg and "JPEG" in msg and "PNG" in msg and "\n" not in msg


def test_other_formats_are_refused_by_name() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    with pytest.raises(UnsupportedMediaError, match="GIF"):
        decode_image(buf.getvalue())
    jpeg = _jpeg_bytes(Image.new("RGB", (32, 32)))
    with pytest.raises(UnsupportedMediaError, match="JPEG"):
        decode_image(jpeg, limits=ImageLimits(formats={"PNG"}))
    with pytest.raises(UnsupportedMediaError):
        decode_image(b"")


def test_corrupt_and_truncated_jpeg() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _jpeg_bytes(Image.fromarray(arr), quality=90)
    with pytest.raises(InputError, match="corrupt or truncated") as ei:
        decode_image(data[: len(data) // 2])
    assert not isinstance(ei.value, UnsupportedMediaError)
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    png = _png_bytes(Image.fromarray(arr))
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_image(png[: len(png) - 300])


def test_too_small_image() -> None:
    with pytest.raises(InputError, match="smaller") as ei:
        decode_image(_png_bytes(Image.new("RGB", (8, 64))))
    assert not isinstance(ei.value, TooLargeError)
    thin = _png_bytes(Image.new("RGB", (8, 64)))
    assert decode_image(thin, limits=ImageLimits(min_side=8)).shape == (3, 64, 8)


def test_rgba_composited_on_white() -> None:
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    im.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    t = decode_image(_png_bytes(im))
    assert t.shape == (3, 20, 20) and t.dtype == torch.float32
    assert torch.equal(t[:, 0, 0], torch.ones(3))
    assert torch.allclose(t[:, 0, 1], torch.full((3,), 127 / 255), atol=1.5 / 255)
    assert torch.equal(t[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))


def test_palette_grey_and_16_bit_become_rgb() -> None:
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    p.info["transparency"] = 0
    assert torch.equal(decode_image(_png_bytes(p))[:, 0, 0], torch.ones(3))  # transparent index -> white
    g = decode_image(_png_bytes(Image.new("L", (16, 16), 51)))
    assert torch.allclose(g, torch.full((3, 16, 16), 0.2))
    arr16 = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    t16 = decode_image(_png_bytes(Image.fromarray(arr16)))
    assert torch.allclose(t16, torch.full((3, 16, 16), 0.5), atol=1 / 255)
    cmyk = decode_image(_jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95))
    assert cmyk.shape == (3, 16, 16) and cmyk[0].mean() > 0.9 and cmyk[1:].mean() < 0.1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    t = decode_image(buf.getvalue())
    assert t.shape == (3, 40, 20)
    assert t[0, 2, -3] > 0.9 and t[2, 2, -3] < 0.1  # red now top-right
    assert t[2, 2, 2] > 0.9  # top-left is blue


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF"])
def test_lossless_formats_decode_exactly(fmt: str) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    t = decode_image(buf.getvalue())
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_encode_png_round_trip_and_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 33, 47, generator=g)
    data = encode_png(img)
    assert data == encode_png(img.clone())  # deterministic bytes
    expected = (img.clamp(0, 1) * 255).round() / 255
    assert torch.equal(decode_image(data), expected)
    q = expected.clone()
    assert encode_png(q) == data  # quantised tensors round-trip bit for bit
    assert torch.equal(decode_image(encode_png(q)), q)
    wild = torch.tensor([-0.5, 0.5 / 255 + 1e-4, 2.0]).view(3, 1, 1).expand(3, 16, 16)
    assert decode_image(encode_png(wild))[:, 0, 0].mul(255).round().tolist() == [0.0, 1.0, 255.0]


def test_pil_round_trip() -> None:
    img = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(3))
    pil = to_pil(img)
    assert pil.mode == "RGB" and pil.size == (24, 16)
    assert torch.equal(from_pil(pil), (img * 255).round() / 255)


def test_save_image_png_jpeg_and_urls(tmp_path: Path) -> None:
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    dest = tmp_path / "deep" / "er" / "out.png"
    save_image(img, dest)
    assert dest.read_bytes() == encode_png(img)
    jpg = tmp_path / "new" / "out.jpg"
    save_image(img.mul(0.2).add(0.4), jpg)
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"
    assert (load_image(jpg) - img.mul(0.2).add(0.4)).abs().mean() < 0.03
    save_image(img, "memory://saved/img.png")
    assert torch.equal(load_image("memory://saved/img.png"), load_image(dest))
    with pytest.raises(InputError, match="format"):
        save_image(img, tmp_path / "out.gif")


def test_list_images(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ["b.JPG", "a.png", "c.webp", ".hidden.png", "notes.txt", "sub/d.png"]:
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.tiff"
    single.write_bytes(b"x")
    got = list_images([single, folder])
    assert got == [str(single), str(folder / "a.png"), str(folder / "b.JPG"), str(folder / "c.webp")]
    assert list_images([str(folder / "notes.txt")]) == [str(folder / "notes.txt")]  # files as given
    with pytest.raises(InputError, match="missing"):
        list_images([folder, tmp_path / "missing"])
    fs = fsspec.filesystem("memory")
    fs.pipe("/lst/z.png", b"x")
    fs.pipe("/lst/y.jpeg", b"x")
    fs.pipe("/lst/readme.md", b"x")
    assert list_images(["memory://lst"]) == ["memory://lst/y.jpeg", "memory://lst/z.png"]


def test_resize_antialias_clamp_and_batch() -> None:
    checker = (torch.arange(64).view(1, 64) + torch.arange(64).view(64, 1)) % 2
    img = checker.float().expand(3, 64, 64).clone()
    small = resize(img, (16, 16))
    assert small.shape == (3, 16, 16)
    assert (small - 0.5).abs().max() < 0.05  # antialiased: the 1 px checker averages to grey
    step = torch.zeros(3, 16, 16)
    step[:, :, 8:] = 1.0
    up = resize(step, (64, 40))
    assert up.shape == (3, 64, 40) and up.min() >= 0 and up.max() <= 1  # bicubic overshoot clamped
    batch = torch.rand(2, 3, 20, 30)
    assert resize(batch, (10, 15), mode="bilinear").shape == (2, 3, 10, 15)
    assert torch.equal(resize(batch, (20, 30)), batch)
    with pytest.raises(PFStorerError):
        resize(img, (16, 16), mode="lanczos")  # type: ignore[arg-type]


def test_limits_model() -> None:
    assert DEFAULT_LIMITS.max_bytes == 32 * 1024 * 1024 and DEFAULT_LIMITS.max_pixels == 4096 * 4096
    assert DEFAULT_LIMITS.formats == {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"}
    with pytest.raises(Exception):
        DEFAULT_LIMITS.max_bytes = 1  # type: ignore[misc]  # frozen
    with pytest.raises(ValueError):
        ImageLimits(formats={"GIF"})


def test_real_photo(lfw_bench: dict[str, list[Path]]) -> None:
    path = next(iter(lfw_bench.values()))[0]
    img = load_image(path)
    assert img.shape == (3, 128, 128) and 0 <= img.min() and img.max() <= 1
    assert torch.equal(load_image(path.read_bytes()), img)
    assert torch.equal(load_image(f"file://{path}"), img)


# -- colour management and formats ----------------------------------------------------------------
def _tagged(fmt: str, icc: bytes, rgb: tuple[int, int, int] = (100, 150, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), rgb).save(buf, format=fmt, icc_profile=icc, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_wide_gamut_photos_are_converted_to_srgb() -> None:
    from PIL import ImageCms

    from _icc import wide_gamut_profile

    icc = wide_gamut_profile()
    # what LittleCMS makes of the colour, independently of decode_image
    src = Image.new("RGB", (1, 1), (100, 150, 200))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    want = ImageCms.profileToProfile(src, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb,
                                     renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC).getpixel((0, 0))
    assert max(abs(a - b) for a, b in zip(want, (100, 150, 200))) >= 10  # the profile matters
    got = decode_image(_tagged("PNG", icc), dtype=torch.uint8)[:, 0, 0].tolist()
    assert got == list(want)
    jpeg = decode_image(_tagged("JPEG", icc), dtype=torch.uint8)[:, 0, 0].tolist()
    assert max(abs(a - b) for a, b in zip(jpeg, want)) <= 2  # JPEG rounding only
    # an sRGB-tagged photo keeps its values bit for bit; an untagged one too
    assert decode_image(_tagged("PNG", srgb.tobytes()), dtype=torch.uint8)[:, 0, 0].tolist() == [100, 150, 200]
    # a damaged profile is ignored, not fatal
    assert decode_image(_tagged("PNG", b"not a profile" * 20), dtype=torch.uint8)[:, 0, 0].tolist() == [100, 150, 200]


def test_avif_decodes_and_heic_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import features

    import pfstorer.image_checks as image_checks

    if features.check("avif"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), (200, 10, 10)).save(buf, format="AVIF", quality=100)
        got = decode_image(buf.getvalue(), dtype=torch.uint8)
        assert got.shape == (3, 32, 40) and abs(int(got[0, 5, 5]) - 200) <= 4
    pytest.importorskip("pillow_heif")  # the dev extra installs it
    from pillow_heif import register_heif_opener

    register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="HEIF", quality=95)
    got = decode_image(buf.getvalue(), dtype=torch.uint8)
    assert got.shape == (3, 48, 64) and max(abs(int(a) - b) for a, b in zip(got[:, 5, 5], (10, 200, 30))) <= 4
    # an ISO-BMFF 'heic' file without pillow-heif: 415 that says what to install
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\0" * 4 + b"mif1heic" + b"\0" * 64
    monkeypatch.setattr(image_checks, "_HEIF", False)
    with pytest.raises(UnsupportedMediaError, match=r"pfstorer\[heic\]") as info:
        decode_image(heic)
    assert info.value.status == 415


@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"),
                                        (".webp", b"RIFF")])
def test_output_format_by_extension_with_quality(tmp_path: Path, ext: str, magic: bytes) -> None:
    from pfstorer.images import encode_image, output_format

    ramp = torch.linspace(0, 1, 48)
    img = torch.stack([ramp[None, :].expand(48, 48), ramp[:, None].expand(48, 48), 1 - ramp[None, :].expand(48, 48)])
    img = img + 0.05 * torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(5))
    img = img.clamp(0, 1)
    dest = tmp_path / f"out{ext}"
    save_image(img, dest, quality=80)
    data = dest.read_bytes()
    assert data.startswith(magic) and data == encode_image(img, output_format(dest), 80)
    assert (load_image(dest) - img).abs().mean() < 0.03
    if ext != ".png":  # quality changes the bytes of lossy formats only
        assert len(encode_image(img, output_format(dest), 20)) < len(data)
    with pytest.raises(InputError, match="quality"):
        encode_image(img, "JPEG", 0)


def test_probe_image_checks_like_decode_without_decoding() -> None:
    from pfstorer.images import probe_image

    data = _png_bytes(Image.new("RGB", (50, 30)))
    assert probe_image(data) == (30, 50)
    with pytest.raises(TooLargeError):
        probe_image(data, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(UnsupportedMediaError):
        probe_image(b"GIF89a" + b"\0" * 100)
