"""`python -m faces.batch`: a folder with good photos, a face-free photo, a corrupt file, a nested folder and a
short video; every output format; a list file, a glob and a dataset; resume after a kill; two processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import EXAMPLES, ROOT
from faces.batch import main as batch_main


def write_video(path: Path, photo: Path, frames: int = 25) -> Path:
    """A short MPEG-4 video of a still photo, made with PyAV."""
    import av

    canvas = Image.new("RGB", (640, 480), (90, 90, 90))
    canvas.paste(Image.open(photo).convert("RGB").resize((384, 480)), (128, 0))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("collection")
    for name in ("three_portraits.jpg", "obama.jpg", "chelsea_the_cat.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(EXAMPLES / "astronaut.jpg", folder / "nested" / "deeper" / "collins.jpg")
    (folder / "corrupt.jpg").write_bytes((EXAMPLES / "obama.jpg").read_bytes()[:5000])
    (folder / "notes.txt").write_text("not a photo, and not named like one: ignored")
    write_video(folder / "nested" / "clip.mp4", EXAMPLES / "obama.jpg")
    return folder


@pytest.fixture(scope="module")
def labelled(collection, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("out") / "faces.csv"
    batch_main([str(collection), "--out", str(out), "--every", "10", "--photos_per_step", "2"])
    return pd.read_csv(out)


def rows_of(table: pd.DataFrame, name: str) -> pd.DataFrame:
    return table[table["source"].str.endswith(name)]


def test_every_input_gets_rows_in_input_order(labelled):
    sources = list(dict.fromkeys(labelled["source"]))
    assert [Path(s).name for s in sources] == ["chelsea_the_cat.jpg", "corrupt.jpg", "clip.mp4", "collins.jpg", "obama.jpg", "three_portraits.jpg"]
    assert list(labelled.columns[:4]) == ["source", "frame", "status", "face"]


def test_faces_have_boxes_in_their_photo_and_a_reading(labelled):
    trio = rows_of(labelled, "three_portraits.jpg")
    assert trio["face"].tolist() == [1, 2, 3] and trio["gender"].tolist() == ["male", "male", "female"]
    assert (trio["x0"] < trio["x1"]).all() and (trio["x1"] <= trio["image_width"]).all() and (trio["image_width"] == 896).all()
    assert ((trio["age_low"] <= trio["age"]) & (trio["age"] <= trio["age_high"])).all()
    assert trio["gender_is_guess"].tolist() == [score < 0.9 or age < 10 for score, age in zip(trio["gender_score"], trio["age"])]  # the labels' "?"
    assert rows_of(labelled, "collins.jpg")["gender"].tolist() == ["female"]  # found in the nested folder


def test_a_face_free_photo_and_a_corrupt_file_are_rows_that_say_so(labelled):
    cat = rows_of(labelled, "chelsea_the_cat.jpg")
    assert cat["status"].tolist() == ["no face"] and cat["face"].isna().all()
    corrupt = rows_of(labelled, "corrupt.jpg")
    assert corrupt["status"].tolist() == ["failed"] and "corrupt or truncated" in corrupt["error"].iloc[0]


def test_a_video_is_labelled_every_nth_frame(labelled):
    clip = rows_of(labelled, "clip.mp4")
    assert clip["frame"].tolist() == [0, 10, 20] and (clip["gender"] == "male").all()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_output_formats_hold_the_same_rows(collection, labelled, tmp_path, suffix):
    out = tmp_path / f"faces{suffix}"
    batch_main([str(collection), "--out", str(out), "--every", "10"])
    table = pd.read_json(out, lines=True) if suffix == ".jsonl" else pd.read_parquet(out)
    assert table["source"].tolist() == labelled["source"].tolist()
    assert table["age"].round(1).fillna(-1).tolist() == labelled["age"].round(1).fillna(-1).tolist()


def test_a_list_file_a_glob_and_a_dataset_are_inputs_too(collection, tmp_path):
    listing = tmp_path / "photos.txt"
    listing.write_text(f"{collection / 'obama.jpg'}\n# a comment\n{collection / 'nested/deeper/collins.jpg'}\n")
    from_list = batch_main([str(listing), "--out", str(tmp_path / "list.csv")])
    assert from_list["gender"].tolist() == ["male", "female"]
    from_glob = batch_main([str(collection / "*.jpg"), "--out", str(tmp_path / "glob.csv")])
    assert {Path(s).name for s in from_glob["source"]} == {"chelsea_the_cat.jpg", "corrupt.jpg", "obama.jpg", "three_portraits.jpg"}
    import datasets

    saved = tmp_path / "dataset"
    rows = {"photo": [Image.open(EXAMPLES / "obama.jpg"), Image.open(EXAMPLES / "astronaut.jpg")], "id": [1, 2]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"photo": datasets.Image(), "id": datasets.Value("int32")})).save_to_disk(saved)
    from_dataset = batch_main([str(saved), "--dataset", "--image_column", "photo", "--out", str(tmp_path / "ds.csv")])
    assert from_dataset["gender"].tolist() == ["male", "female"] and from_dataset["source"].iloc[1].endswith("[1]")
    with pytest.raises(SystemExit, match="no column 'image'"):
        batch_main([str(saved), "--dataset", "--out", str(tmp_path / "bad.csv")])


def test_annotated_photos_are_saved_on_request(collection, tmp_path):
    drawn = tmp_path / "drawn"
    batch_main([str(collection / "three_portraits.jpg"), "--out", str(tmp_path / "one.csv"), "--annotated_dir", str(drawn)])
    (saved,) = drawn.iterdir()
    assert saved.name == "000000_three_portraits.jpg" and Image.open(saved).size == (896, 400)
    assert Image.open(saved).tobytes() != Image.open(collection / "three_portraits.jpg").convert("RGB").tobytes()


def test_bad_arguments_are_refused_with_a_reason(tmp_path):
    with pytest.raises(SystemExit):
        batch_main([str(EXAMPLES), "--out", str(tmp_path / "faces.xlsx")])
    with pytest.raises(SystemExit, match="matches any file"):
        batch_main([str(tmp_path / "nowhere" / "*.jpg"), "--out", str(tmp_path / "faces.csv")])


def run_batch(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.Popen:
    command = (launcher or [sys.executable]) + ["-m", "faces.batch", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def many_photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        name = ("three_portraits.jpg", "obama.jpg", "astronaut.jpg", "chelsea_the_cat.jpg")[i % 4]
        shutil.copy(EXAMPLES / name, folder / f"{i:03d}_{name}")
    return folder


def test_a_killed_run_resumes_to_the_same_file(tmp_path):
    photos = many_photos(tmp_path / "photos", 24)
    whole = tmp_path / "whole.jsonl"
    assert run_batch([str(photos), "--out", str(whole)]).wait(timeout=600) == 0
    out = tmp_path / "resumed.jsonl"
    process = run_batch([str(photos), "--out", str(out), "--photos_per_step", "4"])
    parts = tmp_path / ".resumed.jsonl.parts"
    deadline = time.monotonic() + 300
    while not any(len(p.read_text().splitlines()) >= 8 for p in parts.glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    written = sum(len(p.read_text().splitlines()) for p in parts.glob("part-*.jsonl"))
    assert 0 < written < 36  # some photos written, not all (36 rows in all)
    refused = run_batch([str(photos), "--out", str(out)])
    assert refused.wait(timeout=300) != 0 and "--resume" in refused.stdout.read()
    resumed = run_batch([str(photos), "--out", str(out), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "already written" in output and not parts.exists()
    assert out.read_text() == whole.read_text()
    again = run_batch([str(photos), "--out", str(out), "--resume"])  # on a finished run: nothing to do, said
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "is complete: nothing to resume" in output and "labelling" not in output
    assert out.read_text() == whole.read_text()


def test_a_video_progress_bar_counts_frames(tmp_path, capfd):
    video = write_video(tmp_path / "talk.mp4", EXAMPLES / "obama.jpg", frames=25)
    batch_main([str(video), "--out", str(tmp_path / "talk.csv"), "--every", "5"])
    progress = capfd.readouterr().err
    assert "5/5" in progress and "frame/s" in progress and "photo/s" not in progress


def test_two_processes_give_the_same_rows_as_one(collection, labelled, tmp_path):
    out = tmp_path / "two.csv"
    # On a machine without GPUs, --multi_gpu starts the processes with torchrun and faces.batch joins them on the CPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    process = run_batch([str(collection), "--out", str(out), "--every", "10"], launcher=launcher)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert "on 2 process(es)" in output
    pd.testing.assert_frame_equal(pd.read_csv(out), labelled)
