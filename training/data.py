"""UTKFace as a `datasets.DatasetDict` with stable train/validation/test splits, and its pixels cached once.

A source is a folder of UTKFace files, the release archive (`UTKFace.tar.gz`, extracted once into the cache)
or a Hub dataset id. Files are named `{age}_{gender}_{race}_{datetime}.jpg.chip.jpg`.

Policy for bad and odd data (each case is counted and reported once, with examples):
- a name that does not parse, an age outside `MIN_AGE`..`MAX_AGE`, a gender other than 0/1, a race
  outside 0-4, or a file that does not decode: skipped;
- a name without the race field (3 in the release): kept, race "unknown";
- stray whitespace in a name (1 in the release): ignored when parsing;
- byte-identical copies with the same age and gender: one copy kept (race "unknown" if theirs disagree),
  the others skipped as duplicates;
- byte-identical copies whose age or gender disagree: all skipped, as nobody can tell which is right.
A file's split comes from a hash of its bytes, so it never moves when other files come or go, and copies
could never straddle two splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from tqdm.auto import tqdm

MIN_AGE, MAX_AGE = 0, 116
GENDER_NAMES = ["male", "female"]
RACE_NAMES = ["White", "Black", "Asian", "Indian", "Others", "unknown"]
UNKNOWN_RACE = RACE_NAMES.index("unknown")
SPLITS = ("train", "validation", "test")
CACHE_VERSION = 2
NAME_PATTERN = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<datetime>\d{8,})(?:\D|$)")

FEATURES = Features(
    {
        "image": Image(),
        "age": Value("int32"),
        "gender": ClassLabel(names=GENDER_NAMES),
        "race": ClassLabel(names=RACE_NAMES),
        "file_name": Value("string"),
        "sha1": Value("string"),
    }
)


class DataSourceError(ValueError):
    """A source that yields nothing usable, or that cannot be found or reached."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("AGE_GENDER_CACHE", Path.home() / ".cache" / "age_gender"))


@dataclass
class ScanReport:
    """What a scan kept and what it skipped, by reason, with a few example file names per reason."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, name: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(name)

    def note(self, what: str) -> None:
        self.notes[what] = self.notes.get(what, 0) + 1

    def summary(self) -> str:
        lines = [f"kept {self.kept:,} images"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count:,}: {reason} (e.g. {', '.join(self.examples[reason])})")
        for note, count in sorted(self.notes.items()):
            lines.append(f"  kept {count:,} with {note}")
        return "\n".join(lines)


def parse_file_name(name: str) -> dict | str:
    """Labels from a UTKFace file name, or the reason it cannot be used."""
    match = NAME_PATTERN.match(re.sub(r"\s+", "", name))
    if not match:
        return "file name does not follow {age}_{gender}_{race}_{datetime}.jpg"
    age, gender = int(match["age"]), int(match["gender"])
    race = UNKNOWN_RACE if match["race"] is None else int(match["race"])
    if not MIN_AGE <= age <= MAX_AGE:
        return f"age outside {MIN_AGE}-{MAX_AGE}"
    if gender not in (0, 1):
        return "gender not 0 or 1"
    if match["race"] is not None and not 0 <= race < UNKNOWN_RACE:
        return "race not 0-4"
    return {"age": age, "gender": gender, "race": race}


def decodes(data: bytes) -> bool:
    """Whether the bytes are a whole, decodable image: truncation only shows once pixels are read."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False


def split_of(sha1: str, ratios: tuple[float, float, float], salt: str = "") -> str:
    """The split of a file, from a hash of its bytes: stable whatever else is added or removed."""
    position = int(hashlib.sha1((salt + sha1).encode()).hexdigest()[:12], 16) / 16**12
    bound = 0.0
    for name, ratio in zip(SPLITS, ratios):
        bound += ratio
        if position < bound:
            return name
    return SPLITS[-1]


