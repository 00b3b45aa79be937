"""Models of several networks (`ensemble_size`), put together from trained models by training/combine_models.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import ROOT, face_like, require_shipped_model
from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel
from modeling.modeling_age_gender import read_faces
from training.combine_models import combine_models, combined_processor
from faces.onnx_model import onnx_inputs
from training.export_onnx import export_float
from training.model_card import framing_note, reading_note, write_model_card


def jittered(seed: int, **overrides) -> AgeGenderModel:
    """A small untrained model with its weights moved off the initialisation, so that two seeds answer differently."""
    torch.manual_seed(seed)
    model = AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter += 0.05 * torch.randn_like(parameter)
    return model


def logits(model: AgeGenderModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels)
    return out.age_logits, out.gender_logits


def test_a_combined_model_averages_its_networks_logits():
    first, second = jittered(0), jittered(1)
    pixels = torch.randn(4, 3, 32, 32)
    combined = combine_models([first, second])
    assert combined.config.ensemble_size == 2 and len(combined.other_networks) == 1
    for mixed, a, b in zip(logits(combined, pixels), logits(first, pixels), logits(second, pixels)):
        assert not torch.allclose(a, b)
        torch.testing.assert_close(mixed, (a + b) / 2)
    with torch.no_grad():
        out = combined(pixel_values=pixels)
    assert out.pooler_output.shape == (4, 2 * combined.config.hidden_sizes[-1])
    torch.testing.assert_close(out.age, out.age_logits.softmax(-1) @ torch.arange(combined.config.num_ages, dtype=torch.float32))


def test_networks_of_other_framings_read_their_own_out_of_the_widest(tmp_path):
    """A network trained on UTKFace's framing beside one trained 1.3125 times wider: the combined model's input is
    framed at the wider at 42 px (32 x 1.3125); the first network reads its centre 32 px as they are, the second all
    of it shrunk to 32 px, each as it read faces alone; through ONNX too."""
    tight, wide = jittered(0), jittered(1, network_zooms=[1.3125])
    assert (tight.config.input_size, wide.config.input_size, wide.config.input_zoom) == (32, 42, 1.3125)
    combined = combine_models([tight, wide])
    assert combined.config.network_zooms == [1.0, 1.3125] and combined.config.input_size == 42
    pixels = torch.rand(3, 3, 42, 42) * 2 - 1
    for mixed, a, b in zip(logits(combined, pixels), logits(tight, pixels[..., 5:37, 5:37]), logits(wide, pixels)):
        torch.testing.assert_close(mixed, (a + b) / 2)
    session = ort.InferenceSession(str(export_float(combined, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    gender = session.run(["gender_logits"], {"pixel_values": pixels.numpy(), "framing_filled": np.zeros(3, dtype=bool)})[0]
    torch.testing.assert_close(torch.from_numpy(gender), logits(combined, pixels)[1], atol=1e-4, rtol=1e-4)
    processors = [AgeGenderImageProcessor(image_size=32), AgeGenderImageProcessor(image_size=42, face_zoom=1.3125)]
    processor = combined_processor(processors, ["tight", "wide"], combined)
    assert (processor.image_size, processor.face_zoom) == (42, 1.3125)
    with pytest.raises(ValueError, match="wide prepares faces differently from tight"):
        combined_processor([processors[0], AgeGenderImageProcessor(image_size=42, face_zoom=1.3125, image_std=[0.2] * 3)], ["tight", "wide"], combined)
    with pytest.raises(ValueError, match=r"network_zooms needs one zoom of 1 or more per network \(1\), got \[0.8\]"):
        AgeGenderConfig(network_zooms=[0.8])


def test_a_network_reads_a_wider_framing_at_full_scale_when_asked(tmp_path):
    """`network_read_sizes`: a network that reads its 1.3125 framing at 42 px (32 x 1.3125) sees the model's input
    as it is, where one that reads it shrunk sees 32 px; beside a tight network, each reads its own view of one
    input, and the pair exports to ONNX exactly."""
    native = jittered(1, network_zooms=[1.3125], network_read_sizes=[42])
    shrunk = jittered(1, network_zooms=[1.3125])
    assert (native.config.input_size, shrunk.config.network_read_sizes) == (42, [32])
    pixels = torch.rand(3, 3, 42, 42) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(logits(native, pixels)[1], read_faces(native, pixels.contiguous(memory_format=torch.channels_last))[2])
    assert not torch.allclose(logits(native, pixels)[1], logits(shrunk, pixels)[1])
    tight = jittered(0)
    combined = combine_models([tight, native])
    assert combined.config.network_read_sizes == [32, 42] and combined.config.input_size == 42
    assert "read framings 1 at 32 px, 1.3125 at 42 px" in framing_note(combined.config)
    assert "mostly its photo's repeated edge" in framing_note(combined.config) and "repeated edge" not in framing_note(native.config)
    for mixed, a, b in zip(logits(combined, pixels), logits(tight, pixels[..., 5:37, 5:37]), logits(native, pixels)):
        torch.testing.assert_close(mixed, (a + b) / 2)
    session = ort.InferenceSession(str(export_float(combined, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    gender = session.run(["gender_logits"], {"pixel_values": pixels.numpy(), "framing_filled": np.zeros(3, dtype=bool)})[0]
    torch.testing.assert_close(torch.from_numpy(gender), logits(combined, pixels)[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"network_read_sizes needs one positive size per network \(2\), got \[42\]"):
        AgeGenderConfig(ensemble_size=2, network_read_sizes=[42])


@pytest.mark.parametrize("flip_average", [False, True], ids=["once", "mirrored"])
def test_a_face_whose_wider_framing_is_filled_is_read_by_the_tight_network_alone(tmp_path, flip_average):
    """`framing_filled`: in a pair of a tight and a wide network, a face whose wider framing repeats its photo's
    edge is read by the tight network beside its mirror image, the others as before (each network once, or each
    beside the mirror image); through ONNX alike, whatever mix of faces a batch holds. A model whose networks all
    read one framing ignores the flags, as training does."""
    tight, wide = jittered(0), jittered(1, network_zooms=[1.3125], network_read_sizes=[42])
    combined = combine_models([tight, wide])
    combined.config.flip_average = flip_average
    assert combined.config.reads_framings_apart and not tight.config.reads_framings_apart
    pixels = torch.rand(5, 3, 42, 42) * 2 - 1
    filled = torch.tensor([True, False, True, False, False])
    centre = pixels[..., 5:37, 5:37]
    with torch.no_grad():
        plain = combined(pixel_values=pixels).gender_logits
        read = combined(pixel_values=pixels, framing_filled=filled)
        tight_mirrored = (tight(pixel_values=centre).gender_logits + tight(pixel_values=centre.flip(-1)).gender_logits) / 2
    torch.testing.assert_close(read.gender_logits[~filled], plain[~filled])
    torch.testing.assert_close(read.gender_logits[filled], tight_mirrored[filled])
    assert read.pooler_output.shape == (5, 2 * combined.config.hidden_sizes[-1])
    assert not read.pooler_output[filled][:, combined.config.hidden_sizes[-1] :].any()  # no wide reading of them
    session = ort.InferenceSession(str(export_float(combined, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "framing_filled"]
    for flags in (filled, torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)):
        gender = session.run(["gender_logits"], {"pixel_values": pixels.numpy(), "framing_filled": flags.numpy()})[0]
        with torch.no_grad():
            expected = combined(pixel_values=pixels, framing_filled=flags).gender_logits
        torch.testing.assert_close(torch.from_numpy(gender), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(tight(pixel_values=centre, framing_filled=filled).gender_logits, tight(pixel_values=centre).gender_logits)
        combined.train()
        torch.manual_seed(0)
        in_training = combined(pixel_values=pixels, framing_filled=filled).gender_logits
        torch.manual_seed(0)
        torch.testing.assert_close(in_training, combined(pixel_values=pixels).gender_logits)


def test_photo_networks_read_the_faces_framed_from_their_photo_alone(tmp_path):
    """`photo_networks`: a wide network that reads photo faces better alone than averaged with the tight one reads
    them alone, while the tight one keeps the edge-filled faces (beside their mirror image); a batch without flags
    is all photo faces; each face is read only by its own readers; through saving, loading and ONNX alike."""
    tight, wide = jittered(0), jittered(1, network_zooms=[1.3125], network_read_sizes=[42])
    combined = combine_models([tight, wide], photo_networks=[1])
    combined.save_pretrained(tmp_path / "pair")
    reloaded = AgeGenderModel.from_pretrained(tmp_path / "pair")
    assert reloaded.config.photo_networks == [1] and reloaded.config.photo_network_indices == [1]
    pixels = torch.rand(5, 3, 42, 42) * 2 - 1
    filled = torch.tensor([True, False, True, False, False])
    centre = pixels[..., 5:37, 5:37]
    with torch.no_grad():
        read = reloaded(pixel_values=pixels, framing_filled=filled)
        unflagged = reloaded(pixel_values=pixels).gender_logits
        wide_alone = wide(pixel_values=pixels).gender_logits
        tight_mirrored = (tight(pixel_values=centre).gender_logits + tight(pixel_values=centre.flip(-1)).gender_logits) / 2
        averaged = combine_models([tight, wide])(pixel_values=pixels, framing_filled=filled).gender_logits
    torch.testing.assert_close(read.gender_logits[~filled], wide_alone[~filled])
    torch.testing.assert_close(read.gender_logits[filled], tight_mirrored[filled])
    torch.testing.assert_close(unflagged, wide_alone)
    assert not torch.allclose(averaged[~filled], wide_alone[~filled])  # the option changes what photo faces get
    width = combined.config.hidden_sizes[-1]
    assert not read.pooler_output[~filled][:, :width].any() and read.pooler_output[~filled][:, width:].any()
    assert read.pooler_output[filled][:, :width].any() and not read.pooler_output[filled][:, width:].any()
    session = ort.InferenceSession(str(export_float(reloaded, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    for flags in (filled, torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)):
        gender = session.run(["gender_logits"], {"pixel_values": pixels.numpy(), "framing_filled": flags.numpy()})[0]
        with torch.no_grad():
            expected = reloaded(pixel_values=pixels, framing_filled=flags).gender_logits
        torch.testing.assert_close(torch.from_numpy(gender), expected, atol=1e-4, rtol=1e-4)
    assert "read once, by network 1 (counting from 0) of its 2 (`photo_networks`)" in reading_note(reloaded.config.to_dict())
    mirrored = {**reloaded.config.to_dict(), "flip_average": True}
    assert "read beside its mirror image (`flip_average`), by network 1 (counting from 0) of its 2" in reading_note(mirrored)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"photo_networks": [2]}, r"one or more of the 2 networks by index \(0 to 1\), each once, got \[2\]"),
        ({"photo_networks": []}, "got \\[\\]"),
        ({"photo_networks": [1, 1]}, "each once"),
        ({"photo_networks": [1], "network_zooms": [1.0, 1.0]}, "networks that read different framings; these all read 1"),
    ],
)
def test_bad_photo_networks_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        AgeGenderConfig(ensemble_size=2, **{"network_zooms": [1.0, 1.3125], **overrides})


def test_an_ensemble_trains_as_one_model():
    """The loss is on the averaged logits, and every network gets a gradient from it."""
    combined = combine_models([jittered(0), jittered(1)]).train()
    out = combined(pixel_values=torch.randn(4, 3, 32, 32), age=torch.tensor([20.0, 30, 40, 50]), gender=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    for network in combined.networks():
        assert network.gender_head[-1].weight.grad.abs().sum() > 0


def test_an_ensemble_saves_loads_and_combines_again(tmp_path):
    combined = combine_models([jittered(0), jittered(1)], flip_average=True)
    combined.save_pretrained(tmp_path / "two")
    reloaded = AgeGenderModel.from_pretrained(tmp_path / "two")
    assert reloaded.config.ensemble_size == 2 and reloaded.config.flip_average is True
    pixels = torch.randn(3, 3, 32, 32)
    for a, b in zip(logits(reloaded, pixels), logits(combined, pixels)):
        torch.testing.assert_close(a, b)
    three = combine_models([reloaded, jittered(2)])  # an ensemble gives all its networks
    assert three.config.ensemble_size == 3 and three.config.flip_average is False
    reloaded.config.flip_average = False
    for mixed, pair, single in zip(logits(three, pixels), logits(reloaded, pixels), logits(jittered(2), pixels)):
        torch.testing.assert_close(mixed, (2 * pair + single) / 3)


def test_networks_of_different_widths_combine_each_keeping_its_own(tmp_path):
    """A narrow network reading the wider framing at full scale beside a tight one of the shipped widths
    (`network_hidden_sizes`): each answers as it did alone, after saving and loading and through ONNX, and the
    model card names the widths."""
    tight = jittered(0)
    narrow = jittered(1, hidden_sizes=[16, 32, 64, 128], embedding_size=16, network_zooms=[1.3125], network_read_sizes=[42])
    combined = combine_models([tight, narrow])
    assert combined.config.network_hidden_sizes == [[32, 64, 128, 256], [16, 32, 64, 128]]
    assert combined.config.network_embedding_sizes == [32, 16] and combined.config.hidden_sizes == [32, 64, 128, 256]
    combined.save_pretrained(tmp_path / "pair")
    reloaded = AgeGenderModel.from_pretrained(tmp_path / "pair")
    pixels = torch.rand(3, 3, 42, 42) * 2 - 1
    for mixed, a, b in zip(logits(reloaded, pixels), logits(tight, pixels[..., 5:37, 5:37]), logits(narrow, pixels)):
        torch.testing.assert_close(mixed, (a + b) / 2)
    with torch.no_grad():
        assert reloaded(pixel_values=pixels).pooler_output.shape == (3, 256 + 128)
    filled = torch.tensor([True, False, False])  # the tight network's 256 features, zeros for the narrow one's 128
    with torch.no_grad():
        apart = reloaded(pixel_values=pixels, framing_filled=filled)
    assert apart.pooler_output[0, :256].any() and not apart.pooler_output[0, 256:].any()
    session = ort.InferenceSession(str(export_float(reloaded, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    gender = session.run(["gender_logits"], {"pixel_values": pixels.numpy(), "framing_filled": filled.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(gender), apart.gender_logits, atol=1e-4, rtol=1e-4)
    note = reading_note(reloaded.config.to_dict())
    assert "networks of [32, 64, 128, 256] and [16, 32, 64, 128] channels per stage" in note and "the sum of its networks' costs" in note
    assert combine_models([tight, jittered(2)]).config.network_hidden_sizes is None  # alike: no per-network widths


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"network_hidden_sizes": [[32, 64, 128, 256], [16, 32, 64, 128]]}, "together, or neither"),
        ({"network_hidden_sizes": [[32, 64, 128, 256]], "network_embedding_sizes": [32]}, r"one entry per network \(2\)"),
        ({"network_hidden_sizes": [[32, 64, 128, 256], [16, 32, 64]], "network_embedding_sizes": [32, 16]}, "needs 4 positive widths"),
        ({"network_hidden_sizes": [[16, 32, 64, 128], [32, 64, 128, 256]], "network_embedding_sizes": [16, 32]}, "first network's widths"),
    ],
)
def test_bad_network_widths_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        AgeGenderConfig(ensemble_size=2, **overrides)


@pytest.mark.parametrize("overrides, field", [({"depths": [1, 1, 2, 2]}, "depths"), ({"max_age": 100}, "max_age")])
def test_networks_of_different_architectures_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"model 2 has {field} .* but model 1 has"):
        combine_models([jittered(0), jittered(1, **overrides)])
    with pytest.raises(ValueError, match="at least two"):
        combine_models([jittered(0)])


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_an_impossible_ensemble_size_is_refused(size):
    with pytest.raises(ValueError, match=f"ensemble_size .* got {size}"):
        AgeGenderConfig(ensemble_size=size)


def test_the_command_combines_the_shipped_model_with_itself_and_it_exports_to_onnx(tmp_path):
    """The shipped model twice over (v7: its two networks twice) must answer as the shipped model read once, faces
    framed from a photo and edge-filled ones alike; through the CLI and ONNX."""
    shipped = require_shipped_model()
    out = tmp_path / "pair"
    done = subprocess.run(
        [sys.executable, "-m", "training.combine_models", str(out), str(shipped), str(shipped)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    single = AgeGenderModel.from_pretrained(shipped)
    networks = 2 * single.config.ensemble_size
    assert f"{networks} networks in {out} (flip_average False)" in done.stdout and "--calibrate" in done.stdout
    processor = AgeGenderImageProcessor.from_pretrained(out)
    pixels = processor([face_like(seed) for seed in range(4)], return_tensors="pt")["pixel_values"]
    single.config.flip_average = False
    pair = AgeGenderModel.from_pretrained(out)
    filled = torch.tensor([True, False, False, True])
    with torch.no_grad():
        for a, b in zip(logits(pair, pixels), logits(single, pixels)):
            torch.testing.assert_close(a, b)
        expected = single(pixel_values=pixels, framing_filled=filled).gender_logits
        torch.testing.assert_close(pair(pixel_values=pixels, framing_filled=filled).gender_logits, expected)

    session = ort.InferenceSession(str(export_float(pair, tmp_path / "pair.onnx")), providers=["CPUExecutionProvider"])
    gender = session.run(["gender_logits"], onnx_inputs([i.name for i in session.get_inputs()], pixels.numpy(), filled.numpy()))[0]
    torch.testing.assert_close(torch.from_numpy(gender), expected, atol=1e-4, rtol=1e-4)

    missing = subprocess.run([sys.executable, "-m", "training.combine_models", str(tmp_path / "x"), str(shipped), str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "nope is not a model folder" in missing.stderr


def test_the_command_takes_photo_networks_and_refuses_a_network_it_lacks(tmp_path):
    """`--photo_networks` through the CLI: recorded in the config and in the command the card shows; an index past
    the networks given is refused by name, with nothing written."""
    shipped = str(require_shipped_model())
    command = [sys.executable, "-m", "training.combine_models", str(tmp_path / "pair"), shipped, shipped, "--photo_networks", "1", "3"]
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    assert AgeGenderConfig.from_pretrained(tmp_path / "pair").photo_networks == [1, 3]
    assert json.loads((tmp_path / "pair" / "metrics.json").read_text())["command"].endswith("--photo_networks 1 3")
    command[3], command[-1] = str(tmp_path / "bad"), "4"
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "photo_networks must name one or more of the 4 networks" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_the_combined_model_card_names_each_network_and_how_it_reads(tmp_path):
    """metrics.json of a combined model carries each network's folder and training command into its card; the
    figures come from the shipped model's own metrics until eval_model --calibrate measures the combination."""
    shipped = require_shipped_model()
    out = tmp_path / "pair"
    subprocess.run([sys.executable, "-m", "training.combine_models", str(out), str(shipped), str(shipped)], cwd=ROOT, capture_output=True, text=True, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    original = json.loads((shipped / "metrics.json").read_text())
    assert metrics["command"] == f"python -m training.combine_models {out} {shipped} {shipped}"
    assert [n["command"] for n in metrics["networks"]] == [original["command"]] * 2
    assert metrics["parameters"] == 2 * original["parameters"] and metrics["train_sources"] == original["train_sources"]
    card = write_model_card(out, {**metrics, "test": original["test"], "validation": original["validation"]}).read_text()
    networks = 2 * json.loads((shipped / "config.json").read_text()).get("ensemble_size", 1)
    assert f"Each face is read once by each of its {networks} networks (`ensemble_size`), their logits averaged" in card
    assert "# network 2 (" in card and original["command"] in card and "combine_models.py" in card
    # the note on a fine-tune follows the command (the shipped v6 ran from scratch; v4 and v5 were fine-tunes)
    assert ("--init_from" in original["command"]) == ("starts from the weights of an earlier model" in card)
    fine_tune = {**metrics, "networks": [{**metrics["networks"][0], "command": original["command"] + " --init_from model"}, *metrics["networks"][1:]]}
    card = write_model_card(out, {**fine_tune, "test": original["test"], "validation": original["validation"]}).read_text()
    assert "starts from the weights of an earlier model" in card


def test_reading_note_counts_the_readings():
    assert reading_note({"ensemble_size": 2, "flip_average": True}).startswith("Each face is read beside its mirror image by each of its 2 networks")
    assert "at 4 times one network's cost" in reading_note({"ensemble_size": 2, "flip_average": True})
    assert reading_note({}) == "Each face is read once (`flip_average` off)."
