"""The app in a real browser (Debian's chromium driven by Playwright): a photo upload read back from the
page, and the webcam tab fed a video of a face through Chromium's fake camera."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from app import build_demo, launch
from conftest import EXAMPLES, ROOT, require_shipped_model
from faces import FaceAnalyzer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "screenshot.png"

if not Path(CHROMIUM).exists():
    if os.environ.get("REQUIRE_BROWSER"):  # CI sets it: a missing browser must not pass as a skip
        raise RuntimeError(f"REQUIRE_BROWSER is set but chromium is not at {CHROMIUM}")
    pytestmark = pytest.mark.skip(reason="Debian's chromium is not installed (apt-get install chromium)")


def write_y4m(photo: Path, path: Path, frames: int = 20, size: tuple[int, int] = (640, 480)) -> Path:
    """A raw 4:2:0 video of a still photo, the format Chromium's fake camera plays."""
    image = Image.open(photo).convert("RGB")
    image.thumbnail(size)
    canvas = Image.new("RGB", size, (200, 200, 200))
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    y, cb, cr = canvas.convert("YCbCr").split()
    half = (size[0] // 2, size[1] // 2)
    frame = b"FRAME\n" + y.tobytes() + cb.resize(half).tobytes() + cr.resize(half).tobytes()
    path.write_bytes(f"YUV4MPEG2 W{size[0]} H{size[1]} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return path


@pytest.fixture(scope="module")
def app_url():
    demo = build_demo(FaceAnalyzer(require_shipped_model()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    video = write_y4m(EXAMPLES / "obama.jpg", tmp_path_factory.mktemp("video") / "face.y4m")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={video}",
            ],
        )
        yield browser
        browser.close()


def test_uploaded_photo_gets_labels_in_the_page(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app_url, wait_until="load")
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLES / "three_portraits.jpg"))
    page.get_by_text("Found").first.wait_for(timeout=60_000)
    message = page.get_by_text("Found").first.inner_text()
    assert "faces" in message
    text = ""
    for _ in range(60):  # the table fills in after the message
        text = page.locator("body").inner_text()
        if re.search(r"\b(male|female)\b", text):
            break
        page.wait_for_timeout(500)
    assert re.search(r"\b(male|female)\b", text) and re.search(r"\b\d{1,3}-\d{1,3}\b", text), text
    page.wait_for_timeout(500)
    shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_webcam_stream_shows_a_label(browser, app_url):
    page = browser.new_page()
    page.goto(app_url, wait_until="load")
    page.get_by_role("tab", name="Webcam").click()
    page.get_by_text("Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    labels = page.get_by_label("Faces in view")
    for _ in range(120):
        if labels.input_value():
            break
        page.wait_for_timeout(500)
    value = labels.input_value()
    assert value.startswith(("M ", "F ")) and "(" in value, value
    page.close()
