"""Face framing: whole photos are cut to their face as the base saw faces; face crops are kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfstorer.framing import FRAME_SCALE, face_square, frame_face


def test_the_square_frames_the_box_at_the_lfw_scale_and_stays_inside_the_photo():
    # a 100 px face in the middle of a 600 x 800 photo: a 142 px square, centred a little above the box
    y0, x0, side = face_square(600, 800, (350, 250, 450, 350))
    assert side == round(100 * FRAME_SCALE) == 142
    assert x0 == 400 - 71 and y0 == round(300 - 7 - 71)
    # a face at the corner: the square is moved inside, never padded
    y0, x0, side = face_square(600, 800, (0, 0, 100, 100))
    assert (y0, x0) == (0, 0) and side == 142
    y0, x0, side = face_square(600, 800, (700, 500, 800, 600))
    assert (y0 + side, x0 + side) == (600, 800)


def test_a_face_that_already_fills_the_photo_is_not_cut():
    assert face_square(128, 128, (19, 25, 109, 115)) is None  # an lfw crop: 90 px face in 128 px
    assert face_square(300, 300, (60, 60, 240, 240)) is None


def test_a_tall_photo_whose_face_fills_its_width_is_cut_to_a_square():
    # 1024 x 768 portrait, 446 px face: the framed square (634 px, centred at x 410, y 559 - 31) is
    # cut; a wider face gets the whole width, never more
    assert face_square(1024, 768, (187, 336, 633, 782)) == (211, 93, 634)
    y0, x0, side = face_square(1024, 768, (100, 300, 700, 900))
    assert side == 768 and x0 == 0 and 0 <= y0 <= 1024 - 768


@pytest.mark.eval
def test_a_whole_photo_is_cut_to_its_face_and_a_face_crop_is_kept(shared_data: Path, lfw_bench):
    from pfstorer.images import load_image
    from pfstorer.metrics.identity import find_face, has_face_detector

    if not has_face_detector():
        pytest.skip("no face detector (the eval extra) on this machine")
    photo = load_image(shared_data / "wild" / "person1" / "img1.jpg")  # 1024 x 757, face ~370 px
    framed = frame_face(photo, 128)
    assert framed.shape == (3, 128, 128)
    box = find_face(framed)
    assert box is not None and box.source != "whole-image"
    assert 70 <= max(box.width, box.height) <= 110  # the face spans about 90 of 128 px, as in lfw
    crop = load_image(lfw_bench[next(iter(lfw_bench))][0])
    assert torch.equal(frame_face(crop), crop)
    blank = torch.full((3, 400, 600), 0.5)  # no face: unchanged, never refused
    assert torch.equal(frame_face(blank), blank)


@pytest.mark.eval
def test_references_of_whole_scenes_are_trained_on_their_faces(shared_data: Path):
    from pfstorer.config import PersonalizeConfig
    from pfstorer.images import load_image
    from pfstorer.metrics.identity import has_face_detector
    from pfstorer.model import load_base
    from pfstorer.training import PackedTrainer, PersonalizeJob

    if not has_face_detector():
        pytest.skip("no face detector (the eval extra) on this machine")
    photos = [load_image(p) for p in sorted((shared_data / "wild" / "person2").iterdir())[:3]]
    assert all(p.shape[-1] != p.shape[-2] for p in photos)  # whole, non-square photos
    trainer = PackedTrainer(load_base("tiny"), PersonalizeConfig(steps=1), capacity=1)
    k = trainer.add(PersonalizeJob("p2", photos, seed=0))
    for photo, ref in zip(photos, trainer.slots[k].refs, strict=True):
        assert ref.shape[-1] == ref.shape[-2] < min(photo.shape[-2:])  # cut to a square around the face
        side = ref.shape[-1]
        assert torch.allclose(ref, frame_face(photo, side), atol=0.02)
