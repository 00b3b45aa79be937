"""UTKFace as a datasets DatasetDict: parsing, bad data, duplicates, stable splits, caches, the real archive."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Image as ImageFeature

from conftest import ROOT, face_like, require_real_archive, utk_name, write_utk_folder
from modeling import AgeGenderImageProcessor
from training.data import (
    DataSourceError,
    RACE_NAMES,
    load_utkface,
    normalise_hub_columns,
    parse_file_name,
    pixel_cache,
)


def test_parse_file_name_reads_labels_and_tolerates_release_quirks():
    assert parse_file_name("26_1_2_20170116174525125.jpg.chip.jpg") == {"age": 26, "gender": 1, "race": 2}
    assert parse_file_name("39_1_20170116174525125.jpg.chip.jpg") == {"age": 39, "gender": 1, "race": RACE_NAMES.index("unknown")}
    assert parse_file_name("24_0_1_20170116220224657 .jpg.chip.jpg") == {"age": 24, "gender": 0, "race": 1}
    assert parse_file_name("55_0_0_20170116232725357jpg.chip.jpg")["age"] == 55


@pytest.mark.parametrize(
    "name, reason",
    [
        ("not_a_face.jpg", "does not follow"),
        ("117_0_0_20170116174525125.jpg.chip.jpg", "age outside"),
        ("30_2_0_20170116174525125.jpg.chip.jpg", "gender"),
        ("30_0_7_20170116174525125.jpg.chip.jpg", "race"),
    ],
)
def test_parse_file_name_gives_reasons_for_bad_names(name, reason):
    assert reason in parse_file_name(name)


def test_bad_files_are_skipped_counted_and_reported(tmp_path, cache_dir, capsys):
    folder = tmp_path / "UTKFace"
    write_utk_folder(folder, 40)
    (folder / "readme.txt").write_text("not a face")
    (folder / utk_name(130, 0, 0, 900)).write_bytes((folder.iterdir().__next__()).read_bytes())
    (folder / utk_name(30, 0, 0, 901)).write_bytes(b"this is text, not a JPEG")
    good = next(p for p in folder.iterdir() if p.name.endswith(".chip.jpg"))
    (folder / utk_name(31, 1, 0, 902)).write_bytes(good.read_bytes()[:800])  # truncated JPEG
    (folder / utk_name(32, 1, 0, 903)).write_bytes(b"")
    splits = load_utkface(folder, cache_dir)
    report = capsys.readouterr().out
    assert sum(len(d) for d in splits.values()) == 40
    assert "skipped 1: file name does not follow" in report and "readme.txt" in report
    assert "age outside" in report
    assert "skipped 3: file does not decode" in report
    for line in ("train:", "validation:", "test:", "female"):
        assert line in report


def test_duplicates_keep_one_copy_and_conflicting_copies_are_dropped(tmp_path, cache_dir, capsys):
    folder = tmp_path / "UTKFace"
    originals = write_utk_folder(folder, 30)
    shutil.copy(originals[0], folder / utk_name(1, 0, 0, 500))  # same labels as originals[0]: age 1, male, race 0
    shutil.copy(originals[1], folder / utk_name(70, 0, 1, 501))  # different age and gender from originals[1]
    splits = load_utkface(folder, cache_dir)
    names = [n for d in splits.values() for n in d["file_name"]]
    assert len(names) == 29  # 30 + 2 copies - 1 agreeing copy - 2 conflicting (original and copy)
    assert originals[1].name not in names
    assert "byte-identical copies with conflicting labels" in capsys.readouterr().out
    hashes = [h for d in splits.values() for h in d["sha1"]]
    assert len(hashes) == len(set(hashes))


def test_copies_always_share_a_split(tmp_path, cache_dir):
    """A byte-identical copy under another name (as UTKFace's release has) gets the split of its original: the
    split comes from the bytes, not the name, so copies can never straddle train and test."""
    originals = write_utk_folder(tmp_path / "originals", 60)
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, original in enumerate(originals):
        shutil.copy(original, copies / utk_name(1 + (i * 7) % 90, i % 2, i % 5, 10_000 + i))  # same bytes, new name
    ratios = (0.5, 0.25, 0.25)

    def split_by_bytes(folder):
        splits = load_utkface(folder, cache_dir, ratios, verbose=False)
        return {sha1: name for name, split in splits.items() for sha1 in split["sha1"]}

    of_originals, of_copies = split_by_bytes(tmp_path / "originals"), split_by_bytes(copies)
    assert len(of_originals) == 60 and of_copies == of_originals
    assert set(of_originals.values()) == {"train", "validation", "test"}


def test_splits_are_stable_when_files_are_added_or_removed(tmp_path, cache_dir):
    folder = tmp_path / "UTKFace"
    paths = write_utk_folder(folder, 120)
    before = {n: s for s, d in load_utkface(folder, cache_dir).items() for n in d["file_name"]}
    write_utk_folder(folder, 50, start=1000)
    paths[3].unlink()
    after = {n: s for s, d in load_utkface(folder, cache_dir).items() for n in d["file_name"]}
    assert paths[3].name not in after
    assert all(after[name] == split for name, split in before.items() if name in after)
    assert set(before.values()) == {"train", "validation", "test"}


def test_split_ratios_are_configurable_and_checked(utk_folder, cache_dir):
    splits = load_utkface(utk_folder, cache_dir, split_ratios=(0.5, 0.25, 0.25), verbose=False)
    assert 15 <= len(splits["train"]) <= 45
    with pytest.raises(ValueError, match="sum to 1"):
        load_utkface(utk_folder, cache_dir, split_ratios=(0.5, 0.5, 0.5))


def test_columns_and_features(utk_folder, cache_dir):
    train = load_utkface(utk_folder, cache_dir, verbose=False)["train"]
    assert set(train.column_names) >= {"image", "age", "gender", "race", "file_name"}
    assert train.features["gender"].names == ["male", "female"]
    assert train.features["race"].names == RACE_NAMES
    row = train[0]
    assert row["image"].size == (200, 200) and isinstance(row["age"], int)


def test_scan_is_served_from_the_cache(utk_folder, cache_dir):
    load_utkface(utk_folder, cache_dir, verbose=False)
    (scan_file,) = (cache_dir / "scans").glob("*.json")
    cached = json.loads(scan_file.read_text())
    cached["records"] = cached["records"][:5]  # a marker: only the cache could yield exactly these 5
    scan_file.write_text(json.dumps(cached))
    assert sum(len(d) for d in load_utkface(utk_folder, cache_dir, verbose=False).values()) == 5


def test_archive_is_extracted_once(tmp_path, utk_folder, cache_dir):
    archive = tmp_path / "UTKFace.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(utk_folder, arcname="UTKFace")
    first = load_utkface(archive, cache_dir, verbose=False)
    (extracted,) = (cache_dir / "extracted").iterdir()
    stamp = extracted.stat().st_mtime_ns
    second = load_utkface(archive, cache_dir, verbose=False)
    assert extracted.stat().st_mtime_ns == stamp
    assert first["train"]["file_name"] == second["train"]["file_name"]


CACHE_WORKER = """
import signal, sys, time
from pathlib import Path
import numpy as np
from training.data import extract_archive, write_atomically
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a CI job run in the background passes SIGINT on ignored)
go, task, source, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
if task == "extract":
    print(extract_archive(source, target))
