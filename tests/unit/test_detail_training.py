"""What base training at photo size is made of: native-scale crops, x4 SR inputs, the patch
discriminator of the detail objective, and the sharpness metric that tells detail from blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfstorer.adversarial import PatchDiscriminator, discriminator_loss, restorer_adversarial_loss
from pfstorer.degradations import synthesize_sr_lq
from pfstorer.images import resize
from pfstorer.metrics.identity import FaceBox
from pfstorer.metrics.sharpness import face_sharpness, laplacian_variance
from pipelines.base_data import Source, draw_batch, native_crop


def _texture(side: int, seed: int = 0) -> torch.Tensor:
    """A detailed 'photo': smooth colour plus fine random texture."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    base = torch.stack([0.3 + 0.4 * xx, 0.5 - 0.2 * yy, 0.4 + 0.1 * xx * yy])
    return (base + 0.15 * torch.rand(3, side, side, generator=g)).clamp(0, 1)


def test_native_crop_rescales_the_photo_so_the_face_has_the_drawn_size() -> None:
    # a photo whose column index is its value: the crop's span of values is the region it covers
    side = 400
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.float32), (side, 1))
    photo = np.repeat(ramp[..., None], 3, axis=2).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    # face of 200 px in the photo drawn at 100 px: the photo is halved, a 32 px crop covers 64 px
    crop = native_crop(photo, 32, face_px=200, face_scale=(100, 100), rng=rng)
    span = float(crop[0, 16, -2] - crop[0, 16, 1]) * 255 / (255 / (side - 1))
    assert crop.shape == (3, 32, 32)
    assert 55 < span < 66, span
    # asked for a larger face than the photo has: never enlarged (a 32 px crop covers 32 px)
    crop = native_crop(photo, 32, face_px=200, face_scale=(800, 800), rng=rng)
    span = float(crop[0, 16, -2] - crop[0, 16, 1]) * 255 / (255 / (side - 1))
    assert 27 < span < 33, span


def test_draw_batch_is_a_function_of_seed_rank_and_step() -> None:
    from pipelines.train_base import TrainBaseConfig

    photos = [(_texture(96, i) * 255).round().byte().permute(1, 2, 0).numpy() for i in range(3)]
    sources = [(photos, Source(data="a", face_px=60)), (photos[:1], Source(data="b", face_px=30, weight=2))]
    c = TrainBaseConfig(base="tiny", face_scale=(24, 48), p_sr=0.5)
    hq, lq, kinds = draw_batch(sources, 4, 32, c, rank=0, step=3)
    hq2, lq2, kinds2 = draw_batch(sources, 4, 32, c, rank=0, step=3)
    assert hq.shape == lq.shape == (4, 3, 32, 32)
    assert torch.equal(hq, hq2) and torch.equal(lq, lq2) and kinds == kinds2
    assert not torch.equal(hq, draw_batch(sources, 4, 32, c, rank=0, step=4)[0])


def test_draw_batch_says_what_each_input_is() -> None:
    from pipelines.base_data import input_kinds
    from pipelines.train_base import TrainBaseConfig

    photos = [(_texture(96, i) * 255).round().byte().permute(1, 2, 0).numpy() for i in range(3)]
    sources = [(photos, Source(data="a", face_px=60))]
    c = TrainBaseConfig(base="tiny", face_scale=(24, 48), p_sr=0.3, p_hq=0.2)
    seen = set()
    for step in range(6):
        hq, lq, kinds = draw_batch(sources, 8, 32, c, rank=0, step=step)
        for x, y, kind in zip(hq, lq, kinds, strict=True):
            assert kind in input_kinds(c.levels)
            assert torch.equal(x, y) == (kind == "clean")  # only a clean row is the crop itself
            # a x4 row lost its finest detail to the 4x shrink: almost no energy at the top frequency
            if kind == "x4":
                assert laplacian_variance(y) < 0.2 * laplacian_variance(x)
        seen.update(kinds)
    assert seen == {"clean", "light", "heavy", "x4"}


def test_detail_inputs_must_be_kinds_of_training_input() -> None:
    from pydantic import ValidationError

    from pipelines.train_base import TrainBaseConfig

    assert TrainBaseConfig(base="tiny", detail_inputs=("heavy", "x4")).detail_inputs == ("heavy", "x4")
    assert TrainBaseConfig(base="tiny", levels=("heavy",)).detail_inputs is None  # every kind, whatever the levels
    with pytest.raises(ValidationError, match="'medium'"):
        TrainBaseConfig(base="tiny", detail_inputs=("heavy", "medium"))


