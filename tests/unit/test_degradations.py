"""pfstorer.degradations: seedable, documented, and heavy really is worse than light."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import pfstorer.degradations as D
from pfstorer.errors import InputError
from pfstorer.images import load_image, resize


def _face() -> torch.Tensor:
    """A smooth synthetic 'photo' with edges, for tests that need no shared data."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 80), indexing="ij")
    disc = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).float()
    return torch.stack([0.2 + 0.6 * disc, 0.3 + 0.4 * xx, 0.8 - 0.5 * yy]).clamp(0, 1)


def _only_noise(kind: str, shot: float = 5e-3, sigma: float = 10.0) -> D.DegradationConfig:
    """A level that does nothing but one kind of noise (to look at the noise alone)."""
    stage = D.StageConfig(
        blur=D.BlurConfig(p=0.0, kinds={"iso": 1.0}, sigma=(1, 1), motion_length=(2, 2)),
        resize_p=0.0,
        resize_scale=(1.0, 1.0),
        noise=D.NoiseConfig(
            p=1.0, kinds={kind: 1.0}, gaussian_sigma=(sigma, sigma), gray_p=0.0, isp_shot=(shot, shot)
        ),
        jpeg_p=0.0,
        jpeg_quality=(90, 90),
    )
    return D.DegradationConfig(name=f"only-{kind}", first=stage, second=stage.model_copy(update={"p": 0.0}))


@pytest.mark.parametrize("level", ["light", "heavy"])
def test_same_seed_bit_identical_different_seed_differs(level: str) -> None:
    img = _face()
    a = D.degrade(img, level, 123)
    b = D.degrade(img, level, np.random.default_rng(123))
    assert torch.equal(a, b)
    others = [D.degrade(img, level, s) for s in (1, 2, 3)]
    assert all(not torch.equal(a, o) for o in others)
    assert torch.equal(img, _face())  # input untouched


def test_only_the_given_rng_is_used() -> None:
    """Two identities with their own generators, interleaved, see what they would see alone."""
    img = _face()

    def run(rng: np.random.Generator, level: str) -> torch.Tensor:
        return D.synthesize_lq(img, rng, levels=(level,), p_hq=0.0)

    ga, gb = np.random.default_rng(7), np.random.default_rng(8)
    alone_a = [run(ga, "heavy") for _ in range(3)]
    alone_b = [run(gb, "light") for _ in range(3)]
    ga, gb = np.random.default_rng(7), np.random.default_rng(8)
    mixed_a, mixed_b = [], []
    for i in range(3):
        np.random.seed(i)  # stir the global state: it must not matter
        torch.manual_seed(100 + i)
        np.random.random(5)
        torch.rand(5)
        mixed_b.append(run(gb, "light"))
        mixed_a.append(run(ga, "heavy"))
    assert all(torch.equal(x, y) for x, y in zip(alone_a + alone_b, mixed_a + mixed_b))
    assert not torch.equal(alone_a[0], alone_a[1])


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 16, 41), (3, 57, 23), (3, 128, 128)])
def test_shape_range_dtype_for_any_size(shape: tuple[int, int, int]) -> None:
    img = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    for level in ("light", "heavy", D.HEAVY):
        for seed in range(3):
            out = D.degrade(img, level, seed)
            assert out.shape == img.shape and out.dtype == torch.float32
            assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_large_photo(shared_data: Path) -> None:
    path = sorted((shared_data / "wild" / "person1").iterdir())[0]
    img = load_image(path)
    out = D.degrade(img, "heavy", 0)
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    assert (out - img).abs().mean() > 0.01


def test_batched_degrade_draws_per_image() -> None:
    img = _face()
    batch = torch.stack([img, img])
    out = D.degrade(batch, "light", 5)
    assert out.shape == batch.shape
    assert not torch.equal(out[0], out[1])
    gen = np.random.default_rng(5)
    assert torch.equal(out[0], D.degrade(img, "light", gen))
    assert torch.equal(out[1], D.degrade(img, "light", gen))


def test_levels_by_name_and_unknown_level() -> None:
    assert D.LEVELS == {"light": D.LIGHT, "heavy": D.HEAVY}
    assert torch.equal(D.degrade(_face(), "LIGHT", 1), D.degrade(_face(), D.LIGHT, 1))
    with pytest.raises(InputError, match="medium"):
        D.degrade(_face(), "medium", 0)


