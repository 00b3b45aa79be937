"""Photo inference: find every face in a photo, frame it the way UTKFace frames its faces, and estimate its
age and gender. Boxes and landmarks are always in the pixels of the photo as it was given (after its EXIF
rotation), whatever size the detector worked at."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import modeling  # noqa: F401  (registers the model with the Auto classes)
from modeling.image_processing_age_gender import ImageLike, load_rgb_image

from .alignment import CHIP_SIZE, align_face, framing_filled_in_photo, reframe_chip, widened_crop_filled
from .detection import Detection, RetinaFaceDetector
from .onnx_model import OnnxAgeGenderModel
from .search import detect_in_photo

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model"
# On real photos a gender given with at least this confidence was right 96.5% of the time (v5 on wider-dev: 542
# of 876 faces) and under it 69% (334 faces), so labels mark the genders under it as guesses (v6: 96.3% of the
# 65% of faces shown without "?"; v7: 95.4% of 69%).
CONFIDENT_GENDER_SCORE = 0.9
# A child's gender is a guess however sure the model is: on UTKFace's validation split v5 gave 84 of the 241
# faces it reads as under 10 years a gender at 90% or more, and those were right 84.5% of the time, against 98.7%
# from 10 years on (test split: 91.0% against 98.2%; docs/experiments.md); v6 gave 91 of 255 such faces, right
# 90.1% of the time against 98.6%, v7 92 of 256, right 90.2% against 98.6%.
CHILD_AGE = 10
RUNTIMES = ("torch", "onnx", "onnx-int8")


def gender_is_guess(gender_score, age):
    """The labels' "?": a gender under `CONFIDENT_GENDER_SCORE`, or of a face read as under `CHILD_AGE`. Takes
    numbers or tensors alike, so that evaluation measures the rule the app applies."""
    return (gender_score < CONFIDENT_GENDER_SCORE) | (age < CHILD_AGE)


@dataclass
class FaceRecord:
    """One face: its box `[x0, y0, x1, y1]` and landmarks in the photo's pixels, and what the model says of it."""

    box: list[int]
    age: float
    age_interval: list[int]
    age_std: float
    gender: str
    gender_score: float
    detection_score: float | None = None
    landmarks: list[list[float]] = field(default_factory=list)
    age_distribution: list[float] = field(default_factory=list, repr=False)
    gender_probs: list[float] = field(default_factory=list, repr=False)

    @property
    def gender_is_guess(self) -> bool:
        """Whether the gender is to be read as a guess: under `CONFIDENT_GENDER_SCORE`, or a face read as a child
        (under `CHILD_AGE` years), whose confident genders are right far less often than adults'."""
        return bool(gender_is_guess(self.gender_score, self.age))

    @property
    def gender_mark(self) -> str:
        """"F" or "M", with a question mark when the gender is a guess (`gender_is_guess`)."""
        return self.gender[0].upper() + ("?" if self.gender_is_guess else "")

    @property
    def label(self) -> str:
        """A short label such as "F 31 (27-36)", or "F? 31 (27-36)" when the gender is a guess."""
        return f"{self.gender_mark} {self.age:.0f} ({self.age_interval[0]}-{self.age_interval[1]})"

    def to_json(self) -> dict:
        record = asdict(self)
        record.pop("age_distribution")
        record.pop("gender_probs")
        record["gender_is_guess"] = self.gender_is_guess
        return record


@dataclass
class PhotoResult:
    """What `FaceAnalyzer.analyze` found. `image` is the upright RGB photo that boxes refer to, at its own size;
    `faces` are in reading order (rows top to bottom, left to right in a row), and empty when no face was found:
    a photo without a face gets no age or gender (the model would read a cat, a balloon or the sky as a person)
    unless the caller says it is a face crop (`assume_face_crop`)."""

    image: Image.Image
    faces: list[FaceRecord]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo, the frame of every box."""
        return self.image.size


def native_bfloat16(device: str) -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it,
    slower than float32, so "auto" keeps float32 there and on GPUs, where this model is fast either way."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"float32", "bfloat16", or "auto": bfloat16 where the CPU has it natively. On the shipped model's test
    split bfloat16 changed age MAE by +0.005 years and no gender (training/eval_model.py --dtype), at 1.8x the
    faces/s on this project's CPU (benchmarks/inference.py)."""
    if dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', not {dtype!r}")
    return getattr(torch, dtype)


def checked_model_source(model: str | os.PathLike) -> str:
    """`model` as given, after refusing at once a path to a folder that does not exist. Anything that is not a
    plain "user/name" Hub id, or whose first part is a local folder (`runs/nope`), is taken as a path: such
    names used to be tried on the Hub, with five retries over about 25 s before an unrelated network error."""
    source = str(model)
    path = Path(source).expanduser()
    parts = source.split("/")
    hub_id = len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(parts[0]).is_dir()
    if not path.is_dir() and not hub_id:
        raise FileNotFoundError(f"no model folder at {source}: give a folder holding config.json and model.safetensors, or a Hub id (user/name)")
    return source