else:
    mark = int(sys.argv[5])
    for _ in range(100):
        write_atomically(target, lambda path: np.save(path, np.full(50_000, mark)))
"""


def start_workers(tmp_path, *argument_lists: list[str]) -> list[subprocess.Popen]:
    """CACHE_WORKER in several processes, each ready (imported), then all told to start their work at the same
    instant, as pytest-xdist workers or accelerate ranks may."""
    go = tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", CACHE_WORKER, str(go), *arguments], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arguments in argument_lists
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    go.touch()
    return workers


def race(tmp_path, *argument_lists: list[str]) -> list[str]:
    """`start_workers`, then what each printed, once all have ended well."""
    outputs = []
    for worker in start_workers(tmp_path, *argument_lists):
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr[-2000:]
        outputs.append(stdout.strip())
    return outputs


def write_archive_of_small_files(archive: Path, count: int) -> None:
    with tarfile.open(archive, "w") as tar:
        for index in range(count):
            member = tarfile.TarInfo(f"UTKFace/{index}.txt")
            data = str(index).encode()
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_processes_extracting_the_same_archive_at_once_all_get_one_complete_copy(tmp_path):
    """CI once failed here: two test workers extracted UTKFace at the same time, and the second could not rename
    its copy onto the first's."""
    archive, cache = tmp_path / "many.tar", tmp_path / "cache"
    write_archive_of_small_files(archive, 3000)
    first, second = race(tmp_path, ["extract", str(archive), str(cache)], ["extract", str(archive), str(cache)])
    assert first == second
    assert [path.name for path in (cache / "extracted").iterdir()] == [Path(first).name]  # no staging left over
    assert len(list(Path(first, "UTKFace").iterdir())) == 3000


