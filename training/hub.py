"""Pushing a trained model folder to the Hugging Face Hub, with the code that loads it.

    python -m training.hub model user/age-gender-cnn
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants

MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
OPTIONAL_FILES = ("README.md", "metrics.json", "training_curves.png")
# The ONNX export (`python -m training.export_onnx`) travels as it is, in its own folder, as Hub repositories lay it out.
ONNX_FOLDER = "onnx"
# `auto_map` in config.json names these modules: the Hub copy carries them so that
# `AutoModel.from_pretrained(repo, trust_remote_code=True)` works with only transformers installed.
CODE_FILES = ("configuration_age_gender.py", "modeling_age_gender.py", "image_processing_age_gender.py")


class HubUnavailableError(RuntimeError):
    """The Hub cannot be reached; what was saved locally is kept."""


def upload_operations(folder: Path) -> list[CommitOperationAdd]:
    """The model files of `folder` (with its ONNX export where there is one) and the project's one copy of the
    model code."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a saved model: missing {', '.join(missing)}")
    files = {name: folder / name for name in REQUIRED_FILES + OPTIONAL_FILES if (folder / name).is_file()}
    files.update({f"{ONNX_FOLDER}/{path.name}": path for path in sorted((folder / ONNX_FOLDER).glob("*")) if path.is_file()})
    files.update({name: MODELING_DIR / name for name in CODE_FILES})
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]


def push_model_folder(folder: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create `repo_id` if needed and upload model, image processor config, card and code in one commit."""
    operations = upload_operations(Path(folder))
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(
            f"cannot push to {repo_id}: the Hub is offline (HF_HUB_OFFLINE=1). The model is saved in {folder}; "
            f"push it later with: python -m training.hub {folder} {repo_id}"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message="Upload age and gender CNN")
    except Exception as error:
        raise HubUnavailableError(f"cannot push to {repo_id}: {error}. The model is saved in {folder}.") from error
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Push a trained model folder to the Hub, with its code.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    print(push_model_folder(args.folder, args.repo_id, token=args.token, private=args.private))


if __name__ == "__main__":
    main()
