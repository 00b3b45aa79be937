"""The model as a transformers model: Auto classes, save/load, the processor on every kind of image,
the pipeline, loss, the seed replica, and safe loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoImageProcessor, AutoModel, pipeline

from conftest import ROOT, face_like, require_shipped_model
from modeling import PIPELINE_TASK, AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel, InvalidImageError


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A small untrained model saved the way training saves one."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32)).eval()
    model.save_pretrained(folder)
    AgeGenderImageProcessor(image_size=32).save_pretrained(folder)
    return folder


def test_save_pretrained_writes_the_hub_files_and_code(saved_model):
    names = {p.name for p in saved_model.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert {"configuration_age_gender.py", "modeling_age_gender.py", "image_processing_age_gender.py"} <= names
    config = json.loads((saved_model / "config.json").read_text())
    assert config["model_type"] == "age_gender_cnn" and config["id2label"] == {"0": "male", "1": "female"}
    assert "AutoModel" in config["auto_map"]


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32)).eval()
    for parameter in model.parameters():  # away from the zero-initialised start, so every weight matters
        parameter.data += 0.05 * torch.randn_like(parameter)
    model.save_pretrained(tmp_path)
    AgeGenderImageProcessor(image_size=32).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, AgeGenderModel) and isinstance(processor, AgeGenderImageProcessor)
    inputs = processor(images=[face_like(1), face_like(2)], return_tensors="pt")
    with torch.inference_mode():
        first, second = model(**inputs), loaded(**inputs)
    assert (first.age[0] - first.age[1]).abs() > 1e-3  # outputs that depend on the input
    torch.testing.assert_close(first.age, second.age, rtol=0, atol=0)
    torch.testing.assert_close(first.gender_logits, second.gender_logits, rtol=0, atol=0)
    assert first.age.shape == (2,) and first.gender_logits.shape == (2, 2) and first.age_std.shape == (2,)
    assert ((first.age >= 0) & (first.age <= 116)).all()


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_auto_classes_work_from_a_fresh_interpreter(saved_model):
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import modeling
from transformers import AutoModel, AutoImageProcessor
from PIL import Image
m = AutoModel.from_pretrained({str(saved_model)!r}); p = AutoImageProcessor.from_pretrained({str(saved_model)!r})
out = m(**p(images=[Image.new("RGB", (50, 60))], return_tensors="pt"))
print(type(m).__name__, tuple(out.age.shape), tuple(out.gender_logits.shape), m.config.id2label)
"""
    result = run_python(code, ROOT)
    assert result.returncode == 0, result.stderr
    assert "AgeGenderModel (1,) (1, 2) {0: 'male', 1: 'female'}" in result.stdout


