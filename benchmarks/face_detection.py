"""Face detection, framing and real-photo gender, measured on real photos.

    python benchmarks/face_detection.py [--wider ../shared/datasets/wider-dev] [--data UTKFace.tar.gz]

1. Detection on wider-dev (WIDER FACE validation photos: 296 portraits with 1-6 faces of 64 px and over, 100
   group photos with 7-20 faces): recall by face height for each subset, extra boxes per photo (boxes that
   match no labelled face), for several minimum detection scores; the photos are given to `FaceAnalyzer` at
   their own size, and its boxes are compared in their pixels.
2. Gender of the found faces against WIDER's perceived gender (Male or Female), through the whole app path:
   detect, align, predict.
3. Framing: UTKFace test crops laid on a larger canvas (edges repeated), found and cut again by the app's
   detector and aligner; the mean absolute pixel difference to the original says how close the app's framing
   is to the training faces'. The same crops cut to their centre 80% and 65% (tight face crops, faces cut
   by the photo's border) then measure age and gender through the whole app path. `--template` instead
   prints the median landmark positions in UTKFace's crops, the alignment template in faces/alignment.py.
4. Time per photo, end to end (load, detect, align, predict, no drawing) and detection alone, at 640x480 and
   1920x1080.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import EXAMPLES, p50_p95, timings_ms  # noqa: E402
from faces import CHIP_SIZE, FaceAnalyzer, FaceTracker, RetinaFaceDetector, align_face, annotate  # noqa: E402
from training.wider_dev import DEFAULT_WIDER_DEV, SIZE_BANDS, load_wider_dev, match_faces, size_band  # noqa: E402

DEFAULT_UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "UTKFace.tar.gz"
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def wider_report(analyzer: FaceAnalyzer, wider: str, limit: int | None, gender_threshold: float) -> None:
    photos = load_wider_dev(wider)[:limit]
    found: dict[tuple, list[bool]] = defaultdict(list)
    extra: dict[tuple, list[int]] = defaultdict(list)
    gender_hits: dict[str, list[bool]] = defaultdict(list)
    seconds = []
    # Each threshold is its own run, as a user who sets it gets: a search at one threshold is not the search at
    # a lower one filtered (which faces are searched again turned upright or at a coarser scale depends on it).
    for photo in photos:
        started = time.perf_counter()
        image = analyzer.load_photo(photo.path)  # decoded once; its time counts in the end-to-end figure
        load_seconds = time.perf_counter() - started
        for threshold in THRESHOLDS:
            started = time.perf_counter()
            faces = analyzer.analyze(image, min_score=threshold).faces
            if threshold == gender_threshold:
                seconds.append(load_seconds + time.perf_counter() - started)
            matches = match_faces(photo.boxes, np.asarray([f.box for f in faces], dtype=np.float64).reshape(-1, 4))
            for i, box in enumerate(photo.boxes):
                found[(photo.subset, size_band(box), threshold)].append(i in matches)
            extra[(photo.subset, threshold)].append(len(faces) - len(matches))
            if threshold == gender_threshold:
                for i, j in matches.items():
                    if photo.genders[i] is not None:
                        gender_hits[photo.subset].append(faces[j].gender == photo.genders[i])
    print(f"wider-dev: {len(photos)} photos, {sum(len(p.boxes) for p in photos)} labelled faces; "
          f"detector at long side {analyzer.detect_side} (photos smaller than that at their own size)")
    print(f"{'subset':10} {'min score':>9} " + " ".join(f"{name:>16}" for name, _, _ in SIZE_BANDS) + f" {'extra boxes/photo':>18}")
    for subset in ("portraits", "groups"):
        for threshold in THRESHOLDS:
            cells = []
            for name, _, _ in SIZE_BANDS:
                hits = found.get((subset, name, threshold), [])
                cells.append(f"{np.mean(hits):6.1%} of {len(hits):4}" if hits else f"{'-':>16}")
            print(f"{subset:10} {threshold:9.1f} " + " ".join(f"{c:>16}" for c in cells) + f" {np.mean(extra[(subset, threshold)]):18.2f}")
    for subset, hits in gender_hits.items():
        print(f"gender of found faces ({subset}, min score {gender_threshold}): {np.mean(hits):.1%} of {len(hits)}")
    every = [h for hits in gender_hits.values() for h in hits]
    print(f"gender of found faces (all): {np.mean(every):.1%} of {len(every)}")
    print(f"time per wider-dev photo, end to end: p50 {np.median(seconds) * 1000:.0f} ms, p95 {np.percentile(seconds, 95) * 1000:.0f} ms")


def utkface_rows(data: str, count: int, split: str):
    from training.data import load_utkface

    return load_utkface(data, verbose=False)[split].shuffle(seed=0).select(range(count))


def utkface_crops(data: str, count: int, split: str) -> list[Image.Image]:
    return [row["image"].convert("RGB").resize((CHIP_SIZE, CHIP_SIZE)) for row in utkface_rows(data, count, split)]


def on_canvas(crop: Image.Image, pad: int = 100) -> Image.Image:
    return Image.fromarray(np.pad(np.asarray(crop), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))


def template_report(data: str, count: int) -> None:
    detector = RetinaFaceDetector()
    points = []
    for crop in utkface_crops(data, count, "train"):
        detections = detector(np.asarray(on_canvas(crop)))
        if detections:
            points.append(detections[0].landmarks - 100)
    median = np.median(np.stack(points), axis=0)
    print(f"landmarks found on {len(points)} of {count} UTKFace training crops; median (x, y) in a {CHIP_SIZE} px crop:")
    print(np.array2string(median, precision=1, separator=", "))


def framing_report(analyzer: FaceAnalyzer, data: str, count: int) -> None:
    errors = []
    for crop in utkface_crops(data, count, "test"):
        canvas = on_canvas(crop)
        detections = analyzer.detect(canvas)
        if detections:
            chip = align_face(canvas, detections[0].landmarks)
            errors.append(float(np.abs(np.asarray(chip, dtype=np.float64) - np.asarray(crop)).mean()))
    print(f"framing: {len(errors)} of {count} UTKFace test crops found on a canvas and re-cut; "
          f"mean absolute pixel difference to the original {np.mean(errors):.1f} (median {np.median(errors):.1f})")


def centre(image: Image.Image, fraction: float) -> Image.Image:
    margin_x, margin_y = image.width * (1 - fraction) / 2, image.height * (1 - fraction) / 2
    return image.crop((round(margin_x), round(margin_y), round(image.width - margin_x), round(image.height - margin_y)))


def cut_faces_report(analyzer: FaceAnalyzer, data: str, count: int) -> None:
    """Other datasets cut their faces tighter than UTKFace, and photos cut faces at their border; the aligner
    then fills what lies past the image by repeating its edge. The whole app path on UTKFace test crops cut to
    their centre (the largest face found, or the crop read as a face crop when none is)."""
    from training.data import GENDER_NAMES

    faces = [(row["image"].convert("RGB"), row["age"], GENDER_NAMES[row["gender"]]) for row in utkface_rows(data, count, "test")]
    for fraction in (1.0, 0.8, 0.65):
        found, errors, right = [], [], []
        for image, age, gender in faces:
            result = analyzer.analyze(centre(image, fraction))
            face = max(result.faces, key=lambda f: f.box[3] - f.box[1], default=None) or analyzer.analyze(result.image, assume_face_crop=True).faces[0]
            found.append(bool(result.faces))
            errors.append(abs(face.age - age))
            right.append(face.gender == gender)
        print(f"UTKFace test crops cut to their centre {fraction:.0%}: face found in {np.mean(found):.1%}, "
              f"age MAE {np.mean(errors):.2f}, gender {np.mean(right):.1%} ({count} faces, the whole app path)")


def speed_report(analyzer: FaceAnalyzer, repeats: int) -> None:
    photo = Image.open(EXAMPLES / "obama.jpg").convert("RGB")
    for size in ((640, 480), (1920, 1080)):
        canvas = Image.new("RGB", size, (200, 200, 200))
        portrait = photo.resize((round(photo.width * size[1] / photo.height), size[1]))
        canvas.paste(portrait, ((size[0] - portrait.width) // 2, 0))
        assert len(analyzer.analyze(canvas).faces) == 1
        print(f"{size[0]}x{size[1]}, one face: end to end {p50_p95(timings_ms(lambda: analyzer.analyze(canvas), repeats))}; "
              f"detection {p50_p95(timings_ms(lambda: analyzer.detect(canvas), repeats))}")
    frame = np.asarray(canvas.resize((640, 480)))
    tracker = FaceTracker()

    def webcam_frame():  # what the app's webcam tab does with each frame
        faces = tracker.update(analyzer.analyze(frame).faces, analyzer.model.config)
        return annotate(Image.fromarray(frame), faces)

    samples = timings_ms(webcam_frame, repeats)
    print(f"webcam frame 640x480 (analyse, smooth, draw): {p50_p95(samples)}: up to {1000 / np.median(samples):.0f} frames/s of compute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wider", default=str(DEFAULT_WIDER_DEV))
    parser.add_argument("--data", default=str(DEFAULT_UTKFACE), help="UTKFace, for the framing measurement")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model"))
    parser.add_argument("--detect_side", type=int, default=1280)
    parser.add_argument("--photos", type=int, default=None, help="only the first N wider-dev photos")
    parser.add_argument("--crops", type=int, default=300, help="UTKFace crops for the framing measurement")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--template", action="store_true", help="print the alignment template and stop")
    args = parser.parse_args()
    if args.template:
        template_report(args.data, 2000)
        return
    analyzer = FaceAnalyzer(args.model, detect_side=args.detect_side)  # gender and time at the app's threshold
    wider_report(analyzer, args.wider, args.photos, gender_threshold=FaceAnalyzer.DEFAULT_MIN_SCORE)
    framing_report(analyzer, args.data, args.crops)
    cut_faces_report(analyzer, args.data, args.crops)
    speed_report(analyzer, args.repeats)


if __name__ == "__main__":
    main()
