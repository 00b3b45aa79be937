"""Training throughput on this machine: the input side (cached pixels -> augmented, normalised batches) and
whole optimizer steps, in images/s, for a preset (default: the shipped "small").

    python benchmarks/training_throughput.py [--preset small] [--batch_size 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine, timings_ms  # noqa: E402
from faces import native_bfloat16  # noqa: E402
from modeling import PRESETS, AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel  # noqa: E402
from training.augment import augment_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = AgeGenderConfig.from_preset(args.preset)
    processor = AgeGenderImageProcessor(image_size=config.image_size)
    model = AgeGenderModel(config).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels = torch.randint(0, 256, (args.batch_size, config.image_size, config.image_size, 3), dtype=torch.uint8)
    age = torch.randint(1, 90, (args.batch_size,)).float()
    gender = torch.randint(0, 2, (args.batch_size,))

    def input_side():
        return processor.normalize_batch(augment_batch(pixels))

    def step(bf16: bool):
        # What `--mixed_precision bf16` makes Accelerate do: the forward pass under bfloat16 autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=input_side(), age=age, gender=gender).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    print(f"Machine: {machine()}; preset {args.preset}, {config.image_size}px, batch {args.batch_size}")
    input_ms = timings_ms(input_side, repeats=args.steps * 3)
    print(f"  input (augment + normalise): {args.batch_size / input_ms.mean() * 1000:,.0f} images/s")
    for bf16 in (False, True) if native_bfloat16("cpu") else (False,):
        step_ms = timings_ms(lambda bf16=bf16: step(bf16), repeats=args.steps, warmup=2)
        print(
            f"  training step (input, forward, backward, AdamW), {'bf16 mixed precision' if bf16 else 'float32'}: "
            f"{args.batch_size / step_ms.mean() * 1000:,.0f} images/s"
        )


if __name__ == "__main__":
    main()
