"""The Gradio app launched for real and driven with gradio_client, and its functions called directly."""

from __future__ import annotations

import os
import re
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import app
import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
import numpy as np
from PIL import Image, ImageOps

from app import build_demo, cache_image_atomically, launch, limit_malloc_arenas, predict_photo, stream_webcam
from bad_inputs import make_bad_files
from conftest import EXAMPLES, ROOT, blurred_cat, free_port, require_shipped_model
from faces import FaceTracker


@pytest.fixture(scope="module")
def server(app_url):
    return app_url


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def call_api(client: Client, path, is_crop: bool = False, *threshold: float):
    return client.predict(handle_file(str(path)), is_crop, *threshold, api_name="/predict")


def test_photo_with_several_faces_is_labelled(client):
    annotated, table, _, payload, message = call_api(client, EXAMPLES / "three_portraits.jpg")
    assert len(payload["faces"]) >= 3 and "Found" in message
    for face in payload["faces"]:
        assert set(face) >= {"box", "age", "age_interval", "gender", "gender_score"}
        x0, y0, x1, y1 = face["box"]
        assert 0 <= x0 < x1 <= 896 and 0 <= y0 < y1 <= 400
        assert face["age_interval"][0] <= face["age"] <= face["age_interval"][1]
        assert face["gender"] in ("male", "female") and 0.5 <= face["gender_score"] <= 1
    assert Image.open(annotated).size == (896, 400)
    assert [row[0] for row in table["data"]] == [1, 2, 3]
    assert [row[2] for row in table["data"]] == [face["gender"] for face in payload["faces"]]


def test_a_crowd_is_all_in_the_table_and_the_chart_says_which_faces_it_shows(analyzer, tmp_path):
    """Twelve faces (the three-portrait example, two by two): every face has its row; the chart draws the first
    ten, as its legend and the message say."""
    portraits = Image.open(EXAMPLES / "three_portraits.jpg").convert("RGB")
    crowd = Image.new("RGB", (portraits.width * 2, portraits.height * 2))
    for x in (0, portraits.width):
        for y in (0, portraits.height):
            crowd.paste(portraits, (x, y))
    crowd.save(tmp_path / "crowd.jpg", quality=95)
    _, table, chart, payload, message = predict_photo(analyzer, str(tmp_path / "crowd.jpg"))
    assert len(payload["faces"]) == 12 and len(table.data) == 12
    legend = [text.get_text() for text in chart.axes[0].get_legend().get_texts()]
    assert len(legend) == app.MAX_CHART_FACES == 10 and legend[0].startswith("1:") and legend[-1].startswith("10:")
    assert "Found 12 faces" in message and "The chart shows faces 1-10; the table lists all 12." in message


@pytest.mark.parametrize("picture", ["cat", "sky"])
def test_a_picture_without_a_face_gets_no_age_or_gender(client, tmp_path, picture):
    """The cat example and a patch of sky: "no face found", the face-crop box suggested, and no human reading of
    the picture (the model called the cat "female, 16" and the sky "male, 28")."""
    path = EXAMPLES / "chelsea_the_cat.jpg"
    if picture == "sky":
        path = tmp_path / "sky.jpg"
        gradient = np.linspace([90, 150, 230], [180, 210, 250], 480).astype(np.uint8)
        Image.fromarray(np.repeat(gradient[:, None, :], 640, axis=1)).save(path)
    _, table, _, payload, message = call_api(client, path)
    assert payload["faces"] == [] and table["data"] == [] and "whole_image" not in payload
    assert "No face found" in message and "already a face crop" in message
    assert not re.search(r"\b(male|female|years)\b|\d+ \(\d+-\d+\)", message.replace("face crop", ""))


def test_a_ticked_face_crop_box_gives_the_reading_of_the_whole_picture(client):
    _, table, _, payload, _ = call_api(client, EXAMPLES / "chelsea_the_cat.jpg", True)
    assert len(payload["faces"]) == 1 and payload["faces"][0]["box"] == [0, 0, 451, 300] and len(table["data"]) == 1


def test_api_boxes_are_in_the_pixels_of_the_photo_sent(client, tmp_path):
    big = tmp_path / "big.jpg"
    Image.open(EXAMPLES / "obama.jpg").resize((1920, 2400)).save(big, quality=90)
    small_payload = call_api(client, EXAMPLES / "obama.jpg")[3]
    annotated, _, _, payload, _ = call_api(client, big)
    assert payload["image_size"] == [1920, 2400] and small_payload["image_size"] == [480, 600]
    ((x0, y0, x1, y1),) = [face["box"] for face in payload["faces"]]
    sx0, sy0, sx1, sy1 = small_payload["faces"][0]["box"]
    assert abs(x0 - 4 * sx0) < 20 and abs(y1 - 4 * sy1) < 20 and abs(x1 - 4 * sx1) < 20
    assert len(payload["faces"][0]["landmarks"]) == 5
    assert max(Image.open(annotated).size) == 1280  # the picture shown is shrunk; the boxes are not


