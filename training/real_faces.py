"""Real-photo faces as `datasets` Datasets, framed exactly as the app frames a face.

Two sources, read at run time from `../shared/datasets` and never copied into the project:
- `wider-faces/`: regions (twice the face box) cut from WIDER FACE photos, with perceived gender, perceived age
  group, skin type and WIDER's blur, illumination, occlusion and pose flags;
- `lfw-gender/`: LFW news photos (250 px, one face centred), with gender where two labellings agree.

Each region or photo goes through the app's own detector and aligner (`faces.search.detect_in_photo`, then
`faces.alignment.align_face`): the detection that overlaps the labelled box with IoU >= `MATCH_IOU` (WIDER) or
the one nearest the centre (LFW) is aligned into a UTKFace-framed chip, or a wider one (`zoom`, as the image
processor's `face_zoom`). A face the detector does not find, and a file that cannot be read, are counted and named
in the report, never dropped silently: they are what the app would not label either.

Splits keep one photo's faces (WIDER) and one person's photos (LFW) on one side: a row's split comes from a
hash of its `group` (the WIDER photo, the LFW person). The chips are cached as a Dataset on disk (keyed by the
source folder, the framing and the photo search's settings), so only the first call pays for detection (a few
minutes).

    python -m training.real_faces --wider ../shared/datasets/wider-faces --lfw ../shared/datasets/lfw-gender
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from training.data import GENDER_NAMES, ScanReport, default_cache_dir, folder_fingerprint
from training.wider_dev import MATCH_IOU

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_WIDER_FACES = SHARED_DATASETS / "wider-faces"
DEFAULT_LFW_GENDER = SHARED_DATASETS / "lfw-gender"
SOURCES = ("wider-faces", "lfw-gender")
# WIDER FACE demographics' perceived age groups, youngest first; "Not Sure" is unknown (-1).
AGE_GROUPS = ["Young Adult", "Adult", "Middle age", "Senior"]
SKIN_TYPES = ["I", "II", "III", "IV", "V", "VI"]
FACE_SIZE_BANDS = ((0, 32, "under 32 px"), (32, 64, "32-63 px"), (64, 128, "64-127 px"), (128, 10**9, "128 px and more"))
# The years each perceived age group allows, for the loss that keeps a face's age distribution inside its group
# (`AgeGenderModel.age_range_loss`). WIDER's demographics give no ages, so they were estimated: the shipped model's
# ages of the wider-faces training faces, 10th to 90th percentile per group (Young Adult 15-41, Adult 26-52,
# Middle age 29-66, Senior 35-76; medians 27, 34, 49, 60), rounded outward; for Middle age and Senior the lower
# bound is raised towards the usual definitions (middle age from about 40, senior from 60-65) less a margin for
# annotators' disagreement, because the model reads older faces young (UTKFace MAE 7-9 years from 50 on), and
# Senior reaches the oldest age the model predicts. Young Adult, the youngest group, starts at 0: WIDER's
# demographics have no group for children, and its annotators put them there (of the 54 wider-faces validation
# faces the UTKFace-only v3 model reads as under 12, 47 are labelled Young Adult; looked at one by one, 39 are
# plainly children, `CHILDREN_BY_EYE`); a lower bound would teach that a child in a photo is a teenager.
AGE_GROUP_RANGES = [[0, 42], [22, 53], [35, 70], [52, 116]]
CHILDREN_BY_EYE = Path(__file__).with_name("wider_faces_children.txt")
REAL_FACES_CACHE_VERSION = 3
CHIP_QUALITY = 95  # JPEG quality of the cached 200 px chips: what the model then reads at 64 px is unchanged by it

FEATURES = Features(
    {
        "image": Image(),
        "age": Value("int32"),  # years; -1: unknown (every real face here)
        "gender": ClassLabel(names=GENDER_NAMES),  # -1: unknown
        "age_group": ClassLabel(names=AGE_GROUPS),  # -1: unknown
        "skin": Value("string"),  # WIDER's perceived skin type I-VI, "" unknown
        "blur": Value("int8"),  # WIDER's flags; -1 where the source has none (LFW)
        "occlusion": Value("int8"),
        "pose": Value("int8"),
        "illumination": Value("int8"),
        "face_height": Value("float32"),  # the face box's height in the photo's pixels
        "source": Value("string"),
        "group": Value("string"),  # what must stay on one side of a split: the WIDER photo, the LFW person
        "file_name": Value("string"),
        "sha1": Value("string"),  # of the cached chip's bytes, which keys pixel caches as for UTKFace
        "zoom": Value("float32"),  # the chip's framing (`faces.alignment.align_face`); UTKFace's crops are at 1
        "outside_share": Value("float32"),  # of the chip, outside the photo (`faces.alignment.share_outside_photo`)
    }
)


@dataclass
class LabelledRegion:
    """One labelled face before detection: the file, the box to match (region pixels; None: the face nearest the
    centre) and the labels."""

    path: Path
    box: np.ndarray | None
    labels: dict = field(default_factory=dict)


def read_wider_faces(root: Path) -> list[LabelledRegion]:
    """The rows of wider-faces' faces.csv as regions with their box and labels."""
    regions = []
    with open(root / "faces.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            x, y, w, h = (float(row[k]) for k in ("box_x", "box_y", "box_w", "box_h"))
            regions.append(
                LabelledRegion(
                    path=root / row["file"],
                    box=np.array([x, y, x + w, y + h]),
                    labels={
                        "gender": {"Male": 0, "Female": 1}.get(row["perceived_gender"], -1),
                        "age_group": AGE_GROUPS.index(row["perceived_age"]) if row["perceived_age"] in AGE_GROUPS else -1,
                        "skin": row["perceived_skin"] if row["perceived_skin"] in SKIN_TYPES else "",
                        **{flag: int(row[flag]) for flag in ("blur", "occlusion", "pose", "illumination")},
                        "face_height": float(row["photo_box_h"]),
                        "group": row["photo"],
                    },
                )
            )
    return regions


def read_lfw_gender(root: Path) -> list[LabelledRegion]:
    """The rows of lfw-gender's labels.csv; the face is the detection nearest the photo's centre. LFW's face
    boxes were about 250 / 2.2 = 114 px tall before the deep-funneled photos were scaled (its README)."""
    with open(root / "labels.csv", newline="") as handle:
        return [
            LabelledRegion(
                path=root / row["file"],
                box=None,
                labels={
                    "gender": GENDER_NAMES.index(row["gender"]),
                    "age_group": -1, "skin": "", "blur": -1, "occlusion": -1, "pose": -1, "illumination": -1,
                    "face_height": 114.0,
                    "group": row["person"],
                },
            )
            for row in csv.DictReader(handle)
        ]


def pick_detection(detections: list, box: np.ndarray | None, size: tuple[int, int]):
    """The detection of the labelled face: the best overlap with `box` if at least `MATCH_IOU`, or, without a
    box, the one whose centre is nearest the image's centre. None when there is no such detection."""
    from faces.detection import box_iou

    if not detections:
        return None
    if box is None:
        centre = np.array(size, dtype=float) / 2
        return min(detections, key=lambda d: float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - centre)))
    best = max(detections, key=lambda d: box_iou(d.box, box))
    return best if box_iou(best.box, box) >= MATCH_IOU else None