class FaceAnalyzer:
    """Loads the model and the face detector once and answers photos: detect (RetinaFace), align (5 landmarks
    onto UTKFace's framing), predict.

    Args:
        model: a model folder or Hub id (default: the shipped `model/`).
        detect_side: the detector sees photos larger than this shrunk to this long side, and smaller photos at
            their own size (up to `min_detect_side`). 1280 finds faces of 32 px in a 1024 px group photo at
            their own resolution; benchmarks/face_detection.py measures recall and time for other values.
        min_detect_side: smaller photos are enlarged to this long side for the detector, whose smallest anchor
            is 16 px.
        min_detection_score: detections scoring below this (0-1) are dropped, unless a call to `detect` or
            `analyze` passes its own `min_score`: higher gives fewer boxes on things that are not faces (hands,
            patterns, faces in pictures), lower finds more small and blurred faces.
        batch_size: faces predicted per forward pass.
        dtype: "auto" (bfloat16 on CPUs that compute it natively, else float32), "float32" or "bfloat16".
        runtime: "torch", "onnx" (the folder's `onnx/model.onnx` on onnxruntime, float32) or "onnx-int8" (its
            `onnx/model_int8.onnx`); see `python -m training.export_onnx`. Same post-processing and answers
            within the export's checked tolerances; `dtype` and `device` apply to torch only.

    Safe to call from several threads at once: the detector's onnxruntime session, PIL and the model in
    inference mode keep no state between calls.
    """

    DEFAULT_MIN_SCORE = 0.5

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        detect_side: int = 1280,
        min_detect_side: int = 320,
        min_detection_score: float = DEFAULT_MIN_SCORE,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "auto",
        runtime: str = "torch",
    ):
        self.model_source = checked_model_source(model)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if runtime == "torch":
            self.model = AutoModel.from_pretrained(self.model_source, dtype=resolve_dtype(dtype, device)).to(device).eval()
        else:
            self.model = OnnxAgeGenderModel(self.model_source, "int8" if runtime == "onnx-int8" else "float32")
            device = "cpu"
        self.runtime = runtime
        self.processor = AutoImageProcessor.from_pretrained(self.model_source)
        self.detector = RetinaFaceDetector(score_threshold=min_detection_score)
        self.detect_side = detect_side
        self.min_detect_side = min_detect_side
        self.batch_size = batch_size
        self.device = device

    def load_photo(self, image: ImageLike) -> Image.Image:
        """The photo as upright 8-bit RGB at its own size; unreadable input raises `InvalidImageError`."""
        return load_rgb_image(image, self.processor.max_image_pixels)

    def detect(self, photo: Image.Image, min_score: float | None = None) -> list[Detection]:
        """Faces in the photo, in reading order, with boxes and landmarks in the photo's own pixels; `min_score`
        (0-1) replaces `min_detection_score` for this call."""
        if min_score is not None and not 0 < min_score <= 1:
            raise ValueError(f"min_score must lie in (0, 1], got {min_score}")
        return detect_in_photo(self.detector, photo, self.detect_side, self.min_detect_side, min_score)

    def face_crops(self, image: ImageLike) -> list[Image.Image]:
        """The aligned crops of every face in a photo, in reading order: what the model sees, and what
        `pipeline("age-gender-estimation")` and the model expect as input."""
        photo = self.load_photo(image)
        return [align_face(photo, detection.landmarks, zoom=self.processor.face_zoom) for detection in self.detect(photo)]

    @torch.inference_mode()
    def predict_faces(self, faces: list[ImageLike], framing_filled: list[bool] | None = None) -> list[FaceRecord]:
        """Age and gender for face crops, in batches; boxes are left empty. `framing_filled` marks the crops whose
        framing reaches well beyond their photo (`AgeGenderModel.forward`); None: every crop is of a photo."""
        records = []
        for start in range(0, len(faces), self.batch_size):
            inputs = self.processor(images=faces[start : start + self.batch_size], return_tensors="pt").to(self.device)
            if framing_filled is not None:
                inputs["framing_filled"] = torch.tensor(framing_filled[start : start + self.batch_size], dtype=torch.bool)
            outputs = self.model(**inputs)
            records += [FaceRecord(box=[], **r) for r in self.model.post_process_age_gender(outputs, return_distributions=True)]
        return records

    def analyze(self, image: ImageLike, assume_face_crop: bool = False, min_score: float | None = None) -> PhotoResult:
        """Every face in a photo scoring at least `min_score` (default `min_detection_score`), or the photo as
        one face when `assume_face_crop` is set; no face found gives no faces."""
        photo = self.load_photo(image)
        if assume_face_crop:  # framed as UTKFace frames its faces, as a face crop is taken to be
            zoom = self.processor.face_zoom
            face = self.predict_faces([reframe_chip(photo, zoom)], [widened_crop_filled(zoom)])[0]
            face.box = [0, 0, photo.width, photo.height]
            return PhotoResult(image=photo, faces=[face])
        detections = self.detect(photo, min_score)
        (faces,) = self.label_detections([photo], [detections]) if detections else ([],)
        return PhotoResult(image=photo, faces=faces)

    def label_detections(self, photos: list[Image.Image], detections: list[list[Detection]]) -> list[list[FaceRecord]]:
        """The faces found in each photo, aligned and predicted in batches that span the photos, with box
        (clipped to the photo), landmarks and detection score filled in."""
        zoom = self.processor.face_zoom
        crops = [align_face(photo, d.landmarks, CHIP_SIZE, zoom) for photo, found in zip(photos, detections) for d in found]
        filled = [framing_filled_in_photo(photo.size, d.landmarks, zoom) for photo, found in zip(photos, detections) for d in found]
        records = iter(self.predict_faces(crops, filled))
        labelled = []
        for photo, found in zip(photos, detections):
            faces = []
            for detection, record in zip(found, records):
                x0, y0, x1, y1 = detection.box
                record.box = [max(0, round(x0)), max(0, round(y0)), min(photo.width, round(x1)), min(photo.height, round(y1))]
                record.landmarks = np.round(detection.landmarks, 1).tolist()
                record.detection_score = round(detection.score, 3)
                faces.append(record)
            labelled.append(faces)
        return labelled
