"""Label a whole collection: every face in every photo of a folder, a glob, a list of paths, a video or a Hugging
Face dataset, written as one table with a row per face.

    python -m faces.batch photos/ --out faces.csv
    accelerate launch --num_processes 2 -m faces.batch photos/ --out faces.parquet

Each process takes its share of the input (Accelerate's `split_between_processes`), detects and aligns faces
and predicts them in batches that span photos, and appends finished photos to a part file of its own; the main
process merges the parts in input order at the end. A bad file is a row that says why, never a stop; an
interrupted run continues with `--resume`, and a photo is either wholly written or not at all.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
COLUMNS = [
    "source", "frame", "status", "face", "x0", "y0", "x1", "y1", "image_width", "image_height", "detection_score",
    "age", "age_low", "age_high", "gender", "gender_score", "gender_is_guess", "error",
]


@dataclass
class Item:
    """One input: a photo file, a video (all its sampled frames), or a dataset row."""

    order: int
    source: str
    path: Path | None = None
    dataset_row: int | None = None


def list_items(spec: str, dataset=None) -> list[Item]:
    """The inputs named by `spec`, in a stable order: a folder (recursive), a glob, a .txt file of paths (one per
    line), a single photo or video, or the rows of `dataset`."""
    if dataset is not None:
        return [Item(i, f"{spec}[{i}]", dataset_row=i) for i in range(len(dataset))]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    elif path.is_file() and path.suffix.lower() == ".txt":
        base = path.parent
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        files = [Path(line) if Path(line).is_absolute() else base / line for line in lines]
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise SystemExit(f"error: {spec!r} is not a folder, file, list or glob that matches any file")
    return [Item(i, str(f), path=f) for i, f in enumerate(files)]


def load_dataset_input(spec: str, split: str, image_column: str):
    """A dataset saved with `save_to_disk`, or one `datasets.load_dataset` finds (a local folder or a Hub id)."""
    import datasets

    path = Path(spec)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(spec)
    else:
        try:
            loaded = datasets.load_dataset(spec, split=split)
        except Exception as error:  # offline Hub, unknown id, unreadable files: say which and why
            raise SystemExit(f"error: could not load the dataset {spec!r}: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SystemExit(f"error: the dataset {spec!r} has no split {split!r} (it has {', '.join(loaded)})")
        loaded = loaded[split]
    if image_column not in loaded.column_names:
        raise SystemExit(f"error: the dataset {spec!r} has no column {image_column!r} (columns: {', '.join(loaded.column_names)}); pass --image_column")
    return loaded


def item_frames(item: Item, dataset, image_column: str, every: int) -> Iterator[tuple[int | None, object]]:
    """(frame number or None, image) for each picture the item holds: every `every`-th frame of a video."""
    if item.dataset_row is not None:
        yield None, dataset[item.dataset_row][image_column]
    elif item.path.suffix.lower() in VIDEO_SUFFIXES:
        import av

        with av.open(str(item.path)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number % every == 0:
                    yield number, frame.to_image()
    else:
        yield None, item.path


def is_video(item: Item) -> bool:
    return item.path is not None and item.dataset_row is None and item.path.suffix.lower() in VIDEO_SUFFIXES


def pictures_in(item: Item, every: int) -> int:
    """How many pictures an item gives: one, or a video's frames taken every `every`-th (from its header; 1 when
    the header does not say or the file cannot be opened, which its row then reports)."""
    if not is_video(item):
        return 1
    import av

    try:
        with av.open(str(item.path)) as container:
            return max(1, -(-container.streams.video[0].frames // every))
    except Exception:  # noqa: BLE001 (reported when the item is labelled)
        return 1


def progress_unit(items: list[Item]) -> str:
    """What the progress bar counts: frames for videos, photos for photos, pictures for a mix."""
    videos = sum(is_video(item) for item in items)
    return "frame" if items and videos == len(items) else "photo" if videos == 0 else "picture"


def failed_row(item: Item, frame: int | None, error: Exception) -> dict:
    return {"source": item.source, "frame": frame, "status": "failed", "error": f"{type(error).__name__}: {error}"}


def face_rows(item: Item, frame: int | None, size: tuple[int, int], faces: list) -> list[dict]:
    """One row per face, or one row saying there is none."""
    base = {"source": item.source, "frame": frame, "image_width": size[0], "image_height": size[1]}
    if not faces:
        return [{**base, "status": "no face"}]
    return [
        {
            **base, "status": "face", "face": number, "x0": f.box[0], "y0": f.box[1], "x1": f.box[2], "y1": f.box[3],
            "detection_score": f.detection_score, "age": f.age, "age_low": f.age_interval[0], "age_high": f.age_interval[1],
            "gender": f.gender, "gender_score": f.gender_score, "gender_is_guess": f.gender_is_guess,
        }
        for number, f in enumerate(faces, start=1)
    ]


class PartWriter:
    """This process's rows, appended item by item to a JSON Lines file. Each row carries the item's order and
    how many rows the item has, so that a reader keeps only items written whole."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")

    def write_item(self, item: Item, rows: list[dict]) -> None:
        block = "".join(json.dumps({**row, "_order": item.order, "_rows": len(rows)}) + "\n" for row in rows)
        self.handle.write(block)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def read_parts(folder: Path) -> pd.DataFrame:
    """Every whole item written to the part files in `folder`; rows of an item cut off by a kill are dropped."""
    rows = []
    for part in sorted(folder.glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a part whose process was killed mid-write
                continue
    if not rows:
        return pd.DataFrame(columns=[*COLUMNS, "_order", "_rows"])
    table = pd.DataFrame(rows)
    counts = table.groupby("_order")["_order"].transform("size")
    table = table[counts == table["_rows"]]
    return table.drop_duplicates(subset=["_order", "frame", "face", "status"], keep="first")


def read_table(path: Path) -> pd.DataFrame:
    """A finished output table, read back by its suffix."""
    kind = OUTPUT_FORMATS[path.suffix.lower()]
    return pd.read_csv(path) if kind == "csv" else pd.read_parquet(path) if kind == "parquet" else pd.read_json(path, lines=True)


def write_table(table: pd.DataFrame, out: Path) -> None:
    """The merged rows in input order, as CSV, JSON Lines or Parquet by the file's suffix; written to a
    temporary name and renamed, so that an existing output is replaced only by a complete one."""
    table = table.sort_values(["_order"], kind="stable").reindex(columns=COLUMNS)
    table["frame"] = table["frame"].astype("Int64")
    for column in ("face", "x0", "y0", "x1", "y1", "image_width", "image_height", "age_low", "age_high"):
        table[column] = table[column].astype("Int64")
    staging = out.with_name(f".{out.name}.partial")
    kind = OUTPUT_FORMATS[out.suffix.lower()]
    if kind == "csv":
        table.to_csv(staging, index=False)
    elif kind == "jsonl":
        table.to_json(staging, orient="records", lines=True)
    else:
        table.to_parquet(staging, index=False)
    os.replace(staging, out)


def summary(table: pd.DataFrame, seconds: float, faces_this_run: int, images_this_run: int) -> str:
    """What was read, found and refused, and how fast this run went."""
    images = table.drop_duplicates(subset=["_order", "frame"])
    failed = images[images["status"] == "failed"]
    lines = [
        f"images read: {len(images) - len(failed)} (from {table['_order'].nunique()} inputs)",
        f"faces found: {int((table['status'] == 'face').sum())}",
        f"images without a face: {int((images['status'] == 'no face').sum())}",
        f"files that failed: {len(failed)}",
    ]
    lines += [f"  {row.source}: {row.error}" for row in failed.head(20).itertuples()]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (status 'failed' in the output)")
    if seconds > 0 and images_this_run:
        lines.append(
            f"this run: {images_this_run} images, {faces_this_run} faces in {seconds:.1f} s "
            f"({images_this_run / seconds:.1f} images/s, {faces_this_run / seconds:.1f} faces/s)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="A folder (searched recursively), a glob in quotes, a .txt file of paths, a photo, a video, or with --dataset a dataset.")
    parser.add_argument("--out", required=True, help="Output table: .csv, .jsonl or .parquet.")
    parser.add_argument("--model", default=None, help="Model folder or Hub id (default: the shipped model/).")
    parser.add_argument("--dataset", action="store_true", help="INPUT is a Hugging Face dataset: a save_to_disk folder, a local dataset folder or a Hub id.")
    parser.add_argument("--image_column", default="image", help="The dataset's image column.")
    parser.add_argument("--split", default="train", help="The dataset's split.")
    parser.add_argument("--every", type=int, default=10, help="Videos: label every N-th frame.")
    parser.add_argument("--annotated_dir", default=None, help="Also save each photo with its faces drawn, here.")
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted run: inputs already written are skipped.")
    parser.add_argument("--photos_per_step", type=int, default=16, help="Photos whose faces are predicted in one go.")
    parser.add_argument("--batch_size", type=int, default=64, help="Faces per forward pass.")
    parser.add_argument("--min_detection_score", type=float, default=0.5)
    parser.add_argument("--detect_side", type=int, default=1280)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"], help="torch, or the model folder's ONNX export: onnx, onnx-int8.")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in OUTPUT_FORMATS:
        parser.error(f"--out must end in .csv, .jsonl or .parquet, not {Path(args.out).name!r}")
    if args.every < 1 or args.photos_per_step < 1 or args.batch_size < 1:
        parser.error("--every, --photos_per_step and --batch_size must be at least 1")
    return args


def share_cores(num_processes: int, device: torch.device) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1; on the CPU each process takes an equal share of the cores."""
    from faces.onnx_model import usable_cores

    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // num_processes))


def label_items(analyzer, items: list[Item], dataset, args, writer: PartWriter, progress) -> tuple[int, int]:
    """Detect the faces of `photos_per_step` items at a time, align and predict them together, write each item
    whole. Returns (images, faces) processed."""
    from faces.drawing import annotate

    images_done = faces_done = 0
    for start in range(0, len(items), args.photos_per_step):
        step = items[start : start + args.photos_per_step]
        rows_of: dict[int, list[dict]] = {item.order: [] for item in step}
        found: list[tuple[Item, int | None, Image.Image, list]] = []  # pictures read, with their detections
        for item in step:
            try:
                for frame, image in item_frames(item, dataset, args.image_column, args.every):
                    try:
                        photo = analyzer.load_photo(image)
                        found.append((item, frame, photo, analyzer.detect(photo)))
                    except Exception as error:  # noqa: BLE001 (any unreadable picture is reported, not fatal)
                        rows_of[item.order].append(failed_row(item, frame, error))
                    progress.update(1)  # per picture: a video's frames move the bar as they are read
            except Exception as error:  # noqa: BLE001 (a video or dataset row that cannot be opened)
                rows_of[item.order].append(failed_row(item, None, error))
        labelled = analyzer.label_detections([photo for _, _, photo, _ in found], [detections for *_, detections in found])
        for (item, frame, photo, _), faces in zip(found, labelled):
            rows_of[item.order].extend(face_rows(item, frame, photo.size, faces))
            if args.annotated_dir:
                save_annotated(annotate(photo, faces), item, frame, Path(args.annotated_dir))
            images_done += 1
            faces_done += len(faces)
        for item in step:
            # In frame order; a row for a video that failed part-way goes last.
            rows = sorted(rows_of[item.order], key=lambda row: float("inf") if row["frame"] is None else row["frame"])
            writer.write_item(item, rows or [failed_row(item, None, ValueError("the video has no frames"))])
    return images_done, faces_done


def save_annotated(image: Image.Image, item: Item, frame: int | None, folder: Path) -> None:
    name = Path(item.source).name if item.path is not None else item.source.replace("/", "_")
    stem = f"{item.order:06d}_{Path(name).stem}" + (f"_frame{frame:06d}" if frame is not None else "")
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{stem}.jpg", quality=90)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from accelerate import Accelerator

    from faces.analysis import DEFAULT_MODEL, FaceAnalyzer

    args = parse_args(argv)
    out = Path(args.out)
    parts = out.with_name(f".{out.name}.parts")
    # Without an accelerator, processes started by `accelerate launch --multi_gpu` (torchrun) only join one
    # group when Accelerate is told that they run on the CPU.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    share_cores(accelerator.num_processes, accelerator.device)
    if accelerator.is_main_process and parts.exists() and not args.resume and any(parts.iterdir()):
        raise SystemExit(f"error: {parts} holds an interrupted run: pass --resume to continue it, or delete it to start afresh")
    if args.resume and out.is_file() and not parts.exists():  # the parts are merged and removed only at the end
        accelerator.print(f"{out} is complete: nothing to resume (run without --resume to label everything again)")
        return read_table(out)
    accelerator.wait_for_everyone()

    dataset = load_dataset_input(args.input, args.split, args.image_column) if args.dataset else None
    items = list_items(args.input, dataset)
    done = set(read_parts(parts)["_order"]) if args.resume and parts.exists() else set()
    todo = [item for item in items if item.order not in done]
    analyzer = FaceAnalyzer(
        args.model or DEFAULT_MODEL, detect_side=args.detect_side, min_detection_score=args.min_detection_score,
        batch_size=args.batch_size, device=str(accelerator.device), dtype=args.dtype, runtime=args.runtime,
    )
    accelerator.print(
        f"{len(items)} inputs, {len(done)} already written, {len(todo)} to label on {accelerator.num_processes} "
        f"process(es) ({accelerator.device}, {torch.get_num_threads()} threads each)"
    )
    started = time.perf_counter()
    with accelerator.split_between_processes(todo) as mine:
        writer = PartWriter(parts / f"part-{accelerator.process_index:03d}.jsonl")
        total = sum(pictures_in(item, args.every) for item in todo)
        progress = tqdm(total=total, unit=progress_unit(todo), desc="labelling", disable=not accelerator.is_local_main_process, file=sys.stderr)
        try:
            images, faces = label_items(analyzer, list(mine), dataset, args, writer, ScaledProgress(progress, accelerator.num_processes))
        finally:
            writer.close()
            progress.close()
    counts = accelerator.gather(torch.tensor([images, faces], device=accelerator.device).unsqueeze(0)).sum(0).tolist()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    table = read_parts(parts)
    if accelerator.is_main_process:
        write_table(table, out)
        for part in parts.glob("part-*.jsonl"):
            part.unlink()
        parts.rmdir()
        print(summary(table, seconds, faces_this_run=int(counts[1]), images_this_run=int(counts[0])))
        print(f"wrote {len(table)} rows to {out}")
    accelerator.wait_for_everyone()
    return table


class ScaledProgress:
    """A progress bar fed by one process of N, advancing N per item: with the input split evenly, the bar tracks
    the whole run without processes talking to each other."""

    def __init__(self, bar, num_processes: int):
        self.bar, self.num_processes = bar, num_processes

    def update(self, count: int) -> None:
        self.bar.update(min(count * self.num_processes, self.bar.total - self.bar.n))


if __name__ == "__main__":
    main()