def test_face_crop_option_skips_detection(client):
    _, _, _, payload, _ = call_api(client, EXAMPLES / "chelsea_the_cat.jpg", is_crop=True)
    assert len(payload["faces"]) == 1 and payload["faces"][0]["box"] == [0, 0, 451, 300]


def test_the_detection_threshold_reaches_the_detector_and_is_checked(client, tmp_path):
    path = tmp_path / "blurred_cat.png"
    blurred_cat().save(path)
    loose = call_api(client, path, False, 0.3)[3]["faces"]
    assert loose and min(face["detection_score"] for face in loose) >= 0.3
    assert call_api(client, path, False, 0.95)[3]["faces"] == []
    for outside in (0.99, 0.1):  # refused in words that name the value and the range
        with pytest.raises(Exception, match=rf"threshold {outside:g} is outside 0.3-0.95"):
            call_api(client, path, False, outside)


def test_a_typed_threshold_outside_the_range_is_used_at_its_end_and_the_message_says_so(analyzer):
    from app import predict_photo_on_page

    *_, message = predict_photo_on_page(analyzer, str(EXAMPLES / "obama.jpg"), False, 0.1)
    assert "Found 1 face" in message and "threshold 0.1 is outside 0.3-0.95; 0.3 was used" in message


def test_bad_file_gets_a_clear_error_and_the_server_keeps_serving(client, bad_files):
    with pytest.raises(Exception, match="text_renamed.jpg cannot be used: .*not an image.*Upload a JPEG"):  # names the file
        call_api(client, bad_files["text_renamed.jpg"][0])
    assert len(call_api(client, EXAMPLES / "obama.jpg")[3]["faces"]) == 1


def test_user_mistakes_are_one_log_line_each_and_a_bare_path_is_refused_in_words(client, bad_files, capfd, caplog):
    capfd.readouterr()
    with pytest.raises(Exception, match="must be sent as a file, not as the text '/etc/hostname'.*handle_file"):
        client.predict("/etc/hostname", False, api_name="/predict")
    with pytest.raises(Exception, match="text_renamed.jpg cannot be used"):
        call_api(client, bad_files["text_renamed.jpg"][0])
    with pytest.raises(Exception, match="threshold 0.1 is outside"):
        call_api(client, EXAMPLES / "obama.jpg", False, 0.1)
    assert "Traceback" not in capfd.readouterr().err
    refused = [r.getMessage() for r in caplog.records if r.name == "age_gender_app"]
    assert len(refused) == 3 and all(m.startswith("refused a request: ") and "\n" not in m for m in refused)


