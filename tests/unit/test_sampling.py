"""Streaming restoration internals (peak memory bounded by the tile size) and the samplers.

``restore_batch`` never builds full-size temporaries: the sampler step runs in place on row
bands (:func:`pfstorer.tiling.blend_rows`), the upscale and the colour fix work band by band, and
uint8 photos stay uint8. Each check below compares the streamed computation with the plain
whole-image one, so a band-edge bug (a wrong halo, a misplaced row, noise that depends on how the
image was cut) shows as a difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfstorer.colorfix import BAND, LEVELS, color_fix
from pfstorer.model import load_base
from pfstorer.sampling import make_scheduler, restore, sampler_updates, upscale
from pfstorer.tiling import blend_rows, gaussian_weights, tile_grid


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampler_updates_replicate_diffusers_steps(tiny, sampler, steps):
    sched = make_scheduler(tiny, sampler)
    sched.set_timesteps(steps)
    ups = sampler_updates(tiny, sampler, steps)
    assert [u.t for u in ups] == [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for u in ups:
        ref = sched.step(eps, torch.tensor(u.t), x, generator=torch.Generator().manual_seed(1)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        ours = x * u.a + eps * u.b + u.c * noise
        assert torch.allclose(ours, ref, atol=1e-5), (sampler, u)
    assert (ups[-1].c == 0 or ups[-1].c < 1e-9) and all(u.c == 0 for u in ups if sampler == "ddim")


def test_blend_rows_streams_bands_that_equal_a_whole_canvas_blend():
    h, w, tile, overlap = 70, 45, 16, 5
    tiles = tile_grid(h, w, tile, overlap)
    g = torch.Generator().manual_seed(0)
    answers = {t: torch.randn(2, 3, tile, tile, generator=g) for t in tiles}  # per tile, per batch row
    acc, wsum = torch.zeros(2, 3, h, w), torch.zeros(1, 1, h, w)
    for (y, x, th, tw), a in answers.items():
        acc[:, :, y : y + th, x : x + tw] += a * gaussian_weights(th, tw)
        wsum[:, :, y : y + th, x : x + tw] += gaussian_weights(th, tw)
    expected = acc / wsum
    got = torch.full((2, 3, h, w), float("nan"))
    flushed = []

    def run(chunk):
        return torch.stack([answers[t][i] for i, t in chunk])

    def flush(y0, y1, rows):
        flushed.append((y0, y1))
        got[:, :, y0:y1] = rows

    blend_rows(tiles, run, flush, batch=2, channels=3, out_height=h, out_width=w, tile_batch=3)
    assert torch.allclose(got, expected, atol=1e-6)
    # rows leave in order, exactly once, and the open band is never taller than one tile
    assert flushed[0][0] == 0 and flushed[-1][1] == h
    assert all(a[1] == b[0] for a, b in zip(flushed, flushed[1:]))
    assert max(y1 - y0 for y0, y1 in flushed) <= tile


def test_ddpm_noise_does_not_depend_on_how_the_image_is_cut(tiny, monkeypatch):
    """With a denoiser whose answer does not depend on the tile (per-pixel), any tiling must give
    the same DDPM sample: the step's noise is drawn per (seed, step, row), not per band."""
    monkeypatch.setattr(tiny, "denoise", lambda z, t, lq, pb=None: 0.5 * z + 0.1 * lq)
    img = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(2))
    run = dict(seed=4, steps=3, sampler="ddpm", color_fix="none")
    whole = restore(tiny, img, tile=64, **run)
    for tile, overlap, tb in ((16, 4, 3), (24, 8, 8), (32, 0, 1)):
        assert torch.allclose(restore(tiny, img, tile=tile, overlap=overlap, tile_batch=tb, **run), whole, atol=1e-5)
    assert not torch.allclose(restore(tiny, img, tile=64, **{**run, "seed": 5}), whole, atol=1e-3)


def test_unset_overlap_is_the_presets_fraction_of_the_tile_in_use(tiny, monkeypatch):
    img = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(7))
    run = dict(seed=1, steps=1, color_fix="none")
    quarter = restore(tiny, img, tile=32, **run)  # tiny: a quarter, 8 px of a 32 px tile
    assert torch.equal(quarter, restore(tiny, img, tile=32, overlap=8, **run))
    assert not torch.allclose(quarter, restore(tiny, img, tile=32, overlap=16, **run), atol=1e-4)
    half = tiny.config.model_copy(update={"sampling": tiny.config.sampling.model_copy(update={"overlap": 0.5})})
    monkeypatch.setattr(tiny, "config", half)
    assert torch.equal(restore(tiny, img, tile=32, **run), restore(tiny, img, tile=32, overlap=16, **run))
    assert torch.equal(restore(tiny, img, tile=16, **run), restore(tiny, img, tile=16, overlap=8, **run))


