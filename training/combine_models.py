"""Put trained models together into one model that reads each face with all their networks and averages the logits.

    python -m training.combine_models runs/combined model runs/scratch_mix
    python training/eval_model.py --model runs/combined --data ../shared/datasets/UTKFace.tar.gz --calibrate

Two networks of different origin (one fine-tuned from an earlier model, one trained from scratch) misread
different faces: averaged, they read real faces better than one network reading each face and its mirror image,
at the same cost (docs/experiments.md). The result is one model folder (`ensemble_size` networks in one safetensors file,
one ONNX graph once exported) that loads and runs like any other. The networks must share their architecture but for their
widths, and their image processor's settings but for the framing: a network trained on faces framed wider (`train.py
--face_zoom`) keeps reading its framing, cut out of the combined model's input, which is framed at the widest.
The calibration (gender temperature, age interval) is the first model's until `eval_model.py --calibrate` makes
it again for the averaged logits, which are surer than either network's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel
from training.model_card import SOURCES

# Config fields that shape a network's weights or its input: the combined networks must agree on all of them
# (each keeps its own widths, `network_hidden_sizes`).
ARCHITECTURE_FIELDS = (
    "backbone", "num_channels", "image_size", "depths", "downsample_in_first_stage", "hidden_act", "head_hidden_size",
    "min_age", "max_age", "id2label",
)


def check_same_architecture(configs: list[AgeGenderConfig], names: list[str]) -> None:
    """Raise a ValueError naming the first field and the two models that differ in it."""
    for field in ARCHITECTURE_FIELDS:
        first = getattr(configs[0], field)
        for config, name in zip(configs[1:], names[1:]):
            if getattr(config, field) != first:
                raise ValueError(
                    f"{name} has {field} {getattr(config, field)!r} but {names[0]} has {first!r}: only networks of "
                    "one architecture can be combined"
                )


def combine_models(
    models: list[AgeGenderModel], names: list[str] | None = None, flip_average: bool = False, photo_networks: list[int] | None = None
) -> AgeGenderModel:
    """One model holding the networks of all `models` (an ensemble among them gives all of its networks), with
    the first model's config and calibration and `flip_average` and `photo_networks` as given."""
    if len(models) < 2:
        raise ValueError("give at least two models to combine")
    names = names or [f"model {i + 1}" for i in range(len(models))]
    check_same_architecture([model.config for model in models], names)
    sources = [network for model in models for network in model.networks()]
    zooms = [zoom for model in models for zoom in model.config.network_zooms]
    read_sizes = [size for model in models for size in model.config.network_read_sizes]
    stems, widths = zip(*(model.config.network_widths(index) for model in models for index in range(model.config.ensemble_size)))
    alike = len({(stem, tuple(width)) for stem, width in zip(stems, widths)}) == 1
    config = AgeGenderConfig.from_dict(
        {**models[0].config.to_dict(), "ensemble_size": len(sources), "flip_average": flip_average, "network_zooms": zooms,
         "network_read_sizes": read_sizes, "network_hidden_sizes": None if alike else list(widths),
         "network_embedding_sizes": None if alike else list(stems), "photo_networks": photo_networks}
    )
    combined = AgeGenderModel(config).eval()
    for target, source in zip(combined.networks(), sources):
        for part in ("backbone", "age_head", "gender_head"):
            getattr(target, part).load_state_dict(getattr(source, part).state_dict())
    return combined


FRAMING_FIELDS = ("image_size", "face_zoom")


def combined_processor(processors: list[AgeGenderImageProcessor], names: list[str], combined: AgeGenderModel) -> AgeGenderImageProcessor:
    """The combined model's image processor: the members' settings, which must agree but for the framing, at the
    combined model's input framing and size. Raise a ValueError naming a member whose faces are prepared otherwise."""
    def settings(processor: AgeGenderImageProcessor) -> dict:
        return {k: v for k, v in processor.to_dict().items() if k not in FRAMING_FIELDS}

    for name, processor in zip(names[1:], processors[1:]):
        if settings(processor) != settings(processors[0]):
            raise ValueError(f"{name} prepares faces differently from {names[0]} (its preprocessor_config.json); they cannot share one input")
    return AgeGenderImageProcessor(**{**settings(processors[0]), "image_size": combined.config.input_size, "face_zoom": combined.config.input_zoom})


def combined_metrics(folders: list[str], combined: AgeGenderModel, command: str) -> dict:
    """The combined model's metrics.json before `eval_model.py --calibrate` adds its figures: what its model card
    tells of its networks (each one's folder and training command) and of the data they saw together."""
    members = [json.loads(path.read_text()) if (path := Path(folder, "metrics.json")).is_file() else {} for folder in folders]
    sources = {source for member in members for source in member.get("train_sources", ["UTKFace"])}
    sizes = {member.get("train_size") for member in members}
    return {
        "parameters": sum(parameter.numel() for parameter in combined.parameters()),
        "image_size": combined.config.image_size,
        "train_size": sizes.pop() if len(sizes) == 1 else None,  # a single count only when they all saw the same faces
        "train_sources": [name for name in SOURCES if name in sources],
        "gender_teacher": any(member.get("gender_teacher") for member in members),
        "command": command,
        "networks": [{"model": folder, "command": member.get("command"), "best_epoch": member.get("best_epoch")} for folder, member in zip(folders, members)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="Where the combined model goes.")
    parser.add_argument("models", nargs="+", help="Two or more trained model folders of one architecture (e.g. model runs/scratch_mix).")
    parser.add_argument(
        "--flip_average", action="store_true",
        help="Each network also reads each face's mirror image (twice the cost again); off by default, the networks' "
        "own setting is not carried over.",
    )
    parser.add_argument(
        "--photo_networks", type=int, nargs="+", metavar="INDEX",
        help="The networks (from 0, in the order the models give them) that read faces framed from their photo, for "
        "networks of different framings; edge-filled faces stay with the tightest-framed ones. Default: every network.",
    )
    args = parser.parse_args(argv)
    for folder in args.models:
        if not Path(folder, "config.json").is_file():
            raise SystemExit(f"error: {folder} is not a model folder (no config.json); give folders a training run saved")
    processors = [AgeGenderImageProcessor.from_pretrained(folder) for folder in args.models]
    try:
        combined = combine_models([AgeGenderModel.from_pretrained(folder) for folder in args.models], args.models, args.flip_average, args.photo_networks)
        processor = combined_processor(processors, args.models, combined)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    combined.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    options = (["--flip_average"] if args.flip_average else []) + (["--photo_networks", *map(str, args.photo_networks)] if args.photo_networks else [])
    command = " ".join(["python -m training.combine_models", args.output_dir, *args.models, *options])
    metrics = combined_metrics(args.models, combined, command)
    Path(args.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"{combined.config.ensemble_size} networks in {args.output_dir} (flip_average {combined.config.flip_average}); "
        f"calibrate it with training/eval_model.py --model {args.output_dir} --calibrate"
    )


if __name__ == "__main__":
    main()