def test_oversized_upload_is_refused(client, tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((2600, 2600), 100).convert("RGB").save(big)  # noise does not compress: about 20 MB
    assert big.stat().st_size > 10 * 1024 * 1024
    with pytest.raises(Exception, match="(?i)exceeds|too large|maximum|413|size"):
        call_api(client, big)
    assert len(call_api(client, EXAMPLES / "obama.jpg")[3]["faces"]) == 1


def test_bad_input_corpus_through_the_live_api(client, bad_files):
    for name, (path, expectation) in bad_files.items():
        if expectation == "ok":
            annotated, _, _, payload, _ = call_api(client, path)
            assert Image.open(annotated).size[0] >= 1, name
        else:
            with pytest.raises(Exception, match="(?i)image|large|decode"):
                call_api(client, path)
    assert len(call_api(client, EXAMPLES / "obama.jpg")[3]["faces"]) == 1


def test_bad_input_corpus_through_the_app_function(analyzer, bad_files):
    for name, (path, expectation) in bad_files.items():
        if expectation == "ok":
            annotated, table, _, payload, message = predict_photo(analyzer, str(path))
            assert annotated.size[0] >= 1 and message, name
        else:
            with pytest.raises(gr.Error):
                predict_photo(analyzer, str(path))


def test_exif_rotated_photo_is_read_upright(analyzer, bad_files):
    result = analyzer.analyze(bad_files["exif_rotated.jpg"][0])
    assert result.image.size == Image.open(EXAMPLES / "obama.jpg").size and len(result.faces) == 1


def test_webcam_stream_smooths_ages_across_frames(analyzer):
    frame = __import__("numpy").asarray(Image.open(EXAMPLES / "obama.jpg").convert("RGB").resize((480, 640)))
    annotated, labels, tracker = stream_webcam(analyzer, frame, None)
    assert isinstance(tracker, FaceTracker) and len(tracker.tracks) == 1 and labels.startswith("1: M ")
    first_age = analyzer.analyze(frame).faces[0].age
    older = analyzer.predict_faces([Image.open(EXAMPLES / "astronaut.jpg")])[0]
    older.box = tracker.tracks[0].box
    smoothed = tracker.update([older], analyzer.model.config)[0]
    assert min(first_age, older.age) < smoothed.age < max(first_age, older.age)
    assert abs(smoothed.age - first_age) < abs(older.age - first_age)
    assert smoothed.gender == "male"  # one female frame does not flip a face seen as male
    assert stream_webcam(analyzer, None, tracker)[0] is None


@pytest.mark.parametrize("path", ["/etc/hostname", "../../../etc/hostname", str(EXAMPLES / "obama.jpg")])
def test_a_client_cannot_make_the_server_read_its_own_files(server, client, path):
    """Only uploaded files are read: a path typed into the request is refused, even one inside the app."""
    api = f"{server}gradio_api/call/predict"
    started = httpx.post(api, json={"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, False]}, timeout=30)
    assert started.status_code == 200
    events = httpx.get(f"{api}/{started.json()['event_id']}", timeout=60).text
    assert "event: error" in events and "complete" not in events
    assert len(call_api(client, EXAMPLES / "obama.jpg")[3]["faces"]) == 1


def test_a_shared_output_file_is_never_seen_half_written(tmp_path):
    """Users who send the same photo share one cached output file; while one request writes it, another may
    be serving it (benchmarks/app_load.py saw truncated downloads when gradio rewrote it in place)."""
    image = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB")
    path = Path(cache_image_atomically(image, str(tmp_path), "png"))
    expected = path.read_bytes()
    stop = threading.Event()
    partial_reads: list[int] = []

    def read_while_written() -> None:
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if data != expected:
                partial_reads.append(len(data))

    readers = [threading.Thread(target=read_while_written) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(30):
            path.unlink()
            assert cache_image_atomically(image, str(tmp_path), "png") == str(path)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert partial_reads == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging files left behind


def test_concurrent_users_sending_the_same_photo_all_get_the_whole_result(server):
    def one_user(_: int) -> list[int]:
        user = Client(server, verbose=False)
        return [len(Path(call_api(user, EXAMPLES / "astronaut.jpg")[0]).read_bytes()) for _ in range(3)]

    with ThreadPoolExecutor(6) as pool:
        sizes = [size for sizes in pool.map(one_user, range(6)) for size in sizes]
    assert len(sizes) == 18 and len(set(sizes)) == 1


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_malloc_arenas_are_capped_on_glibc():
    assert limit_malloc_arenas() is True


def test_uploads_and_results_leave_the_cache_once_old(analyzer, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "CACHE_LIFETIME", (1, 1))  # the app's (3600, 7200), in seconds for the test
    photo = tmp_path / "someones_photo.jpg"
    ImageOps.mirror(Image.open(EXAMPLES / "obama.jpg")).save(photo)  # not an example: those stay cached
    demo = build_demo(analyzer)
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        call_api(Client(f"http://127.0.0.1:{port}/", verbose=False), photo)
        created = {Path(f) for files in demo.temp_file_sets for f in files if Path(f).suffix == ".jpeg" or Path(f).name == photo.name}
        assert {f.name for f in created} == {photo.name, "image.jpeg"} and all(f.exists() for f in created)  # upload, result
        deadline = time.monotonic() + 15
        while any(f.exists() for f in created) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(f.exists() for f in created)
    finally:
        demo.close()


def test_python_app_py_serves_as_users_start_it():
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "AGE_GENDER_DTYPE": "float32"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                user = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except (httpx.HTTPError, ValueError, OSError):
                assert process.poll() is None and time.monotonic() < deadline, "the app did not start"
                time.sleep(0.5)
        payload = call_api(user, EXAMPLES / "obama.jpg")[3]
        assert len(payload["faces"]) == 1
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "torch.float32" in output  # AGE_GENDER_DTYPE chose the precision
    assert not (ROOT / "app.pyi").exists()  # gradio writes stubs beside Component subclasses; the app has none


def start_app_with_model(model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "app.py", "--model", str(model)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120,
    )


def test_a_missing_model_folder_is_named_without_a_traceback(tmp_path):
    missing = tmp_path / "no_model_here"
    result = start_app_with_model(missing)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"could not load a model from {str(missing)!r}: there is no such folder" in result.stderr


def test_a_model_path_that_does_not_exist_fails_at_once_without_trying_the_hub(tmp_path):
    """Hub offline mode not set: a path was tried as a Hub id, five retries over about 25 s."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "app.py", "--model", "tests/no_such_model"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "there is no such folder" in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 20  # the app's own start-up (imports), no network retries


def test_a_truncated_model_is_named_without_a_traceback(tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((require_shipped_model() / name).read_bytes())
    (broken / "model.safetensors").write_bytes((require_shipped_model() / "model.safetensors").read_bytes()[:100_000])
    result = start_app_with_model(broken)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"model.safetensors of {broken} is corrupt or truncated" in result.stderr
