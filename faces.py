"""Photo inference: find every face in a photo, frame it the way UTKFace frames its faces, and estimate its
age and gender. Gradio-free, so that tests and users can call it from Python:

    from faces import FaceAnalyzer
    analyzer = FaceAnalyzer("model")
    result = analyzer.analyze("group.jpg")
    for face in result.faces: print(face.box, face.label)
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoImageProcessor, AutoModel

import modeling  # noqa: F401  (registers the model with the Auto classes)
from modeling.image_processing_age_gender import ImageLike
from modeling.modeling_age_gender import age_interval_bounds

DEFAULT_MODEL = Path(__file__).resolve().parent / "model"
# UTKFace's crops are dlib face chips: cutting our faces with the same 5-point alignment, chip size and
# padding frames them as in training (benchmarks/face_framing.py measures the padding).
CHIP_SIZE = 200
CHIP_PADDING = 0.2


def shape_predictor_path() -> str:
    """dlib's 5-point landmark model, shipped by the PyPI package face_recognition_models (read as data, since
    importing that package needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed: pip install face_recognition_models")
    return os.path.join(spec.submodule_search_locations[0], "models", "shape_predictor_5_face_landmarks.dat")


@dataclass
class FaceRecord:
    """One face: its box in the returned image's pixels, and what the model says of it."""

    box: list[int]
    age: float
    age_interval: list[int]
    age_std: float
    gender: str
    gender_score: float
    detection_score: float | None = None
    age_distribution: list[float] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        """A short label such as "F 31 (27-36)"."""
        return f"{self.gender[0].upper()} {self.age:.0f} ({self.age_interval[0]}-{self.age_interval[1]})"

    def to_json(self) -> dict:
        record = asdict(self)
        record.pop("age_distribution")
        return record


@dataclass
class PhotoResult:
    """What `FaceAnalyzer.analyze` found. `image` is the RGB photo the boxes refer to (downscaled if it was
    larger than `max_side`); `whole_image` is set when no face was found and the photo was read as one face."""

    image: Image.Image
    faces: list[FaceRecord]
    whole_image: FaceRecord | None = None
    scale: float = 1.0


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
    split bfloat16 changed age MAE by +0.005 years and no gender (training/evaluate.py --dtype), at 1.8x the
    faces/s on this project's CPU (benchmarks/inference.py)."""
    if dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', not {dtype!r}")
    return getattr(torch, dtype)


class FaceAnalyzer:
    """Loads the model once and answers photos: detect (dlib HOG), align (5 landmarks), predict, draw.

    Args:
        model: a model folder or Hub id (default: the shipped `model/`).
        max_side: photos are downscaled so that their longer side is at most this; boxes refer to that size.
        detect_side: the detector sees the photo rescaled so that its longer side is this. dlib's HOG detector
            finds faces from about 80 px, so small photos are enlarged: at 960, faces of 53 px in a 640 px
            photo are found, at about a third of the cost of dlib's own 2x upsampling.
        min_detection_score: detections scoring below this are dropped. 0.1 keeps 88% recall on the test of
            benchmarks/face_detection.py while dropping its false detections (dlib's own threshold is 0).
        batch_size: faces predicted per forward pass.
        dtype: "auto" (bfloat16 on CPUs that compute it natively, else float32), "float32" or "bfloat16".
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        max_side: int = 1280,
        detect_side: int = 960,
        min_detection_score: float = 0.1,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "auto",
    ):
        self.model_source = str(model)
        self.model = AutoModel.from_pretrained(self.model_source, dtype=resolve_dtype(dtype, device)).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(self.model_source)
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(shape_predictor_path())
        self.max_side = max_side
        self.detect_side = detect_side
        self.min_detection_score = min_detection_score
        self.batch_size = batch_size
        self.device = device
        # dlib's detector and shape predictor are not thread-safe: two requests at once crashed the server
        # (benchmarks/app_load.py). One photo at a time also suits torch, which uses every core per photo.
        self._lock = threading.Lock()

    def load_photo(self, image: ImageLike) -> tuple[Image.Image, float]:
        """The photo as RGB, downscaled to `max_side`, and the scale applied."""
        rgb = self.processor.load_rgb(image)
        scale = min(1.0, self.max_side / max(rgb.size))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BILINEAR)
        return rgb, scale

    def detect(self, photo: Image.Image) -> list[tuple[dlib.rectangle, float]]:
        """Face rectangles in the photo's pixels and detector scores, best first."""
        factor = self.detect_side / max(photo.size)
        work = photo if abs(factor - 1) < 0.05 else photo.resize(
            (max(1, round(photo.width * factor)), max(1, round(photo.height * factor))), Image.Resampling.BILINEAR
        )
        rects, scores, _ = self.detector.run(np.asarray(work), 0, self.min_detection_score)
        scale = photo.width / work.width
        found = [
            (dlib.rectangle(round(r.left() * scale), round(r.top() * scale), round(r.right() * scale), round(r.bottom() * scale)), score)
            for r, score in zip(rects, scores)
        ]
        return sorted(found, key=lambda pair: -pair[1])

    def face_chips(self, pixels: np.ndarray, rects: list[dlib.rectangle]) -> list[np.ndarray]:
        """Aligned crops framed like UTKFace's."""
        return [dlib.get_face_chip(pixels, self.landmarks(pixels, rect), size=CHIP_SIZE, padding=CHIP_PADDING) for rect in rects]

    @torch.inference_mode()
    def predict_faces(self, faces: list[ImageLike]) -> list[FaceRecord]:
        """Age and gender for face crops, in batches; boxes are left empty."""
        records = []
        for start in range(0, len(faces), self.batch_size):
            inputs = self.processor(images=faces[start : start + self.batch_size], return_tensors="pt").to(self.device)
            out = self.model(**inputs)
            low, high = self.model.age_interval(out.age, out.age_std)
            gender_probs = out.gender_logits.softmax(-1)
            age_probs = out.age_logits.softmax(-1)
            for i in range(len(out.age)):
                gender_id = int(gender_probs[i].argmax())
                records.append(
                    FaceRecord(
                        box=[],
                        age=round(float(out.age[i]), 1),
                        age_interval=[int(low[i]), int(high[i])],
                        age_std=round(float(out.age_std[i]), 2),
                        gender=self.model.config.id2label[gender_id],
                        gender_score=round(float(gender_probs[i, gender_id]), 4),
                        age_distribution=[round(float(p), 5) for p in age_probs[i]],
                    )
                )
        return records

    def analyze(self, image: ImageLike, assume_face_crop: bool = False) -> PhotoResult:
        """Every face in a photo, or the photo as one face when `assume_face_crop` is set. When no face is
        found, `whole_image` holds the prediction for the photo read as a single face crop."""
        rgb, scale = self.load_photo(image)
        with self._lock:
            return self._analyze_rgb(rgb, scale, assume_face_crop)

    def _analyze_rgb(self, rgb: Image.Image, scale: float, assume_face_crop: bool) -> PhotoResult:
        if assume_face_crop:
            face = self.predict_faces([rgb])[0]
            face.box = [0, 0, rgb.width, rgb.height]
            return PhotoResult(image=rgb, faces=[face], scale=scale)
        detections = self.detect(rgb)
        if not detections:
            whole = self.predict_faces([rgb])[0]
            whole.box = [0, 0, rgb.width, rgb.height]
            return PhotoResult(image=rgb, faces=[], whole_image=whole, scale=scale)
        records = self.predict_faces(self.face_chips(np.asarray(rgb), [rect for rect, _ in detections]))
        for record, (rect, detection_score) in zip(records, detections):
            record.box = [max(0, rect.left()), max(0, rect.top()), min(rgb.width, rect.right()), min(rgb.height, rect.bottom())]
            record.detection_score = round(float(detection_score), 3)
        return PhotoResult(image=rgb, faces=records, scale=scale)