def test_remote_code_loads_with_only_transformers_and_only_when_trusted(saved_model, tmp_path):
    """What a Hub user gets: the code files pushed with the weights, no project checkout on the path."""
    code = f"""
from transformers import AutoModel, AutoImageProcessor
try:
    AutoModel.from_pretrained({str(saved_model)!r})
    print("LOADED WITHOUT TRUST")
except Exception as error:
    print("refused:", type(error).__name__)
m = AutoModel.from_pretrained({str(saved_model)!r}, trust_remote_code=True)
p = AutoImageProcessor.from_pretrained({str(saved_model)!r}, trust_remote_code=True)
import numpy as np
out = m(**p(images=np.zeros((40, 40, 3), dtype=np.uint8), return_tensors="pt"))
print(type(m).__name__, float(out.age[0]) >= 0)
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LOADED WITHOUT TRUST" not in result.stdout and "refused:" in result.stdout
    assert "AgeGenderModel True" in result.stdout


def test_only_safetensors_are_read(saved_model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((saved_model / "config.json").read_text())
    torch.save(AutoModel.from_pretrained(saved_model).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        AutoModel.from_pretrained(folder)


def test_truncated_weights_give_an_error_that_names_the_file(saved_model, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((saved_model / name).read_text())
    (folder / "model.safetensors").write_bytes((saved_model / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(OSError, match=f"model.safetensors of {folder} is corrupt or truncated"):
        AutoModel.from_pretrained(folder)


def image_in_mode(mode: str) -> Image.Image:
    rgb = face_like(3, 80)
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode == "P-transparent":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "P-transparent", "RGBA", "LA", "CMYK", "YCbCr", "I", "I;16", "F"])
def test_processor_reads_every_image_mode(mode):
    processor = AgeGenderImageProcessor(image_size=32)
    pixel_values = processor(images=image_in_mode(mode), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all() and pixel_values.abs().max() <= 1.0 + 1e-6


def test_sixteen_bit_pixels_are_scaled_not_clipped():
    processor = AgeGenderImageProcessor(image_size=8)
    mid_gray = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    assert abs(int(processor.to_uint8(mid_gray)[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (4000, 3000), (37, 300), (300, 37)])
def test_processor_handles_tiny_huge_and_non_square_images(size):
    processor = AgeGenderImageProcessor(image_size=32)
    assert processor(images=Image.new("RGB", size, (10, 200, 30)))["pixel_values"].shape == (1, 3, 32, 32)


def test_processor_accepts_arrays_tensors_paths_and_bytes(tmp_path):
    processor = AgeGenderImageProcessor(image_size=32)
    image = face_like(5, 64)
    path = tmp_path / "face.png"
    image.save(path)
    reference = processor(images=image)["pixel_values"]
    array = np.asarray(image)
    for variant in (array, array.transpose(2, 0, 1), torch.from_numpy(array.copy()), array.astype(np.float32) / 255, str(path), path, path.read_bytes()):
        torch.testing.assert_close(processor(images=variant)["pixel_values"], reference, atol=2 / 255 / 0.5, rtol=0)
    assert processor(images=np.asarray(image.convert("L")))["pixel_values"].shape == (1, 3, 32, 32)


def test_processor_honours_exif_orientation(tmp_path):
    processor = AgeGenderImageProcessor(image_size=16)
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored rotated; EXIF 6 says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    upright_again = np.asarray(processor.load_rgb(path)).astype(int)
    assert upright_again.shape == (20, 40, 3)
    assert abs(upright_again[10, 5] - [0, 0, 255]).sum() < 60 and abs(upright_again[10, 34] - [255, 0, 0]).sum() < 60  # blue on the left


def test_bfloat16_weights_take_float32_pixels_and_give_float32_answers():
    """On the shipped model and three real faces whose ages differ by decades, so that matching answers are
    not the trivial agreement of a model that says the same for everything."""
    from faces import FaceAnalyzer

    shipped = require_shipped_model()
    crops = FaceAnalyzer(shipped, dtype="float32").face_crops(ROOT / "examples" / "three_portraits.jpg")
    pixels = AutoImageProcessor.from_pretrained(shipped)(images=crops)["pixel_values"]
    exact = AutoModel.from_pretrained(shipped).eval()
    fast = AutoModel.from_pretrained(shipped, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        a, b = exact(pixel_values=pixels), fast(pixel_values=pixels)
    assert fast.dtype == torch.bfloat16 and b.age.dtype == b.age_std.dtype == b.gender_logits.dtype == torch.float32
    assert a.age.max() - a.age.min() > 15
    assert torch.allclose(a.age, b.age, atol=1.0)
    assert torch.equal(a.gender_logits.argmax(-1), b.gender_logits.argmax(-1))


def test_batch_gives_the_same_results_as_single_images(saved_model):
    model = AutoModel.from_pretrained(saved_model).eval()
    processor = AutoImageProcessor.from_pretrained(saved_model)
    images = [face_like(i) for i in range(4)]
    with torch.inference_mode():
        batch = model(**processor(images=images))
        singles = [model(**processor(images=image)) for image in images]
    torch.testing.assert_close(batch.age, torch.cat([s.age for s in singles]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batch.gender_logits, torch.cat([s.gender_logits for s in singles]), atol=1e-4, rtol=1e-5)


def test_loss_falls_when_overfitting_a_handful_of_faces():
    torch.manual_seed(0)
    model = AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32))
    processor = AgeGenderImageProcessor(image_size=32)
    inputs = processor(images=[face_like(i) for i in range(8)])
    age, gender = torch.tensor([5.0, 20, 35, 50, 65, 80, 12, 44]), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(**inputs, age=age, gender=gender).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    with torch.inference_mode():
        out = model(**inputs)
    assert (out.age - age).abs().mean() < 5


def test_seed_replica_matches_the_seed_notebook_parameter_count():
    model = AgeGenderModel(AgeGenderConfig.from_preset("seed"))
    total = sum(p.numel() for p in model.parameters())
    output_layers = sum(p.numel() for head in (model.age_head, model.gender_head) for p in head[-1].parameters())
    # The seed's Keras summary: 5,108,034 parameters, of which 2 x 257 in its two one-unit output layers.
    assert total - output_layers == 5_108_034 - 2 * 257


def test_pipeline_returns_one_record_per_image(saved_model, tmp_path):
    estimator = pipeline(PIPELINE_TASK, model=str(saved_model))
    path = tmp_path / "face.jpg"
    face_like(9).save(path)
    single = estimator(str(path))
    assert set(single) == {"age", "age_interval", "age_std", "gender", "gender_score"}
    assert isinstance(single["age"], float) and single["gender"] in ("male", "female")
    low, high = single["age_interval"]
    assert isinstance(low, int) and low <= single["age"] <= high
    assert 0.5 <= single["gender_score"] <= 1
    many = estimator([face_like(1), str(path), face_like(2)])
    assert len(many) == 3 and many[1] == single


def test_processor_takes_the_standard_options_and_refuses_unknown_ones():
    processor = AgeGenderImageProcessor(image_size=32)
    face = face_like(5, size=48)
    assert processor(images=face)["pixel_values"].shape == (1, 3, 32, 32)
    assert processor(images=face, size={"height": 24, "width": 24})["pixel_values"].shape == (1, 3, 24, 24)
    assert processor(images=face, size=16)["pixel_values"].shape == (1, 3, 16, 16)
    assert processor(images=face, do_resize=False)["pixel_values"].shape == (1, 3, 48, 48)
    raw = processor(images=face, do_normalize=False)["pixel_values"]
    assert raw.min() >= 0 and raw.max() > 1  # the 0-255 scale
    zero_one = processor(images=face, image_mean=[0, 0, 0], image_std=[1, 1, 1])["pixel_values"]
    torch.testing.assert_close(zero_one * 255, raw)
    with pytest.raises(TypeError, match="unexpected arguments: do_center_krop"):
        processor(images=face, do_center_krop=True)
    with pytest.raises(ValueError, match="same size"):
        processor(images=[face, face_like(6, size=40)], do_resize=False)


def test_post_processing_is_one_path_with_labels_from_the_config(saved_model):
    model = AutoModel.from_pretrained(saved_model).eval()
    processor = AgeGenderImageProcessor.from_pretrained(saved_model)
    with torch.inference_mode():
        outputs = model(**processor(images=[face_like(3), face_like(4)]))
    records = model.post_process_age_gender(outputs, return_distributions=True)
    assert [r["age"] for r in records] == [round(float(a), 1) for a in outputs.age]
    assert [r["gender"] for r in records] == [model.config.id2label[int(i)] for i in outputs.gender_logits.argmax(-1)]
    assert all(abs(sum(r["age_distribution"]) - 1) < 1e-3 and len(r["gender_probs"]) == 2 for r in records)
    model.config.id2label = {0: "woman", 1: "man"}  # renamed labels are what the answers say
    assert {r["gender"] for r in model.post_process_age_gender(outputs)} <= {"woman", "man"}


@pytest.mark.parametrize(
    "bad, message",
    [([], "no images"), ("does/not/exist.jpg", "no such image file"), (b"plain text", "not an image"), (42, "expected a PIL image")],
)
def test_bad_inputs_give_clear_errors(saved_model, bad, message):
    processor = AgeGenderImageProcessor.from_pretrained(saved_model)
    with pytest.raises(InvalidImageError, match=message):
        processor(images=bad)
    estimator = pipeline(PIPELINE_TASK, model=str(saved_model))
    with pytest.raises((InvalidImageError, ValueError), match=message):
        estimator(bad)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(path)  # 400 megapixels in a few kilobytes
    assert path.stat().st_size < 1_000_000
    with pytest.raises(InvalidImageError, match="too large"):
        AgeGenderImageProcessor()(images=str(path))


def test_animated_gif_uses_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 30), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert AgeGenderImageProcessor().to_uint8(str(path))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("preset", ["small", "base", "seed"])
def test_every_preset_builds_and_runs(preset):
    config = AgeGenderConfig.from_preset(preset)
    model = AgeGenderModel(config).eval()
    with torch.inference_mode():
        out = model(pixel_values=torch.zeros(2, 3, config.image_size, config.image_size))
    assert out.age.shape == (2,) and out.gender_logits.shape == (2, 2)


def test_downsampling_in_the_first_stage_gives_a_larger_input_the_cost_of_a_smaller_one(tmp_path):
    """96 px with `downsample_in_first_stage` reaches the stages at 24 px: fewer operations than 64 px without it,
    one small shortcut more in weights, and the setting survives saving."""
    plain = AgeGenderModel(AgeGenderConfig.from_preset("small")).eval()
    config = AgeGenderConfig.from_preset("small", image_size=96, downsample_in_first_stage=True)
    downsampled = AgeGenderModel(config).eval()
    stage_inputs = []
    downsampled.backbone[1].register_forward_hook(lambda module, inputs, output: stage_inputs.append(output.shape[-1]))
    flops = {}
    for name, model, side in (("64 px", plain, 64), ("96 px", downsampled, 96)):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(pixel_values=torch.zeros(1, 3, side, side))
        flops[name] = counter.get_total_flops()
    assert stage_inputs == [24]  # the first stage (one block) halves the stem's 48 px
    assert flops["96 px"] < flops["64 px"]
    shortcut = 32 * 32 + 2 * 32  # the strided first block's 1x1 projection and its batch norm
    assert sum(p.numel() for p in downsampled.parameters()) == sum(p.numel() for p in plain.parameters()) + shortcut
    downsampled.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).config.downsample_in_first_stage is True


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        AgeGenderConfig.from_preset("huge")
    with pytest.raises(ValueError, match="backbone"):
        AgeGenderConfig(backbone="vit")
    with pytest.raises(ValueError, match="same length"):
        AgeGenderConfig(hidden_sizes=[8, 16], depths=[1])
    with pytest.raises(ValueError, match="one scale per band"):
        AgeGenderConfig(age_interval_scale=[1.0, 1.2], age_interval_bands=[10, 30, 50])


def test_age_interval_scale_follows_the_band_of_the_predicted_age(tmp_path):
    """One scale per band of predicted age, a band starting at its edge; it survives save and load; a single
    scale (configs from before the bands) applies to every age."""
    from modeling.modeling_age_gender import age_interval_bounds

    config = AgeGenderConfig(age_interval_scale=[0.5, 1.0, 1.5, 2.0], age_interval_bands=[10, 30, 50])
    age = torch.tensor([9.9, 10.0, 29.9, 30.0, 50.0, 80.0])
    low, high = age_interval_bounds(age, torch.full_like(age, 4.0), config)
    assert low.tolist() == [7, 6, 25, 24, 42, 72]  # floor(age - scale x 4) with scales 0.5, 1, 1, 1.5, 2, 2
    config.save_pretrained(tmp_path)
    assert AgeGenderConfig.from_pretrained(tmp_path).age_interval_scale == [0.5, 1.0, 1.5, 2.0]
    single = AgeGenderConfig(age_interval_scale=1.0)
    assert age_interval_bounds(age, torch.full_like(age, 4.0), single)[1].tolist() == [14, 14, 34, 34, 54, 84]


def test_pipeline_never_prompts_for_remote_code(saved_model, monkeypatch):
    """The saved config names its code (`auto_map`) for Hub users; locally the registered classes are used
    and nothing waits on a "run custom code? [y/N]" prompt."""

    def refuse_prompt(*args, **kwargs):
        raise AssertionError("pipeline() asked a question on stdin")

    monkeypatch.setattr("builtins.input", refuse_prompt)
    assert pipeline(PIPELINE_TASK, model=str(saved_model))(face_like(4))["gender"] in ("male", "female")


def test_fresh_residual_blocks_start_as_their_shortcut():
    """Each residual branch's last norm starts at zero (transformers initialises a weight only once, children
    first, so this must be decided on the norm itself, not on its block)."""
    from modeling.modeling_age_gender import BasicBlock

    torch.manual_seed(0)
    model = AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32)).eval()
    blocks = [module for module in model.modules() if isinstance(module, BasicBlock)]
    assert blocks
    for block in blocks:
        hidden = torch.randn(2, block.conv1[0].in_channels, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(block(hidden), block.act(block.shortcut(hidden)))
        assert torch.count_nonzero(block.conv1[1].weight) == block.conv1[1].weight.numel()  # other norms start at one


def test_flip_average_reads_each_face_beside_its_mirror_image():
    torch.manual_seed(0)
    config = AgeGenderConfig.from_preset("small", image_size=32)
    model = AgeGenderModel(config).eval()
    for parameter in model.parameters():  # away from the zero-initialised start, so the mirror image differs
        parameter.data += 0.05 * torch.randn_like(parameter)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = model(pixel_values=pixels), model(pixel_values=pixels.flip(-1))
        model.config.flip_average = True
        averaged = model(pixel_values=pixels)
    assert not torch.allclose(plain.gender_logits, mirrored.gender_logits)
    torch.testing.assert_close(averaged.age_logits, (plain.age_logits + mirrored.age_logits) / 2)
    torch.testing.assert_close(averaged.gender_logits, (plain.gender_logits + mirrored.gender_logits) / 2)
    assert averaged.age.shape == (3,) and averaged.pooler_output.shape[0] == 3
    model.train()  # training sees each face once: augmentation flips faces already
    assert model(pixel_values=pixels).age_logits.shape[0] == 3
    assert AgeGenderConfig.from_dict(model.config.to_dict()).flip_average is True


def test_a_norm_missing_from_the_checkpoint_starts_with_batch_norms_defaults(tmp_path):
    """A checkpoint of the 64 px network loaded as the 96 px variant (`downsample_in_first_stage`) lacks the
    first block's new shortcut: its norm's statistics must be 0 and 1, not leftover memory (NaN answers)."""
    torch.manual_seed(0)
    AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "downsample_in_first_stage": True}))
    model = AgeGenderModel.from_pretrained(tmp_path).eval()
    norm = model.backbone[1].shortcut[1]
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=torch.randn(2, 3, 32, 32)).age_logits).all()
