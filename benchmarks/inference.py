"""Inference speed on this machine: faces/s at batch 1, 8 and 64 for the shipped model and the seed
replica, single-face latency, whole photos end to end, and peak memory.

    python benchmarks/inference.py [--model model] [--seed_model runs/seed]

The seed replica's speed does not depend on its weights: without --seed_model an untrained one is timed.
It runs in float32, as the issue's reference figure does; the shipped model is timed in float32 and, where
the CPU computes bfloat16 natively, in bfloat16, as faces.py and the app run it by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402

import modeling  # noqa: E402,F401
from benchmarks.common import ROOT, machine, p50_p95, peak_memory_mb, test_photo, timings_ms  # noqa: E402
from faces import FaceAnalyzer, annotate, native_bfloat16  # noqa: E402
from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel  # noqa: E402


def load(path: str | None, preset: str, dtype: torch.dtype = torch.float32):
    if path:
        return AutoModel.from_pretrained(path, dtype=dtype).eval(), AutoImageProcessor.from_pretrained(path)
    config = AgeGenderConfig.from_preset(preset)
    return AgeGenderModel(config).eval(), AgeGenderImageProcessor(image_size=config.image_size)


def gflops_per_face(model, image_size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def model_figures(name: str, model, processor) -> dict:
    size = model.config.image_size
    figures = {"name": name, "parameters": sum(p.numel() for p in model.parameters()), "input": size, "gflops": gflops_per_face(model, size)}
    for batch in (1, 8, 64):
        pixels = torch.randn(batch, 3, size, size)
        samples = timings_ms(lambda: model(pixel_values=pixels), repeats=max(5, 200 // batch))
        figures[f"faces_per_s_b{batch}"] = batch / (samples.mean() / 1000)
    face = test_photo((200, 200), 1)
    figures["single_face"] = timings_ms(lambda: model(**processor(images=face)), repeats=200)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "model"))
    parser.add_argument("--seed_model", default=None, help="A trained seed replica (speed is the same untrained).")
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    shipped = f"shipped ({Path(args.model).name})"
    rows = [model_figures(f"{shipped}, float32", *load(args.model, "small"))]
    if native_bfloat16("cpu"):
        rows.append(model_figures(f"{shipped}, bfloat16", *load(args.model, "small", torch.bfloat16)))
    seed = model_figures("seed replica, float32", *load(args.seed_model, "seed"))
    rows.append(seed)
    print("| model | parameters | input | GFLOPs/face | faces/s b1 | faces/s b8 | faces/s b64 | single face (processor + model) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['parameters']:,} | {r['input']}px | {r['gflops']:.3f} | {r['faces_per_s_b1']:.0f} | {r['faces_per_s_b8']:.0f} | {r['faces_per_s_b64']:.0f} | {p50_p95(r['single_face'])} |")
    for row in rows[:-1]:
        print(f"\n{row['name']} at batch 64: {row['faces_per_s_b64'] / seed['faces_per_s_b64']:.1f}x the seed replica's faces/s", end="")
    print()

    analyzer = FaceAnalyzer(args.model)
    print(f"\nPhotos end to end (load, detect, align, predict in {analyzer.model.dtype}, draw):")
    for size in ((640, 480), (1920, 1080)):
        for faces in (1, 5):
            photo = test_photo(size, faces)
            found = len(analyzer.analyze(photo).faces)
            samples = timings_ms(lambda: annotate(*(lambda r: (r.image, r.faces))(analyzer.analyze(photo))), repeats=30)
            print(f"  {size[0]}x{size[1]}, {faces} face{'s' if faces > 1 else ''} ({found} found): {p50_p95(samples)}")
    print(f"\nPeak memory of this process: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