def annotate(image: Image.Image, faces: list[FaceRecord]) -> Image.Image:
    """A copy of the photo with a box and a label per face, sized to the photo."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 40)))
    for face in faces:
        colour = (230, 80, 140) if face.gender == "female" else (40, 130, 230)
        x0, y0, x1, y1 = face.box
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        text_box = draw.textbbox((x0, y0), face.label, font=font)
        height = text_box[3] - text_box[1] + 2 * line
        top = y0 - height if y0 - height >= 0 else y1
        draw.rectangle([x0, top, x0 + text_box[2] - text_box[0] + 2 * line, top + height], fill=colour)
        draw.text((x0 + line, top + line - (text_box[1] - y0)), face.label, fill="white", font=font)
    return canvas


def box_iou(a: list[int], b: list[int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    box: list[int]
    age: float
    age_std: float
    female_prob: float
    missed: int = 0


class FaceTracker:
    """Smooths webcam predictions across frames: each face is matched to the previous frame's by box overlap,
    and its age and gender probability are exponential moving averages, so labels do not jump."""

    def __init__(self, smoothing: float = 0.7, min_iou: float = 0.3, max_missed: int = 3):
        self.smoothing = smoothing
        self.min_iou = min_iou
        self.max_missed = max_missed
        self.tracks: list[Track] = []

    def update(self, faces: list[FaceRecord], model_config) -> list[FaceRecord]:
        """The faces of a new frame with smoothed age, interval and gender."""
        unmatched = list(self.tracks)
        smoothed, tracks = [], []
        for face in faces:
            female_prob = face.gender_score if face.gender == "female" else 1 - face.gender_score
            match = max(unmatched, key=lambda t: box_iou(t.box, face.box), default=None)
            if match is not None and box_iou(match.box, face.box) >= self.min_iou:
                unmatched.remove(match)
                keep = self.smoothing
                track = Track(
                    box=face.box,
                    age=keep * match.age + (1 - keep) * face.age,
                    age_std=keep * match.age_std + (1 - keep) * face.age_std,
                    female_prob=keep * match.female_prob + (1 - keep) * female_prob,
                )
            else:
                track = Track(box=face.box, age=face.age, age_std=face.age_std, female_prob=female_prob)
            tracks.append(track)
            smoothed.append(self.as_record(track, face, model_config))
        self.tracks = tracks + [Track(**{**asdict(t), "missed": t.missed + 1}) for t in unmatched if t.missed + 1 <= self.max_missed]
        return smoothed

    @staticmethod
    def as_record(track: Track, face: FaceRecord, config) -> FaceRecord:
        low, high = age_interval_bounds(torch.tensor(track.age), torch.tensor(track.age_std), config)
        female = track.female_prob >= 0.5
        return FaceRecord(
            box=face.box,
            age=round(track.age, 1),
            age_interval=[int(low), int(high)],
            age_std=round(track.age_std, 2),
            gender="female" if female else "male",
            gender_score=round(track.female_prob if female else 1 - track.female_prob, 4),
            detection_score=face.detection_score,
        )
