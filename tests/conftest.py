"""Shared fixtures: small UTKFace-style folders that the tests make themselves, and paths to real data."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_ARCHIVE = Path(os.environ.get("UTKFACE_ARCHIVE", ROOT.parent / "shared" / "datasets" / "UTKFace.tar.gz"))
SHIPPED_MODEL = ROOT / "model"
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
EXAMPLES = ROOT / "examples"


def face_like(seed: int, size: int = 200) -> Image.Image:
    """A synthetic 'face': a smooth random colour field (no dataset image is ever stored in the repo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def utk_name(age: int, gender: int, race: int | None, stamp: int) -> str:
    race_part = "" if race is None else f"{race}_"
    return f"{age}_{gender}_{race_part}{20170101000000000 + stamp}.jpg.chip.jpg"


def write_utk_folder(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` valid UTKFace-style files with ages spread over 1-90 and both genders."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / utk_name(1 + (i * 7) % 90, i % 2, i % 5, i)
        face_like(i).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture
def utk_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "UTKFace"
    write_utk_folder(folder, 60)
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def require_real_archive() -> Path:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"the UTKFace archive is not at {REAL_ARCHIVE} (set UTKFACE_ARCHIVE to point at it)")
    return REAL_ARCHIVE


def require_shipped_model() -> Path:
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the shipped model is missing from {SHIPPED_MODEL}")
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def shipped_network(tmp_path_factory) -> Path:
    """The shipped model's first network saved alone (v7's is v6's: 64 px at UTKFace's framing, read beside its
    mirror image), for what takes a single network (grow_model, narrow_model) or compares with it."""
    from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel

    shipped, folder = require_shipped_model(), tmp_path_factory.mktemp("shipped_network")
    config = AgeGenderConfig.from_pretrained(shipped)
    alone = {"ensemble_size": 1, "network_zooms": config.network_zooms[:1], "network_read_sizes": config.network_read_sizes[:1],
             "network_hidden_sizes": None, "network_embedding_sizes": None, "flip_average": True}
    AgeGenderModel.from_pretrained(shipped, config=AgeGenderConfig.from_dict({**config.to_dict(), **alone})).save_pretrained(folder)
    AgeGenderImageProcessor(image_size=config.network_read_sizes[0], face_zoom=config.network_zooms[0]).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def analyzer():
    from faces import FaceAnalyzer

    return FaceAnalyzer(require_shipped_model())


@pytest.fixture(scope="session")
def app_url(analyzer):
    """The app served for real on a free port, shared by the API and browser tests."""
    from app import build_demo, launch

    demo = build_demo(analyzer)
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests call training's and faces.batch's `main()` in-process; each builds an Accelerator, whose state is
    process-wide. Reset it after every test, as Accelerate's own tests do."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def blurred_cat() -> Image.Image:
    """The cat photo shrunk 4x and enlarged again: the detector then sees a 'face' in the fur (a false box
    scoring about 0.7), the kind of box that a stricter threshold is for."""
    cat = Image.open(EXAMPLES / "chelsea_the_cat.jpg").convert("RGB")
    return cat.resize((cat.width // 4, cat.height // 4)).resize(cat.size)


WIDER_COLUMNS = [
    "file", "photo", "box_x", "box_y", "box_w", "box_h", "photo_box_x", "photo_box_y", "photo_box_w", "photo_box_h",
    "scale", "clipped", "perceived_gender", "perceived_age", "perceived_skin", "blur", "illumination", "occlusion", "pose",
]


def require_shared(name: str) -> Path:
    folder = SHARED_DATASETS / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here (../shared/datasets)")
    return folder


def wider_row(file: str, photo: str, box: tuple[float, float, float, float], gender: str, age: str) -> dict:
    x, y, w, h = box
    return {
        "file": file, "photo": photo, "box_x": x, "box_y": y, "box_w": w, "box_h": h, "photo_box_x": x, "photo_box_y": y,
        "photo_box_w": w, "photo_box_h": h, "scale": 1, "clipped": 0, "perceived_gender": gender, "perceived_age": age,
        "perceived_skin": "II", "blur": 0, "illumination": 0, "occlusion": 0, "pose": 0,
    }


def write_wider_folder(folder: Path) -> Path:
    """A wider-faces-style folder of real photos: the astronaut (a face, labelled where it is), the same photo
    labelled where there is no face, and a corrupt file; two regions of one photo share a group."""
    (folder / "images" / "0--Test").mkdir(parents=True)
    shutil.copy(EXAMPLES / "astronaut.jpg", folder / "images" / "0--Test" / "astronaut_1.jpg")
    shutil.copy(EXAMPLES / "astronaut.jpg", folder / "images" / "0--Test" / "astronaut_2.jpg")
    (folder / "images" / "0--Test" / "broken_1.jpg").write_bytes(b"this is not a JPEG")
    from faces.detection import RetinaFaceDetector

    detected = RetinaFaceDetector()(np.asarray(Image.open(EXAMPLES / "astronaut.jpg").convert("RGB")))
    x0, y0, x1, y1 = max(detected, key=lambda d: d.score).box
    rows = [
        wider_row("images/0--Test/astronaut_1.jpg", "0--Test/astronaut.jpg", (x0, y0, x1 - x0, y1 - y0), "Female", "Young Adult"),
        wider_row("images/0--Test/astronaut_2.jpg", "0--Test/astronaut.jpg", (2, 2, 20, 20), "Male", "Senior"),
        wider_row("images/0--Test/broken_1.jpg", "0--Test/broken.jpg", (10, 10, 30, 30), "Not Sure", "Adult"),
    ]
    with open(folder / "faces.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, WIDER_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_lfw_folder(folder: Path) -> Path:
    """An lfw-gender-style folder: a colour portrait, the same portrait in greyscale, and a truncated file."""
    (folder / "images" / "Barack_Obama").mkdir(parents=True)
    (folder / "images" / "Grey_Person").mkdir(parents=True)
    portrait = Image.open(EXAMPLES / "obama.jpg").convert("RGB")
    portrait.save(folder / "images" / "Barack_Obama" / "Barack_Obama_0001.jpg")
    portrait.convert("L").save(folder / "images" / "Grey_Person" / "Grey_Person_0001.jpg")
    data = (EXAMPLES / "obama.jpg").read_bytes()
    (folder / "images" / "Barack_Obama" / "Barack_Obama_0002.jpg").write_bytes(data[: len(data) // 3])
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "person", "gender", "agreed_by", "fold"])
        writer.writerow(["images/Barack_Obama/Barack_Obama_0001.jpg", "Barack_Obama", "male", "both", 0])
        writer.writerow(["images/Grey_Person/Grey_Person_0001.jpg", "Grey_Person", "female", "both", 1])
        writer.writerow(["images/Barack_Obama/Barack_Obama_0002.jpg", "Barack_Obama", "male", "both", 0])
    return folder