def test_sr_input_is_a_blurred_same_size_copy_and_seeded() -> None:
    hq = _texture(64)
    lq = synthesize_sr_lq(hq, 5, factor=4, level="light")
    assert lq.shape == hq.shape
    assert torch.equal(lq, synthesize_sr_lq(hq, 5, factor=4, level="light"))
    # 4x smaller, degraded and enlarged: most of the fine texture is gone, the colours are not
    assert laplacian_variance(lq) < 0.1 * laplacian_variance(hq)
    assert (lq.mean((1, 2)) - hq.mean((1, 2))).abs().max() < 0.05


def test_sharpness_is_one_for_the_truth_low_for_blur_high_for_noise() -> None:
    gt = _texture(64)
    box = FaceBox(0, 0, 64, 64, "whole-image")
    assert face_sharpness(gt, gt, box=box) == pytest.approx(1.0)
    blurred = resize(resize(gt, (16, 16)), (64, 64))
    assert face_sharpness(blurred, gt, box=box) < 0.2
    noisy = (gt + 0.2 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert face_sharpness(noisy, gt, box=box) > 1.5
    # only the box counts: detail outside it changes nothing
    framed = gt.clone()
    framed[:, :, 32:] = 0.5
    inner = FaceBox(0, 0, 32, 64, "whole-image")
    assert face_sharpness(framed, gt, box=inner) == pytest.approx(1.0)
    assert face_sharpness(gt, torch.full_like(gt, 0.5), box=box) is None  # a flat truth has no scale


def test_discriminator_shapes_and_hinge_losses() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(3, width=8)
    logits, feats = d(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 1, 8, 8) and len(feats) == 4
    confident = discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert confident.item() == 0.0  # beyond the margins: nothing left to learn
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2.0)
    # the restorer's loss reaches its output, and feature matching is zero for the truth itself
    d.eval()  # (spectral norm's power iteration steps on every training-mode call)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = restorer_adversarial_loss(d, fake, fake.detach(), feature_matching=1.0)
    assert loss.item() == pytest.approx(-d(fake)[0].mean().item(), abs=1e-6)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_discriminator_learns_to_tell_detail_from_blur() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(3, width=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.99))

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        real = torch.stack([_texture(32, seed * 8 + i) for i in range(8)]) * 2 - 1
        return real, resize(resize((real + 1) / 2, (8, 8)), (32, 32)) * 2 - 1

    for step in range(60):
        real, blur = batch(step)
        loss = discriminator_loss(d(real)[0], d(blur)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, blur = batch(1000)  # unseen patches
    with torch.no_grad():
        assert d(real)[0].mean() > d(blur)[0].mean() + 0.5


def test_blend_weights_interpolates_two_checkpoints(tmp_path) -> None:
    from safetensors.torch import load_file

    from pfstorer.errors import InputError
    from pfstorer.model import load_base
    from pipelines.train_base import blend_weights

    a = load_base("tiny")
    b = load_base("tiny")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    a.save(tmp_path / "a", dtype=torch.float32)
    b.save(tmp_path / "b", dtype=torch.float32)
    key = next(k for k, v in a.state_dict().items() if v.is_floating_point() and v.numel() > 1)
    for w in (0.0, 0.25, 1.0):
        blend_weights(tmp_path / "a", tmp_path / "b", w, tmp_path / f"w{w}", dtype="float32")
        got = load_file(str(tmp_path / f"w{w}" / "model.safetensors"))[key]
        want = a.state_dict()[key] * (1 - w) + b.state_dict()[key] * w
        assert torch.allclose(got, want, atol=1e-6), w
    assert load_base(str(tmp_path / "w0.0")).fingerprint == load_base(str(tmp_path / "a")).fingerprint
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        blend_weights(tmp_path / "a", tmp_path / "b", 1.5, tmp_path / "bad")
    load_base("tiny-latent").save(tmp_path / "other")
    with pytest.raises(InputError, match="same preset"):
        blend_weights(tmp_path / "a", tmp_path / "other", 0.5, tmp_path / "bad")