def scan_folder(folder: Path) -> tuple[list[dict], ScanReport]:
    """Parse, decode and hash every file under `folder`, then apply the duplicate policy."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    report = ScanReport()
    candidates = []
    for path in tqdm(files, desc=f"Checking {folder.name}", unit="file", mininterval=1.0):
        parsed = parse_file_name(path.name)
        if isinstance(parsed, str):
            report.skip(parsed, path.name)
            continue
        data = path.read_bytes()
        if not decodes(data):
            report.skip("file does not decode as an image", path.name)
            continue
        if parsed["race"] == UNKNOWN_RACE:
            report.note("race unknown (no race field in the name)")
        candidates.append({"path": str(path), "file_name": path.name, "sha1": hashlib.sha1(data).hexdigest(), **parsed})
    records = drop_duplicates(candidates, report)
    report.kept = len(records)
    return records, report


def drop_duplicates(candidates: list[dict], report: ScanReport) -> list[dict]:
    """One record per distinct image: copies with agreeing labels collapse to one, disagreeing ones go."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in candidates:
        groups[record["sha1"]].append(record)
    records = []
    for copies in groups.values():
        if len({(r["age"], r["gender"]) for r in copies}) > 1:
            for record in copies:
                report.skip("byte-identical copies with conflicting labels", record["file_name"])
            continue
        races = {r["race"] for r in copies}
        records.append({**copies[0], "race": races.pop() if len(races) == 1 else UNKNOWN_RACE})
        for record in copies[1:]:
            report.skip("byte-identical copy of another file", record["file_name"])
    return sorted(records, key=lambda r: r["file_name"])


def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a folder's contents (names, sizes and modification times)."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` fill a temporary file of its own beside `path`, then rename it into place: readers never see
    half a cache file, and processes that build the same cache at once (test workers, `accelerate launch`
    ranks) never write into each other's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(staging))
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract a tar archive into the cache once; an interrupted extraction leaves nothing half-written, and of
    processes extracting at once the first to finish publishes its copy and the others use it."""
    target = cache_dir / "extracted" / file_fingerprint(archive)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                for member in tqdm(members, desc=f"Extracting {archive.name}", unit="file", mininterval=1.0):
                    tar.extract(member, staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataSourceError(f"cannot read the archive {archive}: {error}") from error
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first, and its copy is the same archive's
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what is left of a failed, interrupted or second copy
    return target


def scan_cached(folder: Path, cache_dir: Path) -> tuple[list[dict], ScanReport]:
    """`scan_folder`, served from a JSON cache while the folder is unchanged."""
    cache_file = cache_dir / "scans" / f"{folder_fingerprint(folder)}-v{CACHE_VERSION}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        return cached["records"], ScanReport(**cached["report"])
    records, report = scan_folder(folder)
    write_atomically(cache_file, lambda path: path.write_text(json.dumps({"records": records, "report": asdict(report)})))
    return records, report


def records_to_splits(records: list[dict], ratios: tuple[float, float, float], salt: str = "") -> DatasetDict:
    by_split: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        by_split[split_of(record["sha1"], ratios, salt)].append(record)
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {
                    "image": [r["path"] for r in rows],
                    "age": [r["age"] for r in rows],
                    "gender": [r["gender"] for r in rows],
                    "race": [r["race"] for r in rows],
                    "file_name": [r["file_name"] for r in rows],
                    "sha1": [r["sha1"] for r in rows],
                },
                features=FEATURES,
            )
            for name, rows in by_split.items()
        }
    )


def check_ratios(ratios: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers that sum to 1, got {ratios}")
    return tuple(float(r) for r in ratios)


def load_hub_dataset(dataset_id: str, ratios: tuple[float, float, float], salt: str = "") -> DatasetDict:
    """A Hub dataset with columns `image`, `age` (years) and `gender` (0 male, 1 female), optionally `race`
    (0-4) and `file_name`. Its own train/validation/test splits are used when it has all three; otherwise
    every row is split by a hash of its image bytes, as for local sources."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DataSourceError(
            f"{dataset_id!r} is not a local folder or archive, and the Hub is offline (HF_HUB_OFFLINE=1): "
            "pass a folder of UTKFace files or UTKFace.tar.gz"
        )
    from datasets import concatenate_datasets, load_dataset

    try:
        loaded = load_dataset(dataset_id)
    except Exception as error:
        raise DataSourceError(f"cannot load the Hub dataset {dataset_id!r}: {error}") from error
    if all(name in loaded for name in SPLITS):
        return DatasetDict({name: normalise_hub_columns(loaded[name]) for name in SPLITS})
    rows = normalise_hub_columns(concatenate_datasets(list(loaded.values())))
    split_names = [split_of(sha1, ratios, salt) for sha1 in rows["sha1"]]
    return DatasetDict({name: rows.select([i for i, s in enumerate(split_names) if s == name]) for name in SPLITS})


