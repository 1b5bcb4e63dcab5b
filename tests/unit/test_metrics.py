"""pfstorer.metrics: each test pins a behaviour that a wrong formula, a wrong crop or a silently
missing model would break. Tests that need the optional offline models are marked ``eval`` and skip
with the reason when the model is not installed."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pfstorer.metrics as M
from pfstorer.errors import InputError
from pfstorer.metrics import _models, identity, noref


def _needs(*names: str) -> None:
    avail = M.available_metrics()
    for n in names:
        if avail[n].startswith("unavailable"):
            pytest.skip(f"{n}: {avail[n]}")


def _smooth_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A deterministic natural-ish image: low-frequency colour blobs plus a little texture."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(
        torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False
    )
    return (0.8 * low[0] + 0.2 * torch.rand(3, size, size, generator=g)).clamp(0, 1)


def _blur(img: torch.Tensor, passes: int = 3) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    x = img[:, None]
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k[None, None])
    return x[:, 0]


def _degrade(img: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Heavy blur (sigma ~3 px) plus strong noise (sigma 0.1): what every no-reference score must notice."""
    g = torch.Generator().manual_seed(seed)
    return (_blur(img, passes=9) + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def _load(path: Path) -> torch.Tensor:
    from pfstorer.images import load_image

    return load_image(path)


# --- full reference -------------------------------------------------------------------------------
def test_psnr_identical_is_inf_and_known_noise_gives_known_value() -> None:
    gt = 0.4 + 0.2 * _smooth_image()  # stays inside [0.4, 0.6] so +0.1 is never clipped
    assert M.psnr(gt, gt) == math.inf
    assert M.psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 10*log10(1/0.01)
    # uint8 arrays are read in [0, 255]: an error of 10 levels everywhere is 20*log10(25.5) dB
    a = np.full((16, 16, 3), 100, np.uint8)
    assert M.psnr(a + 10, a) == pytest.approx(20 * math.log10(25.5), abs=1e-9)
    # luma only: a chroma-free grey offset gives the same error scaled by 219/255
    assert M.psnr(gt + 0.1, gt, channel="y") == pytest.approx(20.0 - 20 * math.log10(219 / 255), abs=1e-3)


def test_full_reference_metrics_refuse_mismatched_sizes() -> None:
    with pytest.raises(InputError, match="same size"):
        M.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))
    with pytest.raises(InputError, match="same size"):
        M.ssim(torch.zeros(3, 16, 16), torch.zeros(3, 17, 16))


