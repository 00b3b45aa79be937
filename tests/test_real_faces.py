"""Real-photo faces as datasets (training/real_faces.py) on real files, and the losses that let faces with partial
labels train the model: an age group, a gender, or neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_shared, write_lfw_folder, write_wider_folder


@pytest.fixture(scope="module")
def wider_folder(tmp_path_factory) -> Path:
    return write_wider_folder(tmp_path_factory.mktemp("wider-faces"))


@pytest.fixture(scope="module")
def lfw_folder(tmp_path_factory) -> Path:
    return write_lfw_folder(tmp_path_factory.mktemp("lfw-gender"))


def test_wider_faces_loader_matches_the_labelled_face_and_names_what_it_cannot_use(wider_folder, tmp_path):
    from training.real_faces import AGE_GROUPS, load_source

    dataset, report = load_source("wider-faces", wider_folder, tmp_path / "cache")
    assert len(dataset) == 1 and report.kept == 1
    row = dataset[0]
    assert row["file_name"] == "images/0--Test/astronaut_1.jpg" and row["gender"] == 1
    assert AGE_GROUPS[row["age_group"]] == "Young Adult" and row["age"] == -1 and row["group"] == "0--Test/astronaut.jpg"
    assert row["image"].size == (200, 200)  # the app's aligned chip
    assert report.skipped == {"no detection matches the labelled box": 1, "file cannot be read as an image": 1}
    assert report.examples["no detection matches the labelled box"] == ["images/0--Test/astronaut_2.jpg"]
    assert report.examples["file cannot be read as an image"][0].startswith("images/0--Test/broken_1.jpg")
    summary = report.summary()
    assert "astronaut_2.jpg" in summary and "broken_1.jpg" in summary


def test_lfw_loader_reads_greyscale_photos_and_counts_truncated_ones(lfw_folder, tmp_path):
    from training.real_faces import load_source

    dataset, report = load_source("lfw-gender", lfw_folder, tmp_path / "cache")
    assert sorted(dataset["file_name"]) == ["images/Barack_Obama/Barack_Obama_0001.jpg", "images/Grey_Person/Grey_Person_0001.jpg"]
    grey = dataset[dataset["file_name"].index("images/Grey_Person/Grey_Person_0001.jpg")]
    assert grey["gender"] == 1 and grey["image"].mode == "RGB"
    pixels = np.asarray(grey["image"], dtype=int)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() < 2  # still grey, as three channels
    assert report.skipped == {"file cannot be read as an image": 1}


def test_chips_are_built_once_then_read_from_the_cache(lfw_folder, tmp_path):
    from training.real_faces import load_source

    cache = tmp_path / "cache"
    first, _ = load_source("lfw-gender", lfw_folder, cache)
    (lfw_folder / "images" / "Grey_Person" / "Grey_Person_0001.jpg").stat()  # untouched: the cache answers
    second, report = load_source("lfw-gender", lfw_folder, cache)
    assert second["sha1"] == first["sha1"] and report.skipped == {"file cannot be read as an image": 1}
    assert len(list((cache / "real-faces").iterdir())) == 1


def test_splits_keep_a_photo_and_a_person_on_one_side(wider_folder, lfw_folder, tmp_path):
    from training.real_faces import load_real_faces, split_of_group, summary

    splits = load_real_faces(wider_folder, lfw_folder, tmp_path / "cache", validation_share=0.5, verbose=False)
    assert sum(len(s) for s in splits.values()) == 3
    for name, dataset in splits.items():
        assert all(split_of_group(group, 0.5) == name for group in dataset["group"])
    text = summary(splits)
    assert "source:" in text and "age group:" in text and "face size:" in text and "skin type:" in text


def test_missing_source_is_named(tmp_path):
    from training.real_faces import load_real_faces

    with pytest.raises(FileNotFoundError, match="faces.csv"):
        load_real_faces(tmp_path / "nowhere", None, tmp_path / "cache", verbose=False)


def test_the_real_sources_build_and_every_face_is_kept_or_counted():
    """The shipped sources end to end (cached after the first build, which takes about two minutes)."""
    from training.real_faces import load_source

    for source, rows_file in (("wider-faces", "faces.csv"), ("lfw-gender", "labels.csv")):
        folder = require_shared(source)
        dataset, report = load_source(source, folder)
        with open(folder / rows_file) as handle:
            rows = sum(1 for _ in handle) - 1
        assert len(dataset) + sum(report.skipped.values()) == rows
        assert len(dataset) > 0.9 * rows


def small_model():
    from modeling import AgeGenderConfig, AgeGenderModel

    torch.manual_seed(0)
    return AgeGenderModel(AgeGenderConfig(image_size=32, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], embedding_size=8))


def test_faces_with_only_an_age_group_change_no_gender_weight():
    model = small_model()
    pixels = torch.randn(4, 3, 32, 32)
    outputs = model(
        pixel_values=pixels, age=torch.full((4,), -1.0), gender=torch.full((4,), -1), age_range=torch.tensor([[13.0, 42.0]] * 4)
    )
    outputs.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.gender_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.age_head.parameters())


def test_faces_with_only_a_gender_change_no_age_weight():
    model = small_model()
    outputs = model(
        pixel_values=torch.randn(4, 3, 32, 32), age=torch.full((4,), -1.0), gender=torch.tensor([0, 1, 1, 0]),
        age_range=torch.full((4, 2), -1.0),
    )
    outputs.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.age_head.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.gender_head.parameters())


def test_age_range_loss_is_small_inside_the_range_and_large_outside():
    model = small_model()
    logits = torch.full((2, model.config.num_ages), -30.0)
    logits[0, 25] = logits[1, 80] = 30.0  # all mass at 25, then at 80
    ranges = torch.tensor([[13.0, 42.0], [13.0, 42.0]])
    inside, outside = model.age_range_loss(logits[:1], ranges[:1]), model.age_range_loss(logits[1:], ranges[1:])
    assert inside.item() < 1e-6 and outside.item() > 10


def test_class_weights_balance_a_two_to_one_skew():
    from training.train import balanced_class_weights

    weights = balanced_class_weights(torch.tensor([0, 0, 0, 0, 1, 1, -1]))
    assert weights == pytest.approx([0.75, 1.5])
    assert weights[0] * 4 == pytest.approx(weights[1] * 2)  # both genders weigh alike in total


def test_fully_labelled_batches_keep_the_plain_mean_loss():
    """The masked losses give the same loss as before for UTKFace batches, where every label is known."""
    import torch.nn.functional as F

    model = small_model().eval()
    pixels, age, gender = torch.randn(4, 3, 32, 32), torch.tensor([5.0, 30.0, 60.0, 90.0]), torch.tensor([0, 1, 0, 1])
    from modeling.modeling_age_gender import age_bins, gaussian_label_distribution

    outputs = model(pixel_values=pixels, age=age, gender=gender)
    target = gaussian_label_distribution(age, age_bins(0, model.config.num_ages), model.config.age_label_sigma)
    kl = F.kl_div(outputs.age_logits.log_softmax(-1), target, reduction="batchmean")
    expected = kl + F.l1_loss(outputs.age, age) + model.config.gender_loss_weight * F.cross_entropy(outputs.gender_logits, gender)
    assert outputs.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_readme_says_how_the_shipped_model_reads_the_children_picked_by_eye(tmp_path):
    """WIDER's demographics label children Young Adult; `training/wider_faces_children.txt` names the children of
    wider-faces' validation part, picked by eye. Each is in that part and found by the app's detector, and README's
    limitation quotes how many of them the shipped model reads as under 10 and their median age."""
    from conftest import ROOT, require_shipped_model
    from datasets import Dataset

    from faces.analysis import CHILD_AGE
    from modeling import AgeGenderImageProcessor, AgeGenderModel
    from training.data import pixel_cache
    from training.real_faces import FEATURES, ScanReport, children_by_eye_names, chip_rows, framing_filled, read_wider_faces, split_of_group
    from training.scoring import predict_distributions

    root, model_dir = require_shared("wider-faces"), require_shipped_model()
    names = children_by_eye_names()
    regions = [region for region in read_wider_faces(root) if str(region.path.relative_to(root)) in names]
    assert len(regions) == len(names) == 39
    assert {split_of_group(region.labels["group"], 0.15) for region in regions} == {"validation"}
    model, processor = AgeGenderModel.from_pretrained(model_dir).eval(), AgeGenderImageProcessor.from_pretrained(model_dir)
    report = ScanReport()
    children = Dataset.from_list(chip_rows(regions, root, "wider-faces", report, zoom=processor.face_zoom), features=FEATURES)
    assert len(children) == 39, report.summary()
    pixels = torch.from_numpy(np.array(pixel_cache(children, processor, tmp_path)))
    age_probs, _ = predict_distributions(model, processor, pixels, framing_filled=framing_filled(children, processor.face_zoom))
    ages = (age_probs @ torch.arange(model.config.min_age, model.config.min_age + age_probs.shape[1]).float()).numpy()
    older, median = int((ages >= CHILD_AGE).sum()), float(np.median(ages))
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"reads {older} as {CHILD_AGE} years or older (median {median:.1f})" in readme, (older, median)
