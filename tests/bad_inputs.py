"""A corpus of bad and odd image files, generated on demand: what users upload in real life."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import EXAMPLES


def make_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expectation): "ok" must give a result, "error" a clear error."""
    folder.mkdir(parents=True, exist_ok=True)
    face = Image.open(EXAMPLES / "obama.jpg").convert("RGB")
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, expectation: str, writer) -> None:
        path = folder / name
        writer(path)
        files[name] = (path, expectation)

    add("zero_bytes.jpg", "error", lambda p: p.write_bytes(b""))
    jpeg = io.BytesIO()
    face.save(jpeg, "JPEG")
    add("truncated.jpg", "error", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3]))
    add("text_renamed.jpg", "error", lambda p: p.write_text("hello, I am not a picture\n" * 20))
    add("png_named.jpg", "ok", lambda p: face.save(p, "PNG"))
    add("one_pixel.png", "ok", lambda p: Image.new("RGB", (1, 1), (120, 90, 80)).save(p))
    add("huge_20000.png", "error", lambda p: Image.new("1", (20_000, 20_000)).save(p))
    add("bomb.png", "error", lambda p: Image.new("L", (30_000, 30_000)).save(p, optimize=True))
    add("sixteen_bit.png", "ok", lambda p: Image.fromarray((np.asarray(face.convert("L"), dtype=np.uint16) * 257)).save(p))
    add("cmyk.jpg", "ok", lambda p: face.convert("CMYK").save(p, "JPEG"))
    add("animated.gif", "ok", lambda p: face.save(p, save_all=True, append_images=[face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], duration=100))

    def exif_rotated(p: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 8  # stored rotated; viewers turn it upright
        face.transpose(Image.Transpose.ROTATE_270).save(p, exif=exif)

    add("exif_rotated.jpg", "ok", exif_rotated)
    add("grayscale.jpg", "ok", lambda p: face.convert("L").save(p))
    add("rgba.png", "ok", lambda p: face.convert("RGBA").save(p))
    add("palette.png", "ok", lambda p: face.convert("P").save(p))
    return files