def test_config_validation() -> None:
    stage = D.HEAVY.first
    with pytest.raises(ValidationError):
        stage.model_validate({**stage.model_dump(), "jpeg_p": 1.5})
    with pytest.raises(ValidationError):
        D.BlurConfig(p=1.0, kinds={"gaussian-ish": 1.0}, sigma=(1, 2), motion_length=(2, 3))
    with pytest.raises(ValidationError):
        D.BlurConfig(p=1.0, kinds={"iso": 1.0}, sigma=(2, 1), motion_length=(2, 3))
    with pytest.raises(ValidationError):
        D.BlurConfig(p=1.0, kinds={"median": 1.0}, sigma=(1, 2), motion_length=(2, 3), median_sizes=(7,))


def test_parameter_table_documented() -> None:
    table = D.parameter_table()
    assert table in (D.__doc__ or "")  # the docstring shows the parameters the code uses
    assert table.splitlines()[0] == "| parameter | light | heavy |"


def _psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    x, y = a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()
    return (
        float(peak_signal_noise_ratio(x, y, data_range=1.0)),
        float(structural_similarity(x, y, channel_axis=2, data_range=1.0)),
    )


def test_heavy_is_worse_than_light_on_faces(lfw_bench: dict[str, list[Path]]) -> None:
    photos = [load_image(paths[-1]) for paths in list(lfw_bench.values())[:10]]
    scores: dict[str, list[tuple[float, float]]] = {"light": [], "heavy": []}
    for i, img in enumerate(photos):
        for level in scores:
            scores[level].append(_psnr_ssim(img, D.degrade(img, level, 1000 + i)))
    with np.errstate(divide="ignore"):
        assert math.isinf(_psnr_ssim(photos[0], photos[0])[0])  # clean: infinite PSNR
    light_psnr, light_ssim = np.mean(scores["light"], axis=0)
    heavy_psnr, heavy_ssim = np.mean(scores["heavy"], axis=0)
    assert heavy_psnr + 3 < light_psnr < 40  # light degrades, heavy clearly more
    assert heavy_ssim + 0.1 < light_ssim < 0.98
    # per photo too, not just on average
    assert sum(h[0] < li[0] for h, li in zip(scores["heavy"], scores["light"])) >= 9


def test_p_hq_passes_the_clean_image() -> None:
    img = _face()
    rng = np.random.default_rng(0)
    assert all(torch.equal(D.synthesize_lq(img, rng, p_hq=1.0), img) for _ in range(5))
    assert not any(torch.equal(D.synthesize_lq(img, rng, p_hq=0.0), img) for _ in range(5))
    tiny = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    clean = sum(torch.equal(D.synthesize_lq(tiny, rng, p_hq=0.25), tiny) for _ in range(200))
    assert 30 <= clean <= 75  # ~50 expected
    with pytest.raises(InputError):
        D.synthesize_lq(img, rng, levels=())
    batch = D.synthesize_lq(torch.stack([img, img]), rng, levels=(D.LIGHT,), p_hq=0.0)
    assert batch.shape == (2, *img.shape)


def test_motion_kernel() -> None:
    for length, angle in [(7.0, 0.0), (9.0, math.pi / 2), (12.5, 0.7), (3.0, 2.5)]:
        k = D.motion_kernel(length, angle)
        assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert abs(float(k.sum()) - 1.0) < 1e-5 and k.min() >= 0
        assert np.allclose(k, k[::-1, ::-1], atol=1e-6)  # centred: no shift of the image
        # spread along the streak matches a uniform segment of that length
        r = k.shape[0] // 2
        ys, xs = np.mgrid[-r : r + 1, -r : r + 1]
        along = xs * math.cos(angle) - ys * math.sin(angle)
        across = xs * math.sin(angle) + ys * math.cos(angle)
        std_along = math.sqrt(float((k * along**2).sum()))
        assert abs(std_along - (length - 1) / math.sqrt(12)) < 0.35
        assert math.sqrt(float((k * across**2).sum())) < 0.5
    horizontal = D.motion_kernel(7.0, 0.0)
    c = horizontal.shape[0] // 2
    assert abs(float(horizontal[c].sum()) - 1.0) < 1e-5  # all mass on the middle row


