"""Growing the shipped model into a wider or deeper one (training/grow_model.py) and narrowing a model into a cheaper
one (training/narrow_model.py), as `--init_from` starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, face_like
from modeling import AgeGenderImageProcessor, AgeGenderModel
from training.grow_model import grow_model
from training.narrow_model import narrow_model

NARROW = {"hidden_sizes": [20, 40, 80, 160], "embedding_size": 20}


@pytest.fixture(scope="module")
def shipped(shipped_network) -> AgeGenderModel:
    return AgeGenderModel.from_pretrained(shipped_network).eval()


@pytest.fixture(scope="module")
def faces(shipped_network) -> torch.Tensor:
    processor = AgeGenderImageProcessor.from_pretrained(shipped_network)
    return processor([face_like(seed) for seed in range(8)], return_tensors="pt")["pixel_values"]


def answers(model: AgeGenderModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels)
    return out.age_logits, out.gender_logits


def test_widening_keeps_the_answers_exactly(shipped, faces):
    wide = grow_model(shipped, hidden_sizes=[40, 80, 160, 320], embedding_size=40)
    assert wide.config.hidden_sizes == [40, 80, 160, 320]
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in shipped.parameters())
    for grown, original in zip(answers(wide, faces), answers(shipped, faces)):
        torch.testing.assert_close(grown, original)


def test_new_channels_can_learn(shipped, faces):
    """Silent is not dead: a training step moves the new channels' norms away from zero."""
    wide = grow_model(shipped, hidden_sizes=[40, 80, 160, 320], embedding_size=40).train()
    output = wide(pixel_values=faces, age=torch.full((8,), 30.0), gender=torch.zeros(8, dtype=torch.long))
    output.loss.backward()
    norm = wide.backbone[0][1]
    assert norm.weight.grad[32:].abs().sum() > 0


def test_deepening_copies_every_block_and_appends_new_ones(shipped, faces):
    deep = grow_model(shipped, depths=[2, 2, 3, 2])
    assert deep.config.depths == [2, 2, 3, 2]
    # the source's blocks keep their stage and place in it: stage 0's only block, then stage 1's two, ...
    for old, new in {1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 8, 7: 9}.items():
        for (name, a), (_, b) in zip(shipped.backbone[old].state_dict().items(), deep.backbone[new].state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)
    for appended in (2, 7):  # their residual branch starts at zero
        assert torch.count_nonzero(deep.backbone[appended].conv2[1].weight) == 0
    age, gender = answers(deep, faces)
    assert (gender.argmax(-1) == answers(shipped, faces)[1].argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"depths": [1, 1, 2, 2]}, "never remove"),
        ({"hidden_sizes": [48, 96, 192, 384]}, "embedding_size 48"),
        ({"depths": [1, 2, 2, 2, 1], "hidden_sizes": [32, 64, 128, 256, 256]}, "number of stages"),
    ],
)
def test_refuses_what_cannot_keep_the_model(shipped, overrides, words):
    with pytest.raises(ValueError, match=words):
        grow_model(shipped, **overrides)


def test_command_writes_a_model_folder_train_can_start_from(tmp_path, faces, shipped, shipped_network):
    out = tmp_path / "grown"
    done = subprocess.run(
        [sys.executable, "-m", "training.grow_model", str(shipped_network), str(out), "--hidden_sizes", "40", "80", "160", "320", "--embedding_size", "40"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert "grown model" in done.stdout and str(out) in done.stdout
    reloaded = AgeGenderModel.from_pretrained(out)
    assert AgeGenderImageProcessor.from_pretrained(out).image_size == shipped.config.image_size
    torch.testing.assert_close(answers(reloaded, faces)[1], answers(shipped, faces)[1])
    missing = subprocess.run([sys.executable, "-m", "training.grow_model", str(tmp_path / "nope"), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "nope is not a model folder" in missing.stderr


def test_narrowing_that_keeps_every_channel_keeps_the_answers_exactly(shipped, faces):
    same = narrow_model(shipped, list(shipped.config.hidden_sizes), shipped.config.embedding_size)
    for kept, original in zip(answers(same, faces), answers(shipped, faces)):
        torch.testing.assert_close(kept, original)


def test_narrowing_a_grown_model_back_finds_the_original_channels(shipped, faces):
    """A grown model's new channels are silent (batch norm scale 0); narrowing it back to the shipped widths must
    drop exactly them, channel for channel, and so give the shipped model's answers again."""
    grown = grow_model(shipped, hidden_sizes=[40, 80, 160, 320], embedding_size=40).eval()
    back = narrow_model(grown, list(shipped.config.hidden_sizes), shipped.config.embedding_size)
    for narrowed, original in zip(answers(back, faces), answers(shipped, faces)):
        torch.testing.assert_close(narrowed, original)


def test_narrowed_model_is_smaller_and_still_reads_faces(shipped, faces):
    narrow = narrow_model(shipped, **NARROW)
    assert narrow.config.hidden_sizes == NARROW["hidden_sizes"] and narrow.config.embedding_size == 20
    assert sum(p.numel() for p in narrow.parameters()) < 0.5 * sum(p.numel() for p in shipped.parameters())
    age, gender = answers(narrow, faces)
    assert age.shape == (8, shipped.config.num_ages) and torch.isfinite(gender).all()


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"hidden_sizes": [32, 64, 128, 320], "embedding_size": 32}, "only remove"),
        ({"hidden_sizes": [20, 40, 80], "embedding_size": 20}, "same length"),
        ({"hidden_sizes": [20, 40, 80, 160], "embedding_size": 32}, "embedding_size 20"),
    ],
)
def test_narrowing_refuses_widths_it_cannot_make(shipped, overrides, words):
    with pytest.raises(ValueError, match=words):
        narrow_model(shipped, **overrides)


def test_narrowing_command_writes_a_model_folder_train_can_start_from(tmp_path, shipped, faces, shipped_network):
    source, out = shipped_network, tmp_path / "narrow"
    widths = [str(width) for width in NARROW["hidden_sizes"]]
    done = subprocess.run(
        [sys.executable, "-m", "training.narrow_model", str(source), str(out), "--hidden_sizes", *widths, "--embedding_size", "20"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert "narrowed model" in done.stdout and str(out) in done.stdout
    reloaded = AgeGenderModel.from_pretrained(out)
    assert reloaded.config.hidden_sizes == NARROW["hidden_sizes"]
    torch.testing.assert_close(answers(reloaded, faces)[1], answers(narrow_model(shipped, **NARROW), faces)[1])
    missing = subprocess.run(
        [sys.executable, "-m", "training.narrow_model", str(tmp_path / "nope"), str(out), "--hidden_sizes", *widths, "--embedding_size", "20"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert missing.returncode != 0 and "nope is not a model folder" in missing.stderr
