"""Helpers shared by the benchmark scripts: timing statistics, test photos, the machine's description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timings_ms(function: Callable[[], object], repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return np.asarray(samples)


def p50_p95(samples: np.ndarray) -> str:
    return f"p50 {np.percentile(samples, 50):.1f} ms, p95 {np.percentile(samples, 95):.1f} ms"


# Head-and-shoulders boxes (3:4) around the faces in two examples, so that five side by side in a
# 640x480 photo are about 60 px wide, as in a group photo, rather than too small to detect.
HEAD_BOXES = {"obama.jpg": (110, 0, 410, 390), "astronaut.jpg": (140, 20, 390, 345)}


def test_photo(size: tuple[int, int], faces: int) -> Image.Image:
    """A photo of `size` holding `faces` faces: public-domain portraits from examples/ laid side by side."""
    portraits = [Image.open(EXAMPLES / name).convert("RGB").crop(box) for name, box in HEAD_BOXES.items()]
    canvas = Image.new("RGB", size, (225, 225, 225))
    width = size[0] // faces
    for i in range(faces):
        portrait = portraits[i % 2]
        if i >= 2:
            portrait = ImageOps.mirror(portrait)
        tile = ImageOps.fit(portrait, (width, min(size[1], int(width * 1.3))), centering=(0.5, 0.2))
        canvas.paste(tile, (i * width, (size[1] - tile.height) // 2))
    return canvas


def peak_memory_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
