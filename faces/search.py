"""Finding every face in a photo: the detector's passes over it (a coarser one for faces too large for the
first), faces on their side or upside down searched again turned upright, and the faces put in reading order.
Boxes and landmarks come back in the pixels of the photo as it was given."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .alignment import edge_padded_crop
from .detection import Detection, RetinaFaceDetector, box_iou


def reading_order(boxes: list[np.ndarray]) -> list[int]:
    """Indices of the boxes in reading order: rows from top to bottom, left to right within a row. A box joins
    the current row when its centre is less than half a face height below the row's mean centre, so that
    people standing side by side at slightly different heights stay one row."""
    if not boxes:
        return []
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[3] - b[1]) for b in boxes]
    rows: list[list[int]] = []
    for index in sorted(range(len(boxes)), key=lambda i: centres[i][1]):
        if rows:
            row = rows[-1]
            row_y = np.mean([centres[i][1] for i in row])
            row_height = np.median([centres[i][2] for i in row])
            if centres[index][1] - row_y < 0.5 * row_height:
                row.append(index)
                continue
        rows.append([index])
    return [i for row in rows for i in sorted(row, key=lambda i: centres[i][0])]


# RetinaFace's anchors reach 512 px and it was trained on 640 px crops: a face much taller than LARGE_FACE px in
# its input comes out as several boxes on parts of the face (from about 900 px, 500 px when blurred), each with
# its own age. Such a face is taken from a second pass with the photo's long side at COARSE_SIDE instead.
LARGE_FACE = 384
COARSE_SIDE = 512
# How photos are searched (the passes above, faces turned upright below) decides which faces are found and how
# they are framed: caches of found faces (training/wider_dev.py) are keyed by this; raise it when that changes.
PHOTO_SEARCH_VERSION = 2


def detect_at_side(detector: RetinaFaceDetector, photo: Image.Image, side: int, min_score: float | None) -> tuple[list[Detection], float]:
    """Faces found with the photo's long side at `side` px, in the photo's own pixels, and the photo-to-detector
    scale."""
    factor = side / max(photo.size)
    work = photo if abs(factor - 1) < 0.02 else photo.resize(
        (max(1, round(photo.width * factor)), max(1, round(photo.height * factor))), Image.Resampling.BILINEAR
    )
    return [d.scaled(photo.width / work.width) for d in detector(np.asarray(work), min_score)], work.width / photo.width


def height(detection: Detection) -> float:
    return float(detection.box[3] - detection.box[1])


def share_inside(inner: np.ndarray, outer: np.ndarray) -> float:
    """How much of box `inner`'s area lies inside box `outer`."""
    overlap = np.clip(np.minimum(inner[2:], outer[2:]) - np.maximum(inner[:2], outer[:2]), 0, None)
    area = np.prod(inner[2:] - inner[:2])
    return float(np.prod(overlap) / area) if area > 0 else 0.0


def take_large_faces_from_coarse_pass(fine: list[Detection], coarse: list[Detection], large: float) -> list[Detection]:
    """Each pass answers for the sizes it sees well: faces at least `large` px tall (photo pixels) come from the
    coarse pass, and a fine-pass box that lies mostly inside one of them is a part of that face. A fine-pass box
    that tall which the coarse pass does not confirm is dropped: the coarse pass sees such a face at a size
    it knows well, so the box is most likely not a face (a ball, a pattern, a whole scene)."""
    large_faces = [c for c in coarse if height(c) >= large]
    kept = [
        f for f in fine
        if not any(share_inside(f.box, c.box) >= 0.5 for c in large_faces)
        and (height(f) < large or any(box_iou(f.box, c.box) >= 0.5 for c in coarse))
    ]
    return large_faces + kept


# Quarter turns that bring a region upright (PIL's transposes turn counter-clockwise), and each one's inverse
# on points: where a point of the turned S x S region lay in the region before the turn.
QUARTER_TURNS = {
    1: (Image.Transpose.ROTATE_90, lambda u, v, side: (side - v, u)),
    2: (Image.Transpose.ROTATE_180, lambda u, v, side: (side - u, side - v)),
    3: (Image.Transpose.ROTATE_270, lambda u, v, side: (v, side - u)),
}


def roll_degrees(landmarks: np.ndarray) -> float:
    """The face's turn in the image plane: the angle of the line from its image-left eye to its image-right eye
    (0 upright, -90 turned a quarter counter-clockwise, 180 upside down)."""
    (left_x, left_y), (right_x, right_y) = landmarks[0], landmarks[1]
    return float(np.degrees(np.arctan2(right_y - left_y, right_x - left_x)))


def turned_upright(detector: RetinaFaceDetector, photo: Image.Image, detection: Detection, min_score: float | None) -> Detection:
    """A face lying on its side or upside down (a photo without its EXIF rotation, someone lying down) is found,
    but RetinaFace, trained on upright faces, places its landmarks loosely there, and the crop cut from them was
    aged and gendered badly (the astronaut example turned a quarter: a man of 32; upside down: a man of 65, for a
    woman of 29 upright). The region around such a face is turned upright by quarter turns and searched again;
    the box and landmarks found there are turned back. The turned face must be found upright, on the same spot
    and more surely than at first: on wider-dev most faces whose landmarks lie askew are upright profiles, which
    turned regions found worse (46 faces; without those conditions 0.9-1.1 points of recall were lost)."""
    likely = round(roll_degrees(detection.landmarks) / 90) % 4
    if likely == 0:
        return detection
    x0, y0, x1, y1 = detection.box
    side = round(2 * max(x1 - x0, y1 - y0))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    region = edge_padded_crop(photo, left, top, left + side, top + side)
    # The turn the landmarks point to first; the others when they were too loose to point the right way.
    for turns in sorted(QUARTER_TURNS, key=lambda t: t != likely):
        transpose, turn_back = QUARTER_TURNS[turns]

        def to_photo(points: np.ndarray) -> np.ndarray:
            return np.array([turn_back(u, v, side) for u, v in points]) + [left, top]

        found, _ = detect_at_side(detector, region.transpose(transpose), min(max(side, 320), 640), min_score)
        for candidate in found:
            corners = to_photo(candidate.box.reshape(2, 2))
            box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
            if abs(roll_degrees(candidate.landmarks)) < 45 and candidate.score > detection.score and box_iou(box, detection.box) >= 0.4:
                return Detection(box, candidate.score, to_photo(candidate.landmarks))
    return detection


def detect_in_photo(
    detector: RetinaFaceDetector, photo: Image.Image, detect_side: int = 1280, min_detect_side: int = 320, min_score: float | None = None
) -> list[Detection]:
    """Faces in reading order, found at a long side between `min_detect_side` and `detect_side` (the photo's
    own size where it lies between), with boxes and landmarks in the photo's own pixels; `min_score` overrides
    the detector's threshold. When a face is taller than `LARGE_FACE` px at that size, a coarser pass (long side
    `COARSE_SIDE`) gives the large faces; a face on its side or upside down is searched again turned upright."""
    side = min(max(max(photo.size), min_detect_side), detect_side)
    detections, scale = detect_at_side(detector, photo, side, min_score)
    if side >= 1.25 * COARSE_SIDE and any(height(d) * scale >= LARGE_FACE for d in detections):
        coarse, _ = detect_at_side(detector, photo, COARSE_SIDE, min_score)
        detections = take_large_faces_from_coarse_pass(detections, coarse, LARGE_FACE / scale)
    detections = [turned_upright(detector, photo, d, min_score) for d in detections]
    return [detections[i] for i in reading_order([d.box for d in detections])]
