"""Inference speed on this machine: faces/s at batch 1, 8 and 64 for the shipped model on torch (float32,
bfloat16) and on onnxruntime (float32, int8, where the model folder has its ONNX export) and for the seed
replica, single-face latency, whole photos end to end on each runtime, and peak memory.

    python benchmarks/inference.py [--model model] [--seed_model runs/seed]

The seed replica's speed does not depend on its weights: without --seed_model an untrained one is timed.
It runs in float32, as the seed notebook's reference figure does; the shipped model is timed in float32 and, where
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
from faces import FaceAnalyzer, OnnxAgeGenderModel, annotate, native_bfloat16  # noqa: E402
from faces.analysis import checked_model_source  # noqa: E402
from faces.onnx_model import onnx_path  # noqa: E402
from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel  # noqa: E402


PHOTOS = (((640, 480), 1), ((640, 480), 5), ((1920, 1080), 1), ((1920, 1080), 5))


def load(path: str | None, preset: str, dtype: torch.dtype = torch.float32):
    if path:
        path = checked_model_source(path)
        return AutoModel.from_pretrained(path, dtype=dtype).eval(), AutoImageProcessor.from_pretrained(path)
    config = AgeGenderConfig.from_preset(preset)
    return AgeGenderModel(config).eval(), AgeGenderImageProcessor(image_size=config.image_size)


def gflops_per_face(model, image_size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def model_figures(name: str, model, processor, gflops: float | None = None) -> dict:
    """Faces/s at batch 1, 8 and 64 and one face through processor and model; `gflops` for a model that torch
    cannot count (an onnxruntime session)."""
    size = model.config.input_size
    gflops = gflops_per_face(model, size) if gflops is None else gflops
    figures = {"name": name, "parameters": sum(p.numel() for p in model.parameters()), "input": size, "gflops": gflops}
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
    torch_model, processor = load(args.model, "small")
    rows = [model_figures(f"{shipped}, torch float32", torch_model, processor)]
    runtimes = ["torch"]
    if native_bfloat16("cpu"):
        rows.append(model_figures(f"{shipped}, torch bfloat16", *load(args.model, "small", torch.bfloat16)))
    for runtime, precision in (("onnx", "float32"), ("onnx-int8", "int8")):
        if onnx_path(args.model, precision).is_file():
            onnx_model = OnnxAgeGenderModel(args.model, precision)
            rows.append(model_figures(f"{shipped}, onnxruntime {precision}", onnx_model, processor, rows[0]["gflops"]))
            runtimes.append(runtime)
        else:
            print(f"(no {onnx_path(args.model, precision)}: onnxruntime {precision} not timed; python -m training.export_onnx writes it)")
    seed = model_figures("seed replica, torch float32", *load(args.seed_model, "seed"))
    rows.append(seed)
    print("| model | parameters | input | GFLOPs/face | faces/s b1 | faces/s b8 | faces/s b64 | single face (processor + model) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['parameters']:,} | {r['input']}px | {r['gflops']:.3f} | {r['faces_per_s_b1']:.0f} | {r['faces_per_s_b8']:.0f} | {r['faces_per_s_b64']:.0f} | {p50_p95(r['single_face'])} |")
    for row in rows[:-1]:
        print(f"\n{row['name']} at batch 64: {row['faces_per_s_b64'] / seed['faces_per_s_b64']:.1f}x the seed replica's faces/s", end="")
    print()

    print("\nPhotos end to end (load, detect, align, predict, draw), p50 / p95:")
    print("| runtime | " + " | ".join(f"{w}x{h}, {n} face{'s' if n > 1 else ''}" for (w, h), n in PHOTOS) + " |")
    print("|---|" + "---|" * len(PHOTOS))
    for runtime in runtimes:
        analyzer = FaceAnalyzer(args.model, runtime=runtime)
        cells = []
        for size, faces in PHOTOS:
            photo = test_photo(size, faces)
            samples = timings_ms(lambda: annotate(*(lambda r: (r.image, r.faces))(analyzer.analyze(photo))), repeats=30)
            cells.append(p50_p95(samples))
        print(f"| {runtime} ({analyzer.model.dtype}) | " + " | ".join(cells) + " |")
    print(f"\nPeak memory of this process: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