def chip_rows(regions: list[LabelledRegion], root: Path, source: str, report: ScanReport, zoom: float = 1.0) -> list[dict]:
    """Detect, match and align every region at the framing `zoom`; each result is a row of `FEATURES`, each
    failure a line of the report."""
    from faces.alignment import align_face, share_outside_photo
    from faces.detection import RetinaFaceDetector
    from faces.search import detect_in_photo
    from modeling.image_processing_age_gender import InvalidImageError, load_rgb_image

    detector = RetinaFaceDetector()  # at its defaults, which key the cache, as the app uses it
    rows = []
    for region in tqdm(regions, desc=f"Finding the faces of {source}", unit="face", mininterval=2.0):
        name = str(region.path.relative_to(root))
        try:
            image = load_rgb_image(region.path)
        except (InvalidImageError, OSError) as error:
            report.skip("file cannot be read as an image", f"{name} ({error})")
            continue
        detection = pick_detection(detect_in_photo(detector, image), region.box, image.size)
        if detection is None:
            report.skip("the detector finds no face there" if region.box is None else "no detection matches the labelled box", name)
            continue
        buffer = io.BytesIO()
        align_face(image, detection.landmarks, zoom=zoom).save(buffer, format="JPEG", quality=CHIP_QUALITY)
        chip = buffer.getvalue()
        rows.append({"image": {"bytes": chip, "path": None}, "age": -1, **region.labels, "source": source,
                     "file_name": name, "sha1": hashlib.sha1(chip).hexdigest(), "zoom": zoom,
                     "outside_share": share_outside_photo(image.size, detection.landmarks, zoom)})
    report.kept = len(rows)
    return rows