def test_ssim_identical_is_one_lower_when_noisy_and_matches_skimage() -> None:
    gt = _smooth_image(1)
    assert M.ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    noisy = (gt + 0.05 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    value = M.ssim(noisy, gt)
    assert 0.2 < value < 0.99
    skm = pytest.importorskip("skimage.metrics")
    from pfstorer.metrics._image import as_float_rgb, rgb_to_y

    ref = skm.structural_similarity(
        rgb_to_y(as_float_rgb(noisy)) * 255,
        rgb_to_y(as_float_rgb(gt)) * 255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert value == pytest.approx(ref, abs=1e-6)


@pytest.mark.eval
def test_stlpips_zero_for_identical_larger_for_distorted_and_leaves_no_stub_modules() -> None:
    before = {m for m in ("torchvision", "IPython", "torchsummary") if m in sys.modules}
    _needs("st_lpips")
    img = _smooth_image(2, 96)
    assert M.stlpips(img, img) == pytest.approx(0.0, abs=1e-6)
    shifted = torch.roll(img, shifts=1, dims=2)
    distorted = _degrade(img)
    d_shift, d_dist = M.stlpips(shifted, img), M.stlpips(distorted, img)
    assert d_dist > 0.1
    assert d_dist > 3 * d_shift  # shift-tolerant: a 1 px shift is small next to blur + noise
    after = {m for m in ("torchvision", "IPython", "torchsummary") if m in sys.modules}
    assert after == before  # the import-time stand-ins were removed again


# --- no reference ---------------------------------------------------------------------------------
@pytest.mark.eval
def test_niqe_and_brisque_prefer_sharp_faces(lfw_bench: dict[str, list[Path]], shared_data: Path) -> None:
    _needs("niqe", "brisque")
    people = list(lfw_bench)
    photos = [lfw_bench[people[i]][0] for i in (0, 17, 42)]
    wild = _load(sorted((shared_data / "wild" / "person1").glob("*.jpg"))[0])
    images = [_load(p) for p in photos] + [wild[:, :256, :256]]
    for i, img in enumerate(images):
        bad = _degrade(img, seed=i)
        assert M.niqe(img) < M.niqe(bad), f"NIQE image {i}"
        assert M.brisque(img) < M.brisque(bad), f"BRISQUE image {i}"


@pytest.mark.eval
def test_niqe_block_layout_and_size_limit() -> None:
    _needs("niqe")
    # 96..191 px per side: two overlapping blocks at 0 and the far end (even); >= 192: the 96 px grid
    assert noref._block_offsets(128) == [0, 32]
    assert noref._block_offsets(97) == [0, 0]
    assert noref._block_offsets(300) == [0, 96, 192]
    img = _smooth_image(4, 128)
    assert math.isfinite(M.niqe(img))
    assert M.niqe(img) == M.niqe(img.numpy().transpose(1, 2, 0))  # tensor and HxWx3 agree
    with pytest.raises(InputError, match="96x96"):
        M.niqe(torch.rand(3, 64, 200))
    # in compute_metrics a too-small image is a missing value with the reason, not a crash
    res = M.compute_metrics(torch.rand(3, 64, 64), names=["niqe", "psnr"], gt=torch.rand(3, 64, 64))
    assert res["niqe"].value is None and "96x96" in res["niqe"].note
    assert res["psnr"].value is not None


def test_matlab_resize_halves_with_antialiasing() -> None:
    # MATLAB imresize(x, 0.5) of a constant is the constant; of a ramp it is the ramp sampled at
    # the centres of pixel pairs (the cubic kernel reproduces linear functions exactly)
    ramp = np.tile(np.arange(16, dtype=np.float64), (4, 1))
    out = noref._matlab_resize_axis(ramp, 0.5, 1)
    assert out.shape == (4, 8)
    np.testing.assert_allclose(out[:, 2:-2], np.tile(np.arange(8) * 2 + 0.5, (4, 1))[:, 2:-2], atol=1e-12)
    np.testing.assert_allclose(noref._matlab_resize_axis(np.full((9, 9), 3.0), 0.5, 0), 3.0, atol=1e-12)


# --- identity -------------------------------------------------------------------------------------
def _triplets(people: dict[str, list[Path]], n: int, seed: int) -> list[tuple[Path, Path, Path]]:
    """Seeded (anchor, same-person photo, other-person photo) samples from a pool of bench people."""
    rng = random.Random(seed)
    pool_people = rng.sample(sorted(people), 50)
    pool = {p: rng.sample(people[p], 3) for p in pool_people}
    out = []
    for _ in range(n):
        a, b = rng.sample(pool_people, 2)
        anchor, same = rng.sample(pool[a], 2)
        out.append((anchor, same, rng.choice(pool[b])))
    return out


@pytest.mark.eval
def test_facenet_same_person_scores_higher_than_different_person(lfw_bench: dict[str, list[Path]]) -> None:
    """>= 90% of 200 seeded lfw128 bench triplets rank same > different."""
    _needs("id_facenet")
    emb = M.IdentityEmbedder("facenet")
    cache: dict[Path, np.ndarray] = {}

    def e(p: Path) -> np.ndarray:
        if p not in cache:
            v = emb.embed(_load(p))
            assert v is not None, f"no face in {p}"  # 128 px crops always yield a face (fallback)
            cache[p] = v
        return cache[p]

    trips = _triplets(lfw_bench, 200, seed=0)
    wins = [float(e(a) @ e(s)) > float(e(a) @ e(o)) for a, s, o in trips]
    assert sum(wins) / len(wins) >= 0.90, f"{sum(wins)}/200"
    # the public one-shot helper agrees with the embedder
    a, s, _ = trips[0]
    assert M.id_cosine(_load(a), _load(s)) == pytest.approx(float(e(a) @ e(s)), abs=1e-6)


@pytest.mark.eval
def test_dlib_backend_separates_people(lfw_bench: dict[str, list[Path]]) -> None:
    _needs("id_dlib")
    trips = _triplets(lfw_bench, 8, seed=1)
    wins = 0
    for a, s, o in trips:
        same, other = M.id_cosine(_load(a), _load(s), "dlib"), M.id_cosine(_load(a), _load(o), "dlib")
        assert same is not None and other is not None
        wins += same > other
    assert wins >= 7
    with pytest.raises(InputError):
        M.IdentityEmbedder("arcface")  # type: ignore[arg-type]


@pytest.mark.eval
def test_faces_anywhere_in_a_photo_and_tight_crop_fallback(lfw_bench: dict[str, list[Path]]) -> None:
    _needs("id_facenet")
    face = _load(lfw_bench[sorted(lfw_bench)[3]][0])
    # off-centre in a larger photo: the detector finds it and the embedding matches the crop's
    canvas = torch.full((3, 360, 480), 0.45)
    canvas[:, 200:328, 300:428] = face
    box = M.find_face(canvas)
    assert box is not None and box.source != "whole-image"
    assert 280 <= (box.left + box.right) / 2 <= 448 and 180 <= (box.top + box.bottom) / 2 <= 348
    assert M.id_cosine(canvas, face) > 0.8
    # a blank photo has no face; a blank 128 px crop is taken whole (it is assumed to be a face crop)
    assert M.find_face(torch.full((3, 400, 600), 0.5)) is None
    assert M.get_embedder("facenet").embed(torch.full((3, 400, 600), 0.5)) is None
    assert M.find_face(torch.full((3, 128, 128), 0.5)) == M.FaceBox(0, 0, 128, 128, "whole-image")
    assert identity.is_tight_crop(128, 128) and not identity.is_tight_crop(128, 300)


@pytest.mark.eval
def test_haar_cascade_is_the_detector_when_dlib_is_missing(monkeypatch, shared_data: Path) -> None:
    if _models.find_haar_cascade() is None:
        pytest.skip("no OpenCV Haar cascade here (Debian opencv-data)")
    monkeypatch.setattr(identity, "dlib_available", lambda: False)
    photo = _load(sorted((shared_data / "wild" / "person1").glob("*.jpg"))[0])
    box = M.find_face(photo)
    assert box is not None and box.source == "haar"
    assert box.width * box.height < 0.5 * photo.shape[1] * photo.shape[2]
    assert identity.detector_name() == "haar"


@pytest.mark.eval
def test_lmse_zero_for_identical_and_grows_with_displacement(lfw_bench: dict[str, list[Path]]) -> None:
    _needs("lmse")
    gt = _load(lfw_bench[sorted(lfw_bench)[5]][0])
    assert M.lmse(gt, gt) == 0.0
    small = M.lmse(torch.roll(gt, 2, dims=2), gt)
    large = M.lmse(torch.roll(gt, 6, dims=2), gt)
    assert small is not None and large is not None
    assert 0.5 < small < large
    with pytest.raises(InputError):
        M.lmse(gt[:, :100], gt)


# --- registry -------------------------------------------------------------------------------------
def test_available_metrics_reports_a_backend_or_a_reason_for_every_metric() -> None:
    avail = M.available_metrics()
    assert set(avail) == set(M.METRICS)
    assert avail["psnr"] and "RGB" in avail["psnr"]
    assert "Y" in avail["ssim"]
    for name, text in avail.items():
        assert isinstance(text, str) and text, name
        if text.startswith("unavailable"):
            assert len(text) > len("unavailable: ") + 10, f"{name} gives no reason"
    if not avail["id_facenet"].startswith("unavailable"):
        assert "FaceNet" in avail["id_facenet"]
    if not avail["st_lpips"].startswith("unavailable"):
        assert "ST-LPIPS" in avail["st_lpips"] or "shift-tolerant" in avail["st_lpips"]


@pytest.fixture
def clear_model_caches():
    """Forget located models before and after a test that hides them."""

    def clear() -> None:
        for fn in (_models.find_facenet_graph, _models.find_niqe_params, noref._niqe_params):
            fn.cache_clear()
        identity._EMBEDDERS.clear()

    clear()
    yield
    clear()


def test_missing_model_makes_metric_unavailable_not_a_crash(
    monkeypatch, tmp_path, clear_model_caches
) -> None:
    def missing():
        raise _models.MetricUnavailableError("NIQE pristine parameters not found (test)")

    monkeypatch.setattr(noref, "find_niqe_params", missing)
    monkeypatch.setenv("PFSTORER_FACENET_PB", str(tmp_path / "absent.pb"))
    avail = M.available_metrics()
    assert avail["niqe"].startswith("unavailable") and "pristine" in avail["niqe"]
    assert avail["id_facenet"].startswith("unavailable") and "absent.pb" in avail["id_facenet"]
    img = _smooth_image(5, 128)
    res = M.compute_metrics(img, img, names=["psnr", "niqe", "id_facenet"])
    assert res["psnr"].value == math.inf and res["psnr"].backend.startswith("numpy")
    for name in ("niqe", "id_facenet"):
        assert res[name].value is None and res[name].backend == "unavailable" and res[name].note
    with pytest.raises(_models.MetricUnavailableError):
        M.niqe(img)


def test_compute_metrics_selects_by_inputs_and_labels_results() -> None:
    img, gt = _smooth_image(6, 128), _smooth_image(7, 128)
    no_ref = M.compute_metrics(img)
    assert set(no_ref) == {n for n, s in M.METRICS.items() if s.kind == "no-reference"}
    res = M.compute_metrics(img, gt, names=["ssim", "psnr"])
    assert list(res) == ["psnr", "ssim"]  # METRICS order, whatever order was asked
    assert res["psnr"].value == pytest.approx(M.psnr(img, gt)) and res["psnr"].higher_is_better
    assert res["ssim"].backend == M.available_metrics()["ssim"]
    assert res["psnr"].to_dict()["name"] == "psnr"
    assert M.compute_metrics(img, img, names=["psnr"])["psnr"].to_dict()["value"] == "inf"
    with pytest.raises(InputError, match="unknown metric"):
        M.compute_metrics(img, gt, names=["musiq"])
    with pytest.raises(InputError, match="same size"):
        M.compute_metrics(img, gt[:, :64], names=["psnr"])
