"""Pushing to the Hub, tested up to the network call."""

from __future__ import annotations

import pytest

from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel
from training.hub import HubUnavailableError, push_model_folder, upload_operations


@pytest.fixture
def model_folder(tmp_path):
    AgeGenderModel(AgeGenderConfig.from_preset("small", image_size=32)).save_pretrained(tmp_path)
    AgeGenderImageProcessor(image_size=32).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# card\n")
    return tmp_path


def test_upload_carries_model_card_and_one_copy_of_the_code(model_folder):
    names = {op.path_in_repo for op in upload_operations(model_folder)}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert {"configuration_age_gender.py", "modeling_age_gender.py", "image_processing_age_gender.py"} <= names


def test_upload_carries_the_onnx_export_in_its_folder(model_folder):
    (model_folder / "onnx").mkdir()
    for name in ("model.onnx", "checks.json"):
        (model_folder / "onnx" / name).write_bytes(b"{}")
    names = {op.path_in_repo for op in upload_operations(model_folder)}
    assert {"onnx/model.onnx", "onnx/checks.json"} <= names and "onnx/model_int8.onnx" not in names  # only what exists


def test_push_offline_fails_clearly_and_keeps_the_folder(model_folder, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="offline.*saved in"):
        push_model_folder(model_folder, "someone/age-gender")
    assert (model_folder / "model.safetensors").is_file()


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        push_model_folder(tmp_path, "someone/age-gender")