READERS = {"wider-faces": read_wider_faces, "lfw-gender": read_lfw_gender}


def load_source(source: str, root: str | Path, cache_dir: str | Path | None = None, zoom: float = 1.0) -> tuple[Dataset, ScanReport]:
    """One source's chips at the framing `zoom` as a Dataset (columns `FEATURES`) and the report of what could
    not be used, built once and then read from the cache."""
    from faces.detection import DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD
    from faces.search import PHOTO_SEARCH_VERSION

    root = Path(root)
    index = root / ("faces.csv" if source == "wider-faces" else "labels.csv")
    if not index.is_file():
        raise FileNotFoundError(f"no {source} at {root}: {index.name} is missing (see ../shared/datasets/README.md)")
    settings = f"{folder_fingerprint(root)}|{DEFAULT_SCORE_THRESHOLD}|{DEFAULT_NMS_THRESHOLD}|{PHOTO_SEARCH_VERSION}|{REAL_FACES_CACHE_VERSION}|{zoom}"
    target = Path(cache_dir or default_cache_dir()) / "real-faces" / f"{source}-{hashlib.sha1(settings.encode()).hexdigest()[:16]}"
    report_file = target / "report.json"
    if report_file.is_file():
        return load_from_disk(str(target / "dataset")), ScanReport(**json.loads(report_file.read_text()))
    report = ScanReport()
    rows = chip_rows(READERS[source](root), root, source, report, zoom)
    if not rows:
        raise ValueError(f"no usable faces in {root}:\n{report.summary()}")
    dataset = Dataset.from_list(rows, features=FEATURES)
    save_dataset_atomically(dataset, report, target)
    return load_from_disk(str(target / "dataset")), report