def test_uint8_photo_restores_to_the_rounded_float_result(tiny):
    u8 = (torch.rand(3, 30, 44, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    run = dict(seed=1, steps=2, tile=16, overlap=4)  # scale 1: with --scale the uint8 path rounds the LQ
    as_float = restore(tiny, u8.float() / 255, **run)
    as_u8 = restore(tiny, u8, **run)
    assert as_u8.dtype == torch.uint8 and as_float.dtype == torch.float32
    assert as_u8.shape == as_float.shape == (3, 30, 44)
    assert torch.equal(as_u8, (as_float.clamp(0, 1) * 255).round().to(torch.uint8))


def test_latent_preset_decodes_uint8_into_the_output_within_a_level_or_two():
    """Latent presets decode into the output buffer and colour-fix it in place: with uint8 photos
    the decoded image is rounded once more than in float, nothing else differs."""
    model = load_base("tiny-latent")
    u8 = (torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(6)) * 255).round().to(torch.uint8)
    for method in ("wavelet", "adain", "none"):
        run = dict(seed=2, steps=2, tile=32, overlap=8, color_fix=method)
        as_float = restore(model, u8.float() / 255, **run)
        as_u8 = restore(model, u8, **run)
        diff = (as_u8.float() - (as_float * 255).round()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.5, (method, diff.max())
        if method == "none":
            assert torch.equal(as_u8, (as_float * 255).round().to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_banded_upscale_matches_torch_bicubic(dtype):
    x = torch.rand(1, 3, 2 * BAND // 3 + 5, 21, generator=torch.Generator().manual_seed(4))  # x2: 3 bands
    if dtype == torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    for scale in (2, 2.5, 1.3):
        up = upscale(x, scale)
        oh, ow = round(x.shape[-2] * scale), round(x.shape[-1] * scale)
        ref = F.interpolate(x.float(), size=(oh, ow), mode="bicubic", align_corners=False)
        assert up.dtype == dtype and up.shape[-2:] == (oh, ow)
        if dtype == torch.uint8:
            assert (up.float() - ref.clamp(0, 255).round()).abs().max() <= 1
        else:
            assert torch.allclose(up, ref.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_banded_colour_fix_equals_the_whole_image_formula(method):
    g = torch.Generator().manual_seed(5)
    h = 2 * BAND + 77  # three bands, the halo crossing both inner edges
    restored, source = torch.rand(2, 3, h, 50, generator=g), torch.rand(2, 3, h, 50, generator=g)
    out = color_fix(restored, source, method)
    inplace = restored.clone()
    assert torch.equal(color_fix(inplace, source, method, out=inplace), out)  # in place: the same
    if method == "wavelet":  # StableSR's formula on the whole image: high(restored) + low(source)
        def low(x):
            for i in range(LEVELS):
                d = 2**i
                k = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16).expand(3, 1, 3, 3)
                x = F.conv2d(F.pad(x, (d,) * 4, mode="replicate"), k, groups=3, dilation=d)
            return x
        ref = restored - low(restored) + low(source)
    else:
        mr, sr = restored.mean((-2, -1), keepdim=True), restored.std((-2, -1), unbiased=False, keepdim=True)
        ms, ss = source.mean((-2, -1), keepdim=True), source.std((-2, -1), unbiased=False, keepdim=True)
        ref = (restored - mr) / (sr + 1e-5) * ss + ms
    assert torch.allclose(out, ref.clamp(0, 1), atol=1e-5)
    u8 = color_fix((restored * 255).round().to(torch.uint8), (source * 255).round().to(torch.uint8), method)
    assert u8.dtype == torch.uint8 and (u8.float() / 255 - out).abs().max() < 3 / 255


# --- sampling from the LQ, x0-predicting presets ----------------------------------------------------
@pytest.fixture(scope="module")
def photo(shared_data):
    """A real photo (wild/person1/img4.jpg), [3,H,W] in [0,1]."""
    from pfstorer.images import load_image

    return load_image(shared_data / "wild" / "person1" / "img4.jpg")


def _as_u8(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    small = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return small.clamp(0, 1).mul(255).round().to(torch.uint8)


def _tiny_with(**update):
    from pfstorer.model import RestorationModel
    from pfstorer.presets import get_preset

    torch.manual_seed(0)
    return RestorationModel(get_preset("tiny").model_copy(update=update)).freeze()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_x0_updates_are_the_ddim_step_and_the_ddpm_posterior(sampler):
    from pfstorer.presets import SamplingDefaults

    model = _tiny_with(prediction="x0_residual", sampling=SamplingDefaults(t_start=300, steps=3))
    ups = sampler_updates(model, sampler, 3, 300)
    assert [u.t for u in ups] == [300, 200, 100]
    ac = make_scheduler(model, sampler).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x, x0, noise = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    for k, u in enumerate(ups):
        a_t = ac[u.t]
        a_prev = ac[ups[k + 1].t] if k + 1 < len(ups) else torch.tensor(1.0, dtype=torch.float64)
        if sampler == "ddim":  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps(x_t, x0)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            ref = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:  # the posterior q(x_prev | x_t, x0) and its standard deviation
            beta = 1 - a_t / a_prev
            ref = (a_prev.sqrt() * beta * x0 + (a_t / a_prev).sqrt() * (1 - a_prev) * x) / (1 - a_t)
            ref = ref + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * noise
        ours = u.a * x + u.b * x0 + u.c * noise
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ups[-1].a == 0 and ups[-1].b == 1 and ups[-1].c == 0  # the last step returns the x0 estimate


def test_untrained_x0_residual_base_is_the_identity(photo):
    """A zero-initialised output layer makes x0_hat = LQ: a fresh base can never make a photo worse."""
    model = load_base("compact", random_weights=True)
    img = _as_u8(photo, 128, 160)
    out = restore(model, img, color_fix="none")
    assert torch.equal(out, img)


def test_restore_takes_the_preset_sampling_defaults(photo):
    from pfstorer.presets import SamplingDefaults

    model = _tiny_with(sampling=SamplingDefaults(sampler="ddim", steps=3, t_start=300))
    img = _as_u8(photo, 32, 32)
    default = restore(model, img, seed=1, color_fix="none")
    assert torch.equal(default, restore(model, img, seed=1, color_fix="none", sampler="ddim", steps=3, t_start=300))
    from_noise = restore(model, img, seed=1, color_fix="none", steps=3, t_start=1000)
    assert not torch.equal(default, from_noise)  # pure noise is still there, as an option


def test_unset_colour_fix_is_the_presets(photo):
    """A base whose default is no colour fix restores as if ``none`` were named; a named one still applies."""
    from pfstorer.presets import SamplingDefaults

    model = _tiny_with(sampling=SamplingDefaults(sampler="ddim", steps=2, t_start=300, color_fix="none"))
    img = _as_u8(photo, 32, 32)
    unset = restore(model, img, seed=1)
    assert torch.equal(unset, restore(model, img, seed=1, color_fix="none"))
    assert not torch.equal(unset, restore(model, img, seed=1, color_fix="wavelet"))
    wavelet = _tiny_with(sampling=SamplingDefaults(sampler="ddim", steps=2, t_start=300))
    assert torch.equal(restore(wavelet, img, seed=1), restore(wavelet, img, seed=1, color_fix="wavelet"))


def test_lq_start_refuses_more_steps_than_timesteps(photo):
    from pfstorer.errors import InputError

    model = _tiny_with()
    with pytest.raises(InputError, match="t_start"):
        restore(model, _as_u8(photo, 32, 32), steps=20, t_start=10)


class _CountingDeadline:
    """A deadline that lets ``allowed`` tile batches through, then cancels (counts the checks)."""

    def __init__(self, allowed: int) -> None:
        from pfstorer.deadline import Deadline

        self.inner, self.allowed, self.checks = Deadline(), allowed, 0

    def check(self) -> None:
        self.checks += 1
        if self.checks > self.allowed:
            self.inner.cancel()
        self.inner.check()


def test_a_deadline_stops_a_restore_within_one_tile_batch(tiny, monkeypatch):
    from pfstorer.deadline import CancelledError, Deadline, DeadlineExceededError

    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    calls = []
    real = tiny.denoise
    monkeypatch.setattr(tiny, "denoise", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(DeadlineExceededError, match="deadline"):
        restore(tiny, image, steps=50, tile=32, tile_batch=2, deadline=Deadline(0.0))
    assert calls == []  # past its deadline before the first tile: no work at all
    counting = _CountingDeadline(allowed=3)
    with pytest.raises(CancelledError):
        restore(tiny, image, steps=50, tile=32, tile_batch=2, deadline=counting)
    assert len(calls) == 3  # stopped at the 4th tile batch of 50 steps x 9 tiles / 2
    # a deadline that is never reached changes nothing
    calls.clear()
    a = restore(tiny, image, steps=2, tile=32, deadline=Deadline(3600))
    assert torch.equal(a, restore(tiny, image, steps=2, tile=32))


def test_a_shared_deadline_runs_while_any_caller_wants_it():
    from pfstorer.deadline import CancelledError, Deadline

    a, b = Deadline(), Deadline()
    both = Deadline.any_of([a, b])
    a.cancel()
    both.check()  # b still waits for the result
    b.cancel()
    with pytest.raises(CancelledError):
        both.check()
    assert Deadline.any_of([a]) is a