def normalise_hub_columns(dataset: Dataset) -> Dataset:
    """Bring a Hub dataset to this module's columns, with a content hash for splitting."""
    missing = {"image", "age", "gender"} - set(dataset.column_names)
    if missing:
        raise DataSourceError(f"the dataset lacks the columns {sorted(missing)}; it needs image, age and gender")

    def add_fields(row: dict) -> dict:
        image = row["image"]
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        return {
            "sha1": hashlib.sha1(data).hexdigest(),
            "file_name": row.get("file_name") or Path(image.get("path") or "image").name,
            "race": row.get("race", UNKNOWN_RACE),
        }

    dataset = dataset.cast_column("image", Image(decode=False)).map(add_fields, desc="Hashing images")
    dataset = dataset.select_columns(list(FEATURES))
    return dataset.cast(FEATURES)


def load_utkface(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_salt: str = "",
    verbose: bool = True,
) -> DatasetDict:
    """UTKFace from a folder, a tar archive or a Hub id, as a DatasetDict with train, validation and test.

    Columns: `image`, `age`, `gender` (male/female), `race` (White/Black/Asian/Indian/Others/unknown),
    `file_name` and `sha1` (of the file's bytes). Archives are extracted once and scans are cached in
    `cache_dir` (default `$AGE_GENDER_CACHE` or `~/.cache/age_gender`), so a second call takes seconds.
    """
    ratios = check_ratios(tuple(split_ratios))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(source).expanduser()
    if path.is_dir():
        records, report = scan_cached(path, cache)
    elif path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataSourceError(f"{path} is a file but not a tar archive; expected a folder of UTKFace files or UTKFace.tar.gz")
        records, report = scan_cached(extract_archive(path, cache), cache)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        splits = load_hub_dataset(str(source), ratios, split_salt)
        if verbose:
            print(describe_splits(splits))
        return splits
    else:
        raise DataSourceError(
            f"no such folder or archive: {source!r} (expected a folder of UTKFace images, UTKFace.tar.gz, "
            "or a Hub dataset id such as 'user/utkface')"
        )
    if verbose:
        print(report.summary())
    if not records:
        raise DataSourceError(f"no usable UTKFace images in {source!r}:\n{report.summary()}")
    splits = records_to_splits(records, ratios, split_salt)
    if verbose:
        print(describe_splits(splits))
    return splits


def describe_splits(splits: DatasetDict) -> str:
    """Split sizes and label balance, one line per split."""
    total = sum(len(d) for d in splits.values()) or 1
    lines = []
    for name, dataset in splits.items():
        ages = np.asarray(dataset["age"], dtype=float)
        genders = Counter(dataset["gender"])
        female = genders.get(1, 0) / max(len(dataset), 1)
        mean_age = f"{ages.mean():.1f}" if len(ages) else "n/a"
        lines.append(
            f"{name:>10}: {len(dataset):6,} images ({len(dataset) / total:.1%}), "
            f"female {female:.1%}, mean age {mean_age}"
        )
    return "\n".join(lines)


def pixel_cache(dataset: Dataset, processor, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Every image of `dataset` as uint8 `(N, S, S, 3)` through `processor.to_uint8`, computed once and kept
    as a memory-mapped .npy file keyed by the images' hashes and the processor settings. Each face is first
    reframed from its own framing (a `zoom` column: real faces cut wider; none: UTKFace's crops, at 1) to the
    processor's `face_zoom`, so that one set of faces serves models, and teachers, that read other framings."""
    from faces.alignment import reframe_chip

    chip_zooms = list(dataset["zoom"]) if "zoom" in dataset.column_names else [1.0] * len(dataset)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha1(
        json.dumps([processor.image_size, processor.__class__.__name__, list(dataset["sha1"]), processor.face_zoom, chip_zooms]).encode()
    ).hexdigest()[:20]
    cache_file = cache / "pixels" / f"{key}.npy"
    if cache_file.is_file():
        return np.load(cache_file, mmap_mode="r")
    images = dataset.cast_column("image", Image(decode=False))["image"]
    size = processor.image_size
    pixels = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(tqdm(images, desc=f"Caching pixels at {size}px", unit="img", mininterval=1.0)):
        face = processor.load_rgb(image["bytes"] or image["path"])
        pixels[index] = processor.to_uint8(reframe_chip(face, processor.face_zoom / chip_zooms[index]))
    write_atomically(cache_file, lambda path: np.save(path, pixels))
    return np.load(cache_file, mmap_mode="r")