def save_dataset_atomically(dataset: Dataset, report: ScanReport, target: Path) -> None:
    """Write the Dataset and its report to a folder of its own, then rename it into place: an interrupted build
    leaves no half cache, and of two processes building at once the first to finish publishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        (staging / "report.json").write_text(json.dumps(asdict(report)))
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def split_of_group(group: str, validation_share: float, salt: str = "real-faces") -> str:
    """"train" or "validation" from a hash of the group (photo or person), stable whatever else changes."""
    position = int(hashlib.sha1(f"{salt}|{group}".encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if position < validation_share else "train"


def load_real_faces(
    wider_faces: str | Path | None = DEFAULT_WIDER_FACES,
    lfw_gender: str | Path | None = DEFAULT_LFW_GENDER,
    cache_dir: str | Path | None = None,
    validation_share: float = 0.15,
    verbose: bool = True,
    zoom: float = 1.0,
) -> DatasetDict:
    """The real faces of the given sources (None or "" leaves one out), cut at the framing `zoom`, as a
    DatasetDict with `train` and `validation`, split by photo (WIDER) and by person (LFW). Prints what each source
    could not use."""
    if not 0 < validation_share < 1:
        raise ValueError(f"validation_share must lie between 0 and 1, got {validation_share}")
    parts = []
    for source, root in zip(SOURCES, (wider_faces, lfw_gender)):
        if not root:
            continue
        dataset, report = load_source(source, root, cache_dir, float(zoom))
        if verbose:
            print(f"{source} ({root}): {report.summary().replace('images', 'faces', 1)}")
        parts.append(dataset)
    if not parts:
        raise ValueError("no real-face source given: pass a wider-faces folder, an lfw-gender folder or both")
    everything = concatenate_datasets(parts)
    splits = [split_of_group(group, validation_share) for group in everything["group"]]
    return DatasetDict(
        {name: everything.select([i for i, s in enumerate(splits) if s == name]) for name in ("train", "validation")}
    )


def framing_filled(faces: Dataset, zoom: float) -> torch.Tensor:
    """Per face, whether its chip read at the framing `zoom` is framing filled (`faces.alignment.FILLED_SHARE`):
    the share outside the photo as measured at the chip's own framing, grown by the widening when read wider.
    A dataset of crops given as they are (UTKFace's: no `outside_share` column) has nothing outside its photo at
    the crop's own framing, so only the widening counts (`faces.alignment.widened_crop_filled`)."""
    from faces.alignment import FILLED_SHARE, widened_crop_filled, widened_crop_share

    if "outside_share" not in faces.column_names:
        return torch.full((len(faces),), widened_crop_filled(zoom))
    widened = np.array([widened_crop_share(zoom / cut) for cut in faces["zoom"]])
    share = 1 - (1 - np.asarray(faces["outside_share"], dtype=float)) * (1 - widened)
    return torch.from_numpy(share > FILLED_SHARE)


def children_by_eye(faces: Dataset) -> np.ndarray:
    """Per face, whether it is one of the children picked by eye in wider-faces' validation part
    (`CHILDREN_BY_EYE`): WIDER labels them Young Adult, so only this list tells evaluation which faces are children."""
    names = set(children_by_eye_names())
    return np.array([name in names for name in faces["file_name"]], dtype=bool)


def children_by_eye_names() -> list[str]:
    """The file names (as in wider-faces' faces.csv) listed in `CHILDREN_BY_EYE`."""
    return [line for line in CHILDREN_BY_EYE.read_text().splitlines() if line and not line.startswith("#")]


def size_band(face_height: float) -> str:
    return next(name for low, high, name in FACE_SIZE_BANDS if low <= face_height < high)


def summary(splits: DatasetDict) -> str:
    """Counts per split by source, gender, age group, face size and skin type, as `training.explore` prints for
    UTKFace."""
    lines = []
    for name, dataset in splits.items():
        columns = dataset.select_columns(["source", "gender", "age_group", "face_height", "skin"]).to_pandas()
        lines.append(f"[{name}] {len(dataset):,} faces")
        counts = {
            "source": Counter(columns["source"]),
            "gender": Counter(GENDER_NAMES[g] if g >= 0 else "unknown" for g in columns["gender"]),
            "age group": Counter(AGE_GROUPS[g] if g >= 0 else "unknown" for g in columns["age_group"]),
            "face size": Counter(size_band(h) for h in columns["face_height"]),
            "skin type": Counter(s or "unknown" for s in columns["skin"]),
        }
        for what, counter in counts.items():
            lines.append(f"  {what}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) and summarise the real-photo face chips.")
    parser.add_argument("--wider", default=str(DEFAULT_WIDER_FACES), help="wider-faces folder ('' leaves it out).")
    parser.add_argument("--lfw", default=str(DEFAULT_LFW_GENDER), help="lfw-gender folder ('' leaves it out).")
    parser.add_argument("--cache_dir", default=None, help="Where the chips are cached (default ~/.cache/age_gender).")
    parser.add_argument("--zoom", type=float, default=1.0, help="The chips' framing: 1 is UTKFace's, above 1 wider (as train.py --face_zoom).")
    args = parser.parse_args(argv)
    if not args.zoom >= 1:
        parser.error(f"--zoom must be 1 or more, got {args.zoom}")
    try:
        splits = load_real_faces(args.wider, args.lfw, args.cache_dir, zoom=args.zoom)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    print(summary(splits))


if __name__ == "__main__":
    main()
