"""Photo inference without Gradio: detection, alignment, prediction, drawing and webcam smoothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, require_shipped_model
from faces import CHIP_SIZE, FaceAnalyzer, FaceRecord, FaceTracker, annotate, box_iou, native_bfloat16, resolve_dtype


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer(require_shipped_model())


def test_each_face_of_a_group_photo_is_found_and_labelled(analyzer):
    result = analyzer.analyze(EXAMPLES / "three_portraits.jpg")
    assert len(result.faces) == 3 and result.whole_image is None
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in result.faces)
    assert centres[0] < 320 < centres[1] < 496 < centres[2]  # one face in each portrait
    for face in result.faces:
        assert 0 <= face.age_interval[0] <= face.age <= face.age_interval[1] <= 116
        assert len(face.age_distribution) == 117 and abs(sum(face.age_distribution) - 1) < 1e-3


def test_no_face_gives_the_whole_image_reading(analyzer):
    result = analyzer.analyze(EXAMPLES / "chelsea_the_cat.jpg")
    assert result.faces == [] and result.whole_image.box == [0, 0, 451, 300]


def test_big_photos_are_downscaled_before_detection(analyzer):
    big = Image.open(EXAMPLES / "obama.jpg").resize((2400, 3000))
    result = analyzer.analyze(big)
    assert max(result.image.size) == analyzer.max_side and result.scale < 1 and len(result.faces) == 1


def test_faces_are_cut_as_utkface_chips(analyzer):
    import numpy as np

    photo = np.asarray(Image.open(EXAMPLES / "obama.jpg").convert("RGB"))
    rects = [rect for rect, _ in analyzer.detect(Image.fromarray(photo))]
    (chip,) = analyzer.face_chips(photo, rects)
    assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)


def test_annotation_draws_boxes_without_changing_the_size(analyzer):
    result = analyzer.analyze(EXAMPLES / "obama.jpg")
    drawn = annotate(result.image, result.faces)
    assert drawn.size == result.image.size and drawn.tobytes() != result.image.tobytes()
    assert result.faces[0].label.startswith(("M ", "F "))


def record(age: float, gender: str, box: list[int]) -> FaceRecord:
    return FaceRecord(box=box, age=age, age_interval=[int(age) - 5, int(age) + 5], age_std=4.0, gender=gender, gender_score=0.9)


def test_tracker_smooths_a_face_and_starts_new_ones_fresh():
    class Config:
        age_interval_scale, min_age, max_age = 1.28, 0, 116

    tracker = FaceTracker(smoothing=0.7)
    tracker.update([record(30, "male", [10, 10, 60, 60])], Config)
    (moved,) = tracker.update([record(40, "male", [12, 11, 62, 61])], Config)
    assert moved.age == pytest.approx(33.0)
    smoothed = tracker.update([record(40, "male", [12, 11, 62, 61]), record(70, "female", [200, 10, 250, 60])], Config)
    assert smoothed[1].age == 70 and smoothed[1].gender == "female"
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_bfloat16_gives_the_float32_answers_within_a_year():
    photo = EXAMPLES / "three_portraits.jpg"
    exact = FaceAnalyzer(require_shipped_model(), dtype="float32").analyze(photo).faces
    fast = FaceAnalyzer(require_shipped_model(), dtype="bfloat16").analyze(photo).faces
    assert [f.box for f in fast] == [f.box for f in exact] and len(exact) == 3
    for a, b in zip(exact, fast):
        assert abs(a.age - b.age) < 1.0 and a.gender == b.gender and abs(a.gender_score - b.gender_score) < 0.02


def test_auto_dtype_uses_bfloat16_only_where_the_cpu_computes_it():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native_bfloat16("cpu") else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.float32
    assert resolve_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype must be 'auto', 'float32' or 'bfloat16'"):
        resolve_dtype("float16", "cpu")
