"""Face detection and framing, measured on a test built here from UTKFace's test split.

    python benchmarks/face_detection.py --data ../shared/datasets/UTKFace.tar.gz

1. Framing: each UTKFace crop is placed on a larger canvas (edges extended), detected, and cut again with
   dlib's 5-point face chip at several paddings; the padding whose chip is closest to the original crop is
   the framing that photo inference should use.
2. Recall: UTKFace faces shrunk to 40-200 px are pasted at random places on non-face backgrounds; a face
   counts as found when a detection overlaps it (IoU >= 0.3). False detections are counted on the same
   backgrounds with no face pasted. Reported per minimum detection score.
3. Speed of the detector at 640x480 and 1920x1080.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dlib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from faces import CHIP_SIZE, FaceAnalyzer, box_iou, shape_predictor_path  # noqa: E402
from training.data import load_utkface  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def framing_error(faces: list[Image.Image], paddings: list[float]) -> dict[float, float]:
    detector, landmarks = dlib.get_frontal_face_detector(), dlib.shape_predictor(shape_predictor_path())
    errors: dict[float, list[float]] = {p: [] for p in paddings}
    for face in faces:
        original = np.asarray(face.convert("RGB").resize((CHIP_SIZE, CHIP_SIZE)))
        canvas = np.pad(original, ((100, 100), (100, 100), (0, 0)), mode="edge")
        rects = detector(canvas, 1)
        if not rects:
            continue
        shape = landmarks(canvas, max(rects, key=lambda r: r.area()))
        for padding in paddings:
            chip = dlib.get_face_chip(canvas, shape, size=CHIP_SIZE, padding=padding)
            errors[padding].append(float(np.abs(chip.astype(float) - original).mean()))
    return {p: float(np.mean(v)) for p, v in errors.items() if v}


def backgrounds(rng: np.random.Generator, count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Face-free scenes: crops of the cat photo, smooth random colour fields and noise."""
    cat = Image.open(EXAMPLES / "chelsea_the_cat.jpg").convert("RGB").resize((size[0] * 2, size[1] * 2))
    scenes = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            x, y = rng.integers(0, cat.width - size[0]), rng.integers(0, cat.height - size[1])
            scenes.append(cat.crop((x, y, x + size[0], y + size[1])))
        elif kind == 1:
            scenes.append(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC))
        else:
            scenes.append(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))
    return scenes


def recall_test(analyzer: FaceAnalyzer, faces: list[Image.Image], thresholds: list[float], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size = (640, 480)
    scenes = backgrounds(rng, len(faces), size)
    found = {t: 0 for t in thresholds}
    by_size: dict[str, list[int]] = {}
    for face, scene in zip(faces, scenes):
        side = int(rng.integers(40, 201))
        x, y = int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side))
        scene = scene.copy()
        scene.paste(face.convert("RGB").resize((side, side)), (x, y))
        # UTKFace crops hold the face in the middle ~60%: compare against that region.
        truth = [x + int(0.2 * side), y + int(0.2 * side), x + int(0.8 * side), y + int(0.8 * side)]
        detections = analyzer.detect(scene)
        best = max((score for rect, score in detections if box_iou(truth, [rect.left(), rect.top(), rect.right(), rect.bottom()]) >= 0.3), default=None)
        for t in thresholds:
            found[t] += best is not None and best >= t
        bucket = f"{(side // 40) * 40}-{(side // 40) * 40 + 39}px"
        by_size.setdefault(bucket, []).append(best is not None and best >= thresholds[0])
    false_positives = {t: 0 for t in thresholds}
    for scene in backgrounds(np.random.default_rng(seed + 1), len(faces), size):
        for _, score in analyzer.detect(scene):
            for t in thresholds:
                false_positives[t] += score >= t
    return {
        "recall": {t: found[t] / len(faces) for t in thresholds},
        "false_positives_per_image": {t: false_positives[t] / len(faces) for t in thresholds},
        "recall_by_face_size": {k: float(np.mean(v)) for k, v in sorted(by_size.items())},
    }


def detector_speed(analyzer: FaceAnalyzer, repeats: int = 10) -> dict[str, float]:
    photo = Image.open(EXAMPLES / "three_portraits.jpg").convert("RGB")
    timings = {}
    for size in ((640, 480), (1920, 1080)):
        image = photo.resize(size)
        scaled, _ = analyzer.load_photo(image)
        analyzer.detect(scaled)
        started = time.perf_counter()
        for _ in range(repeats):
            analyzer.detect(analyzer.load_photo(image)[0])
        timings[f"{size[0]}x{size[1]}"] = (time.perf_counter() - started) / repeats * 1000
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "UTKFace.tar.gz"))
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model"))
    parser.add_argument("--faces", type=int, default=300)
    args = parser.parse_args()
    test = load_utkface(args.data, verbose=False)["test"].shuffle(seed=0).select(range(args.faces))
    faces = [row["image"] for row in test]
    paddings = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    errors = framing_error(faces[:100], paddings)
    print("Framing: mean absolute pixel difference between a re-cut chip and the UTKFace original (100 faces)")
    for padding, error in errors.items():
        print(f"  padding {padding:.2f}: {error:5.1f}")
    print(f"  closest: padding {min(errors, key=errors.get):.2f}")
    analyzer = FaceAnalyzer(args.model, min_detection_score=-0.5)
    thresholds = [-0.5, 0.0, 0.1, 0.2, 0.3, 0.5]
    result = recall_test(analyzer, faces, thresholds)
    print(f"\nRecall on {len(faces)} UTKFace test faces of 40-200 px pasted on 640x480 scenes (detect_side {analyzer.detect_side}):")
    for t in thresholds:
        print(f"  min score {t:+.1f}: recall {result['recall'][t]:.1%}, false detections per face-free image {result['false_positives_per_image'][t]:.3f}")
    print("  recall by face size (any score):", ", ".join(f"{k} {v:.0%}" for k, v in result["recall_by_face_size"].items()))
    print("\nDetector time per photo (ms):", ", ".join(f"{k} {v:.0f}" for k, v in detector_speed(analyzer).items()))


if __name__ == "__main__":
    main()