def test_gaussian_kernels() -> None:
    iso = D.blur_kernel(2.0)
    assert iso.shape == (13, 13) and abs(float(iso.sum()) - 1) < 1e-5
    assert np.allclose(iso, iso.T) and iso[6, 6] == iso.max()
    aniso = D.blur_kernel(3.0, 0.8, theta=0.0)
    assert np.allclose(D.blur_kernel(3.0, 0.8, theta=math.pi / 2), aniso.T, atol=1e-6)
    assert aniso[aniso.shape[0] // 2].sum() > aniso[:, aniso.shape[1] // 2].sum()  # wide along x
    assert D.blur_kernel(10.0, max_kernel=21).shape == (21, 21)
    # generalized Gaussian: beta < 1 has heavy tails, beta > 1 is a plateau with almost none
    ys, xs = np.mgrid[-6:7, -6:7]
    far = np.hypot(xs, ys) > 3.0  # beyond 1.5 sigma
    tails = [float(D.blur_kernel(2.0, beta=b)[far].sum()) for b in (0.5, 1.0, 4.0)]
    assert tails[0] > tails[1] > tails[2] and tails[2] < 1e-3


def test_median_blur() -> None:
    flat = np.full((3, 20, 20), 0.5, dtype=np.float32)
    spiky = flat.copy()
    spiky[:, 7, 9] = 1.0
    spiky[1, 12, 3] = 0.0
    for size in (3, 5):
        assert np.array_equal(D.median_blur(spiky, size), flat)  # impulses removed exactly
    step = np.zeros((3, 20, 20), dtype=np.float32)
    step[:, :, 10:] = 1.0
    assert np.array_equal(D.median_blur(step, 5), step)  # edges kept exactly, unlike a blur
    gauss = D._convolve(step, D.blur_kernel(1.0))
    assert not np.allclose(gauss, step, atol=0.05)
    line = np.zeros((1, 9, 9), dtype=np.float32)
    line[0, 4, :] = 1.0  # a one-pixel line is removed by the median (it is thinner than half)
    assert D.median_blur(line, 3).max() == 0.0


def test_blur_convolution_matches_direct() -> None:
    from scipy.ndimage import convolve

    x = np.random.default_rng(0).random((3, 30, 41), dtype=np.float32)
    k = D.motion_kernel(6.0, 0.4)
    ref = np.stack([convolve(c, k, mode="mirror") for c in x])
    assert np.allclose(D._convolve(x, k), ref, atol=1e-5)


def test_isp_noise_is_signal_dependent_and_colour_correlated() -> None:
    def linear(x: torch.Tensor) -> np.ndarray:
        return D._srgb_to_linear(x.numpy())

    dark, bright = torch.full((3, 64, 64), 0.2), torch.full((3, 64, 64), 0.8)
    isp, gauss = _only_noise("isp"), _only_noise("gaussian")
    var_isp = [linear(D.degrade(im, isp, 0))[1].var() for im in (dark, bright)]
    var_gauss = [D.degrade(im, gauss, 0).numpy()[1].var() for im in (dark, bright)]
    assert var_isp[1] > 5 * var_isp[0]  # shot noise grows with the signal (in linear light)
    assert 0.7 < var_gauss[1] / var_gauss[0] < 1.4  # plain Gaussian noise does not
    mid = torch.full((3, 64, 64), 0.5)
    n_isp = D.degrade(mid, isp, 1).numpy() - 0.5
    n_gauss = D.degrade(mid, gauss, 1).numpy() - 0.5

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    # the colour matrix mixes the raw channels' noise: colour noise correlated across channels
    assert abs(corr(n_isp[0], n_isp[1])) > 0.15
    assert abs(corr(n_gauss[0], n_gauss[1])) < 0.1
    # demosaicking interpolates each sensor sample into its neighbours: spatially correlated
    assert corr(n_isp[1, :, :-1], n_isp[1, :, 1:]) > 0.2
    assert abs(corr(n_gauss[1, :, :-1], n_gauss[1, :, 1:])) < 0.1
    # white balance is undone: no colour cast on average
    assert np.abs(n_isp.mean(axis=(1, 2))).max() < 0.02


def test_random_crop_resize() -> None:
    h, w = 60, 90
    coords = (torch.arange(h).view(h, 1) * 1000 + torch.arange(w).view(1, w)).float()
    img = torch.stack([coords, coords, coords]) / 1e5  # every pixel unique, in [0,1]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(8):
        out = D.random_crop_resize(img, 30, rng, scale=(0.5, 0.5))  # 30 px crop, no resampling
        assert out.shape == (3, 30, 30)
        top, left = divmod(int(round(float(out[0, 0, 0]) * 1e5)), 1000)
        assert torch.allclose(out, img[:, top : top + 30, left : left + 30])
        assert 0 <= top <= h - 30 and 0 <= left <= w - 30
        seen.add((top, left))
    assert len(seen) > 4  # positions vary
    a = D.random_crop_resize(img, 24, np.random.default_rng(3))
    assert torch.equal(a, D.random_crop_resize(img, 24, np.random.default_rng(3)))
    sq = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(D.random_crop_resize(sq, 20, rng, scale=(1.0, 1.0)), resize(sq, (20, 20)))
    with pytest.raises(InputError):
        D.random_crop_resize(img, 24, rng, scale=(0.0, 1.2))
