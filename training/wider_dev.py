"""The real-photo check: WIDER FACE validation photos with labelled face boxes and perceived gender
(`../shared/datasets/wider-dev`, read at run time and never copied into the project).

A face counts as found when a predicted box overlaps its labelled box with IoU >= 0.4, one prediction per
face (greedy, best overlap first), as the photos' README prescribes. RetinaFace draws boxes as tight as
WIDER's (forehead to chin), so boxes are compared as they are.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_WIDER_DEV = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wider-dev"
MATCH_IOU = 0.4
SIZE_BANDS = (("64 px and over", 64, 10**9), ("32-63 px", 32, 64), ("under 32 px", 0, 32))


@dataclass
class LabelledPhoto:
    path: Path
    subset: str  # "portraits" or "groups"
    boxes: np.ndarray  # (N, 4) as x0, y0, x1, y1
    genders: list[str | None] = field(default_factory=list)  # "male", "female" or None per box


def load_wider_dev(root: str | Path = DEFAULT_WIDER_DEV) -> list[LabelledPhoto]:
    """Every photo with its boxes and the perceived gender of each face where annotated (Male or Female)."""
    root = Path(root)
    if not (root / "label.txt").is_file():
        raise FileNotFoundError(f"no wider-dev photos at {root} (expected label.txt, subsets.txt, images/)")
    subsets = dict(line.rstrip("\n").split("\t")[::-1] for line in (root / "subsets.txt").read_text().splitlines() if line.strip())
    boxes: dict[str, list[list[float]]] = {}
    current = None
    for line in (root / "label.txt").read_text().splitlines():
        if line.startswith("# "):
            current = line[2:].strip()
            boxes[current] = []
        elif line.strip():
            x, y, w, h = map(float, line.split()[:4])
            boxes[current].append([x, y, x + w, y + h])
    genders: dict[tuple[str, tuple[float, ...]], str] = {}
    with open(root / "demographics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["perceived_gender"] in ("Male", "Female"):
                x, y, w, h = (float(row[k]) for k in ("x_min", "y_min", "width", "height"))
                genders[(row["file"].removeprefix("images/"), (x, y, x + w, y + h))] = row["perceived_gender"].lower()
    return [
        LabelledPhoto(
            path=root / "images" / name,
            subset=subsets.get(name, "portraits"),
            boxes=np.asarray(photo_boxes, dtype=np.float64).reshape(-1, 4),
            genders=[genders.get((name, tuple(box))) for box in photo_boxes],
        )
        for name, photo_boxes in boxes.items()
    ]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def match_faces(labelled: np.ndarray, predicted: np.ndarray, min_iou: float = MATCH_IOU) -> dict[int, int]:
    """Labelled box index -> predicted box index, greedily by best overlap, each used once."""
    if len(labelled) == 0 or len(predicted) == 0:
        return {}
    ious = iou_matrix(labelled, predicted)
    matches: dict[int, int] = {}
    for flat in np.argsort(-ious, axis=None):
        i, j = divmod(int(flat), ious.shape[1])
        if ious[i, j] < min_iou:
            break
        if i not in matches and j not in matches.values():
            matches[i] = j
    return matches


def size_band(box: np.ndarray) -> str:
    height = box[3] - box[1]
    return next(name for name, low, high in SIZE_BANDS if low <= height < high)


def real_face_pixels(root: str | Path, processor, cache_dir: str | Path | None = None, min_height: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The faces of wider-dev with a perceived gender that the app's detector finds, cut by the app's aligner
    and made model-ready by `processor.to_uint8`: `(N, S, S, 3)` uint8 pixels, genders (0 male, 1 female) and
    whether each is framing filled (`faces.alignment.FILLED_SHARE`), as the app tells the model.
    Faces under `min_height` px are left out: too small to judge for annotators and model alike. Detection
    takes about half a minute, so the result is cached (never in the project: it holds WIDER pixels), keyed by
    the detector's settings too: they decide which faces are found."""
    import hashlib

    from faces.detection import DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD
    from faces.search import PHOTO_SEARCH_VERSION
    from training.data import default_cache_dir, write_atomically

    root = Path(root).resolve()
    settings = f"{root}|{(root / 'label.txt').stat().st_mtime_ns}|{processor.image_size}|{processor.face_zoom}|{min_height}|{DEFAULT_SCORE_THRESHOLD}|{DEFAULT_NMS_THRESHOLD}|{PHOTO_SEARCH_VERSION}|filled"
    key = hashlib.sha1(settings.encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"wider-dev-faces-{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["pixels"], stored["genders"], stored["filled"]
    pixels, genders, filled = detect_real_faces(root, processor, min_height)
    write_atomically(cache, lambda path: np.savez(path, pixels=pixels, genders=genders, filled=filled))
    return pixels, genders, filled


def detect_real_faces(root: Path, processor, min_height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from faces.alignment import align_face, framing_filled_in_photo
    from faces.detection import RetinaFaceDetector
    from faces.search import detect_in_photo
    from modeling.image_processing_age_gender import load_rgb_image

    detector = RetinaFaceDetector()  # at its defaults, which key the cache
    pixels, genders, filled = [], [], []
    for photo in load_wider_dev(root):
        wanted = [i for i, g in enumerate(photo.genders) if g is not None and photo.boxes[i, 3] - photo.boxes[i, 1] >= min_height]
        if not wanted:
            continue
        image = load_rgb_image(photo.path, processor.max_image_pixels)
        detections = detect_in_photo(detector, image)
        matches = match_faces(photo.boxes, np.asarray([d.box for d in detections]).reshape(-1, 4))
        for i in wanted:
            if i in matches:
                pixels.append(processor.to_uint8(align_face(image, detections[matches[i]].landmarks, zoom=processor.face_zoom)))
                genders.append(1 if photo.genders[i] == "female" else 0)
                filled.append(framing_filled_in_photo(image.size, detections[matches[i]].landmarks, processor.face_zoom))
    return np.stack(pixels), np.asarray(genders), np.asarray(filled)
