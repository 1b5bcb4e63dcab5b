"""pfstorer.colorfix: colour from the LQ source, detail from the restored image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfstorer.colorfix import color_fix, wavelet_decompose
from pfstorer.errors import InputError


def _gauss_blur(x: torch.Tensor, sigma: float = 6.0) -> torch.Tensor:
    """An independent low-pass (plain Gaussian) to judge the result with."""
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    b = x[None] if x.ndim == 3 else x
    c = b.shape[1]
    b = F.conv2d(F.pad(b, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    b = F.conv2d(F.pad(b, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return b[0] if x.ndim == 3 else b


def _scene(h: int = 96, w: int = 120) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(smooth colour field, fine texture, texture-free LQ with the right colours)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([0.35 + 0.3 * xx, 0.45 + 0.2 * yy, 0.5 - 0.2 * xx * yy])
    g = torch.Generator().manual_seed(0)
    texture = (torch.rand(1, h, w, generator=g) - 0.5) * 0.2  # pixel-level detail, zero-mean
    return smooth, texture, smooth.clone()


def test_none_is_identity_and_unknown_method() -> None:
    img = torch.rand(3, 20, 30)
    assert torch.equal(color_fix(img, torch.rand(3, 20, 30), "none"), img)
    with pytest.raises(InputError, match="histogram"):
        color_fix(img, img, "histogram")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        color_fix(img, torch.rand(2, 3, 20, 30), "adain")


def test_adain_takes_source_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    restored = 0.3 + 0.05 * torch.randn(2, 3, 40, 50, generator=g)
    source = torch.stack(
        [0.5 + s * torch.randn(3, 40, 50, generator=g) for s in (0.08, 0.1)]
    )  # two images, two different target statistics
    out = color_fix(restored, source, "adain")
    assert out.shape == restored.shape
    assert torch.allclose(out.mean(dim=(-2, -1)), source.mean(dim=(-2, -1)), atol=1e-4)
    std = source.std(dim=(-2, -1), unbiased=False)
    assert torch.allclose(out.std(dim=(-2, -1), unbiased=False), std, atol=1e-4)
    # structure is kept: a per-channel affine map of the restored image
    corr = torch.corrcoef(torch.stack([out[0, 0].ravel(), restored[0, 0].ravel()]))[0, 1]
    assert corr > 0.999


def test_wavelet_decomposition_is_exact() -> None:
    x = torch.rand(2, 3, 37, 53)
    high, low = wavelet_decompose(x)
    assert torch.allclose(high + low, x, atol=1e-5)
    assert low.std() < x.std() / 3  # low really is low-pass
    same = torch.rand(3, 33, 45)
    assert torch.allclose(color_fix(same, same, "wavelet"), same, atol=1e-5)


def test_wavelet_low_from_source_high_from_restored() -> None:
    smooth, texture, source = _scene()
    cast = torch.tensor([0.12, -0.08, 0.1]).view(3, 1, 1)
    restored = (smooth + cast + texture).clamp(0, 1)  # right detail, wrong colours
    out = color_fix(restored, source, "wavelet")
    assert out.shape == restored.shape and out.min() >= 0 and out.max() <= 1
    before = (_gauss_blur(restored) - _gauss_blur(source)).abs().mean()
    after = (_gauss_blur(out) - _gauss_blur(source)).abs().mean()
    assert before > 0.08 and after < 0.01  # the colour cast is gone
    detail = (out - _gauss_blur(out, 1.5))[0]
    wanted = (restored - _gauss_blur(restored, 1.5))[0]
    corr = torch.corrcoef(torch.stack([detail.ravel(), wanted.ravel()]))[0, 1]
    assert corr > 0.95  # the texture survived
    assert detail.std() > 0.8 * wanted.std()


def test_wavelet_is_local_where_adain_is_global() -> None:
    h, w = 64, 128
    source = torch.full((3, h, w), 0.5)
    source[0, :, : w // 2] += 0.2  # left half reddish
    source[2, :, w // 2 :] += 0.2  # right half bluish
    noise = torch.randn(3, h, w, generator=torch.Generator().manual_seed(2))
    restored = torch.full((3, h, w), 0.5) + 0.02 * noise
    wav = color_fix(restored, source, "wavelet")
    red_left, red_right = wav[0, :, :32].mean(), wav[0, :, -32:].mean()
    assert red_left - red_right > 0.15
    ada = color_fix(restored, source, "adain")
    assert abs(ada[0, :, :32].mean() - ada[0, :, -32:].mean()) < 0.05


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 17, 250), (2, 3, 31, 29)])
def test_any_size_and_batch_consistency(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    restored, source = torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)
    for method in ("wavelet", "adain"):
        out = color_fix(restored, source, method)  # type: ignore[arg-type]
        assert out.shape == restored.shape and out.min() >= 0 and out.max() <= 1
        if len(shape) == 4:
            for i in range(shape[0]):
                single = color_fix(restored[i], source[i], method)  # type: ignore[arg-type]
                assert torch.allclose(out[i], single, atol=1e-6)


def test_source_of_another_size_is_resized() -> None:
    smooth, texture, _ = _scene(96, 120)
    restored = (smooth + texture + 0.1).clamp(0, 1)
    small = F.interpolate(smooth[None], size=(24, 30), mode="area")[0]
    out = color_fix(restored, small, "wavelet")
    assert out.shape == restored.shape
    assert (_gauss_blur(out) - _gauss_blur(smooth)).abs().mean() < 0.02


def test_half_precision_keeps_dtype() -> None:
    restored = torch.rand(3, 24, 24).to(torch.bfloat16)
    out = color_fix(restored, torch.rand(3, 24, 24), "wavelet")
    assert out.dtype == torch.bfloat16
