"""Grow a trained model into a wider or deeper one, keeping what it has learnt, to start `--init_from` there.

    python -m training.grow_model model runs/init_deep --depths 2 2 3 2
    python -m training.grow_model model runs/init_wide --hidden_sizes 48 96 192 384 --embedding_size 48

Training a larger network from scratch takes hours on a CPU; grown from the shipped model it needs only the
short fine-tune that the real faces get anyway (`docs/experiments.md`). Widening keeps the model's answers
exactly: each new channel starts with its batch norm at zero, so it is silent until training gives it a use,
while its convolution and the next layer's weights for it start random so that it can learn. Deepening appends
blocks at the end of a stage with their residual branch at zero; a block still applies its activation after
the sum, so the answers move a little (measured: real-face gender 85.9% -> 84.7% before training).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from modeling import AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel


def block_positions(config: AgeGenderConfig) -> list[tuple[int, int]]:
    """(stage, block) of each backbone layer after the stem, in the order `ResNetBackbone` builds them."""
    return [(stage, block) for stage, depth in enumerate(config.depths) for block in range(depth)]


def grown_key(key: str, source: AgeGenderConfig, target: AgeGenderConfig) -> str:
    """The name a source weight takes in the grown model: backbone blocks keep their stage and position in it."""
    if not key.startswith("backbone."):
        return key
    _, index, rest = key.split(".", 2)
    if index == "0":  # the stem
        return key
    position = block_positions(source)[int(index) - 1]
    return f"backbone.{block_positions(target).index(position) + 1}.{rest}"


def first_block_has_identity_shortcut(config: AgeGenderConfig) -> bool:
    """Whether the first block passes the stem's output on unchanged (same width, no downsampling)."""
    return config.embedding_size == config.hidden_sizes[0] and not config.downsample_in_first_stage


def grow_model(source: AgeGenderModel, **overrides) -> AgeGenderModel:
    """A model of `source`'s config with `overrides` (`depths`, `hidden_sizes`, `embedding_size`), holding
    `source`'s weights in the leading channels of the matching layers, with new channels silent."""
    if source.config.backbone != "resnet":
        raise ValueError(f"only the resnet backbone can be grown, not {source.config.backbone!r}")
    old_depths, old_widths = list(source.config.depths), list(source.config.hidden_sizes)
    target_config = AgeGenderConfig.from_dict({**source.config.to_dict(), **overrides})
    if len(target_config.depths) != len(old_depths) or len(target_config.hidden_sizes) != len(old_widths):
        raise ValueError("a grown model keeps the number of stages; give as many --depths and --hidden_sizes as it has")
    if any(new < old for new, old in zip(target_config.depths, old_depths)) or any(
        new < old for new, old in zip(target_config.hidden_sizes, old_widths)
    ) or target_config.embedding_size < source.config.embedding_size:
        raise ValueError("a grown model can only add blocks and channels, never remove them")
    if first_block_has_identity_shortcut(source.config) and not first_block_has_identity_shortcut(target_config):
        raise ValueError(
            f"widen the stem with the first stage (embedding_size {target_config.hidden_sizes[0]}): the first block's "
            "shortcut would otherwise become a new, untrained projection and change the model's answers"
        )
    torch.manual_seed(0)
    grown = AgeGenderModel(target_config)
    state = grown.state_dict()
    for key, value in source.state_dict().items():
        target = state[grown_key(key, source.config, target_config)]
        if value.ndim == 0:
            target.copy_(value)
        else:
            target[tuple(slice(0, size) for size in value.shape)] = value
    grown.load_state_dict(state)
    silence_new_channels(source, grown)
    return grown


@torch.no_grad()
def silence_new_channels(source: AgeGenderModel, grown: AgeGenderModel) -> None:
    """Zero each widened batch norm's new channels, so they output nothing until trained."""
    old_norms = [module for module in source.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    old_width = {name: norm.num_features for name, norm in zip(grown_norm_names(source, grown), old_norms)}
    for name, norm in grown.named_modules():
        if isinstance(norm, torch.nn.BatchNorm2d) and name in old_width:
            norm.weight[old_width[name]:] = 0
            norm.bias[old_width[name]:] = 0


def grown_norm_names(source: AgeGenderModel, grown: AgeGenderModel) -> list[str]:
    """The names, in the grown model, of the source model's batch norms (in the source's order)."""
    return [
        grown_key(f"{name}.weight", source.config, grown.config).removesuffix(".weight")
        for name, module in source.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="A trained model folder (e.g. model).")
    parser.add_argument("output_dir", help="Where the grown model goes; pass it to train.py --init_from.")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="Blocks per stage (default: the source's).")
    parser.add_argument("--hidden_sizes", type=int, nargs="+", default=None, help="Channels per stage (default: the source's).")
    parser.add_argument("--embedding_size", type=int, default=None, help="Channels of the stem (default: the source's).")
    args = parser.parse_args(argv)
    overrides = {name: value for name in ("depths", "hidden_sizes", "embedding_size") if (value := getattr(args, name))}
    save_resized(args.source, args.output_dir, lambda source: grow_model(source, **overrides), "grown")


def save_resized(source: str, output_dir: str, resize: Callable[[AgeGenderModel], AgeGenderModel], done: str) -> None:
    """Resize the model in folder `source` and save it, with its image processor, where `train.py --init_from`
    can start from it; a folder that is not a model, or a size it cannot take, ends the command with a message."""
    if not Path(source, "config.json").is_file():
        raise SystemExit(f"error: {source} is not a model folder (no config.json); give a folder a training run saved")
    try:
        resized = resize(AgeGenderModel.from_pretrained(source))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    resized.save_pretrained(output_dir)
    AgeGenderImageProcessor.from_pretrained(source).save_pretrained(output_dir)
    parameters = sum(parameter.numel() for parameter in resized.parameters())
    print(f"{done} model ({parameters:,} parameters, depths {resized.config.depths}, widths {resized.config.hidden_sizes}) in {output_dir}")


if __name__ == "__main__":
    main()