def test_an_interrupted_extraction_leaves_nothing_in_the_cache(tmp_path):
    archive, cache = tmp_path / "many.tar", tmp_path / "cache"
    write_archive_of_small_files(archive, 30_000)
    (worker,) = start_workers(tmp_path, ["extract", str(archive), str(cache)])
    while not list((cache / "extracted").glob(".partial-*/UTKFace/*")):  # extraction has begun
        time.sleep(0.01)
    worker.send_signal(signal.SIGINT)
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode != 0 and "KeyboardInterrupt" in stderr
    assert list((cache / "extracted").iterdir()) == []


def test_processes_writing_the_same_cache_file_at_once_never_collide(tmp_path):
    target = tmp_path / "cache" / "pixels.npy"
    race(tmp_path, ["write", "-", str(target), "1"], ["write", "-", str(target), "2"])
    assert [path.name for path in target.parent.iterdir()] == ["pixels.npy"]
    written = np.load(target)
    assert written.shape == (50_000,) and len(set(written.tolist())) == 1 and written[0] in (1, 2)


def test_sources_that_yield_nothing_give_clear_errors(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="no usable UTKFace images"):
        load_utkface(empty, cache_dir, verbose=False)
    with pytest.raises(DataSourceError, match="no such folder or archive.*UTKFace.tar.gz"):
        load_utkface(tmp_path / "missing" / "UTKFace", cache_dir)
    not_tar = tmp_path / "faces.zip"
    not_tar.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataSourceError, match="not a tar archive"):
        load_utkface(not_tar, cache_dir)


def test_hub_id_fails_fast_offline(cache_dir, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(DataSourceError, match="offline"):
        load_utkface("someone/utkface", cache_dir)
    assert time.perf_counter() - started < 5


def test_hub_rows_are_brought_to_the_local_columns(tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"face{i}.jpg"
        face_like(i).save(path)
        paths.append(str(path))
    rows = Dataset.from_dict({"image": paths, "age": [3, 30, 60, 90], "gender": [0, 1, 0, 1]}).cast_column("image", ImageFeature())
    normalised = normalise_hub_columns(rows)
    assert normalised["race"] == [RACE_NAMES.index("unknown")] * 4
    assert len(set(normalised["sha1"])) == 4 and normalised.features["gender"].names == ["male", "female"]
    with pytest.raises(DataSourceError, match="lacks the columns"):
        normalise_hub_columns(rows.remove_columns("age"))


def test_pixel_cache_is_made_once_at_the_processor_size(utk_folder, cache_dir):
    train = load_utkface(utk_folder, cache_dir, verbose=False)["train"]
    processor = AgeGenderImageProcessor(image_size=32)
    pixels = pixel_cache(train, processor, cache_dir)
    assert pixels.shape == (len(train), 32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0], processor.to_uint8(train[0]["image"]))
    (cache_file,) = (cache_dir / "pixels").glob("*.npy")
    stamp = cache_file.stat().st_mtime_ns
    pixel_cache(train, processor, cache_dir)
    assert cache_file.stat().st_mtime_ns == stamp


def test_explore_writes_summary_and_charts(utk_folder, tmp_path):
    out = tmp_path / "explore"
    result = subprocess.run(
        [sys.executable, "-m", "training.explore", "--data", str(utk_folder), "--out", str(out), "--cache_dir", str(tmp_path / "c")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[train]" in result.stdout and "age: mean" in result.stdout and "race:" in result.stdout
    for chart in ("age_histogram", "gender_counts", "race_counts", "age_by_gender", "sample_faces"):
        assert (out / f"{chart}.png").stat().st_size > 1000


def test_real_archive_yields_every_file_as_a_record_or_a_counted_skip(tmp_path, capsys):
    archive = require_real_archive()
    splits = load_utkface(archive)  # the user's cache: extracted once, then seconds
    report = capsys.readouterr().out
    kept = sum(len(d) for d in splits.values())
    skipped = sum(int(line.split()[1].rstrip(":").replace(",", "")) for line in report.splitlines() if line.strip().startswith("skipped"))
    assert kept + skipped == 21_351
    assert kept > 20_500
    fractions = [len(splits[s]) / kept for s in ("train", "validation", "test")]
    assert abs(fractions[0] - 0.8) < 0.02 and abs(fractions[1] - 0.1) < 0.02 and abs(fractions[2] - 0.1) < 0.02
