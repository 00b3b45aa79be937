"""Face alignment: cut each face out of a photo framed the way UTKFace frames its faces.

UTKFace's crops are dlib face chips (a similarity transform of the face onto a fixed template, 200 px, padding
0.2). Here the detector's own 5 landmarks are mapped onto `UTKFACE_TEMPLATE`, the median positions of those
landmarks in UTKFace's crops, by the least-squares similarity transform (rotation, uniform scale, shift).
This needs no second landmark model and holds up on tilted and profile faces, where dlib's 5-point shape
predictor often lands badly. benchmarks/face_detection.py measures how closely it re-cuts UTKFace's crops.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CHIP_SIZE = 200
# Median (x, y) of RetinaFace's 5 landmarks (left eye, right eye, nose tip, left and right mouth corner) found
# on 1,998 of 2,000 UTKFace training crops of 200 px (`python benchmarks/face_detection.py --template`).
UTKFACE_TEMPLATE = np.array(
    [[58.6, 56.4], [136.4, 58.0], [95.3, 106.7], [63.7, 135.2], [131.5, 137.1]], dtype=np.float64
)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation, uniform scale and shift that best maps `source` points onto `target`
    points in the least-squares sense (Umeyama, 1991), without reflection."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / source_centred.var(axis=0).sum()
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - matrix[:, :2] @ source_mean
    return matrix


def zoomed_template(zoom: float) -> np.ndarray:
    """`UTKFACE_TEMPLATE` shrunk about the chip's centre by `zoom`: a chip cut to it shows `zoom` times as much of
    the photo each way (1.0 is UTKFace's framing; 1.3 takes in more hair, ears and neck)."""
    if not zoom > 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    return (UTKFACE_TEMPLATE - CHIP_SIZE / 2) / zoom + CHIP_SIZE / 2


# A face whose chip has more than this share of its area outside the photo is "framing filled": a network that reads
# a wider framing than UTKFace's would see a repeated edge over much of what it learnt to read (hair, shoulders).
# A UTKFace crop widened to 1.3125 has 42% of its area filled; of wider-dev's 876 faces, 33 pass a tenth.
FILLED_SHARE = 0.1


def chip_transform(landmarks: np.ndarray, size: int = CHIP_SIZE, zoom: float = 1.0) -> np.ndarray:
    """The 2x3 matrix that takes a photo's pixels to the chip's, for the face with these 5 landmarks."""
    return similarity_transform(np.asarray(landmarks, dtype=np.float64), zoomed_template(zoom) * size / CHIP_SIZE)


def share_outside_photo(photo_size: tuple[int, int], landmarks: np.ndarray, zoom: float = 1.0, samples: int = 32) -> float:
    """The share of the face's chip at framing `zoom` that lies outside a photo of `photo_size` (width, height):
    the part `align_face` fills by repeating the photo's edge. Measured on a `samples` x `samples` grid."""
    from_chip = np.linalg.inv(np.vstack([chip_transform(landmarks, CHIP_SIZE, zoom), [0, 0, 1]]))[:2]
    steps = (np.arange(samples) + 0.5) * CHIP_SIZE / samples
    grid = np.stack(np.meshgrid(steps, steps), axis=-1).reshape(-1, 2)
    x, y = (np.c_[grid, np.ones(len(grid))] @ from_chip.T).T
    return float(np.mean((x < 0) | (y < 0) | (x >= photo_size[0]) | (y >= photo_size[1])))


def widened_crop_share(zoom: float) -> float:
    """The share of a crop widened `zoom` times by `reframe_chip` that repeats its edge (none below 1)."""
    return max(0.0, 1 - 1 / zoom**2)


def framing_filled_in_photo(photo_size: tuple[int, int], landmarks: np.ndarray, zoom: float) -> bool:
    """Whether the face's chip at framing `zoom` has more than `FILLED_SHARE` of it outside the photo."""
    return share_outside_photo(photo_size, landmarks, zoom) > FILLED_SHARE


def widened_crop_filled(zoom: float) -> bool:
    """Whether a crop widened `zoom` times by `reframe_chip` (UTKFace's, a face crop given as it is) has more than
    `FILLED_SHARE` of it repeated edge."""
    return widened_crop_share(zoom) > FILLED_SHARE


def align_face(photo: Image.Image, landmarks: np.ndarray, size: int = CHIP_SIZE, zoom: float = 1.0) -> Image.Image:
    """A `size` x `size` RGB crop of the face whose 5 landmarks (in the photo's pixels) are given, framed like
    UTKFace's crops, or `zoom` times wider (`zoomed_template`). Areas outside the photo are filled by repeating its
    edge, as UTKFace's crops are."""
    to_chip = chip_transform(landmarks, size, zoom)
    # The chip's corners in the photo, to cut only the part of the photo the chip covers.
    from_chip = np.linalg.inv(np.vstack([to_chip, [0, 0, 1]]))[:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ from_chip.T
    left, top = np.floor(corners.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(corners.max(axis=0)).astype(int) + 1
    region = edge_padded_crop(photo, left, top, right, bottom)
    # Faces much larger than the chip are first shrunk by an integer factor with an averaging filter, so that
    # the bilinear warp below samples a picture of about the chip's resolution instead of aliasing.
    photo_pixels_per_chip_pixel = 1.0 / np.sqrt(abs(np.linalg.det(to_chip[:, :2])))
    reduce = max(1, int(photo_pixels_per_chip_pixel // 1.5))
    if reduce > 1:
        region = region.reduce(reduce)
    shift = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]]) / np.array([[reduce], [reduce], [1.0]])
    chip_to_region = shift @ np.vstack([from_chip, [0, 0, 1]])
    return region.transform((size, size), Image.Transform.AFFINE, tuple(chip_to_region[:2].ravel()), Image.Resampling.BILINEAR)


def reframe_chip(chip: Image.Image, zoom: float) -> Image.Image:
    """A chip framed `zoom` times wider about its centre, as a square of its shorter side: above 1 the parts
    beyond it repeat its edge (a UTKFace crop has nothing more of its photo), below 1 its centre is cut out. It
    lets faces cut at one framing (UTKFace's crops, a cache of real faces) be read by a model, or a teacher, that
    reads another."""
    if zoom == 1:
        return chip
    side = min(chip.size) * zoom
    left, top = (chip.width - side) / 2, (chip.height - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    return edge_padded_crop(chip, *box).resize((min(chip.size),) * 2, Image.Resampling.BILINEAR, reducing_gap=None)


def edge_padded_crop(photo: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """`photo.crop((left, top, right, bottom))` where the parts outside the photo repeat its nearest edge pixels
    rather than turning black."""
    inside = (max(left, 0), max(top, 0), min(right, photo.width), min(bottom, photo.height))
    if inside == (left, top, right, bottom):
        return photo.crop(inside)
    if inside[0] >= inside[2] or inside[1] >= inside[3]:
        inside = (min(max(left, 0), photo.width - 1), min(max(top, 0), photo.height - 1))
        inside = (*inside, inside[0] + 1, inside[1] + 1)
    pixels = np.asarray(photo.crop(inside))
    pad = ((inside[1] - top, bottom - inside[3]), (inside[0] - left, right - inside[2]), (0, 0))
    return Image.fromarray(np.pad(pixels, [(max(0, a), max(0, b)) for a, b in pad[:2]] + [pad[2]], mode="edge"))
