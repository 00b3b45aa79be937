"""Data preparation and loading: the first preparation of UTKFace (extract, check, split, cache pixels),
the cached load, and the images/s an epoch reads from the pixel cache at the training resolution.

    python benchmarks/data_loading.py --data ../shared/datasets/UTKFace.tar.gz [--image_size 64]

Uses a fresh temporary cache so the first preparation is really the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from modeling import AgeGenderImageProcessor  # noqa: E402
from training.data import load_utkface, pixel_cache  # noqa: E402


def prepare(data: str, cache: Path, processor) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    train = load_utkface(data, cache, verbose=False)["train"]
    pixels = pixel_cache(train, processor, cache)
    return time.perf_counter() - started, np.array(pixels), train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "UTKFace.tar.gz"))
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    processor = AgeGenderImageProcessor(image_size=args.image_size)
    print(f"Machine: {machine()}")
    with tempfile.TemporaryDirectory() as cache:
        first, _, _ = prepare(args.data, Path(cache), processor)
        print(f"  first preparation (extract, check {args.data}, split, cache train pixels at {args.image_size}px): {first:.1f} s")
        cached, pixels, train = prepare(args.data, Path(cache), processor)
        print(f"  cached load (splits and train pixels): {cached:.2f} s")
        loader = DataLoader(TensorDataset(torch.from_numpy(pixels), torch.tensor(train["age"])), batch_size=args.batch_size, shuffle=True)
        started = time.perf_counter()
        seen = sum(len(batch[0]) for batch in loader)
        print(f"  one epoch read from the cache: {seen / (time.perf_counter() - started):,.0f} images/s ({seen:,} images)")
        started = time.perf_counter()
        for row in train.select(range(2000)):
            processor.to_uint8(row["image"])
        print(f"  for comparison, decoding and resizing JPEGs every epoch: {2000 / (time.perf_counter() - started):,.0f} images/s")


if __name__ == "__main__":
    main()
