"""Narrow a trained model into a cheaper one, keeping the channels that carry most, to start `--init_from` there.

    python -m training.narrow_model runs/native8 runs/init_narrow --hidden_sizes 20 40 80 160 --embedding_size 20

The counterpart of `training.grow_model`. A network that reads the wider framing at full scale costs about twice
a 64 px reading (`benchmarks/inference.py`); the same network at 5/8 of its width costs about one reading, and
starts its fine-tune from what the wide one learnt instead of from scratch (hours on a CPU). Which channels stay
is chosen as network slimming does (Liu et al., 2017): by the magnitude of the batch-norm scale that writes each
channel. The channels of a stage's residual stream are shared by every block of the stage (and by the stem when
the first block passes its output on unchanged), so they are ranked together by the sum of their scales; the
channels inside a block are ranked by their own. Narrowing changes the model's answers, so a fine-tune follows.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from modeling import AgeGenderConfig, AgeGenderModel
from training.grow_model import block_positions, first_block_has_identity_shortcut, save_resized


def batch_norm_scale(unit: nn.Module) -> torch.Tensor:
    """|scale| of the batch norm in a `ConvBnAct` unit: how strongly it writes each of its output channels."""
    return unit[1].weight.detach().abs()


def strongest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order (so the kept channels keep their order)."""
    return scores.topk(keep).indices.sort().values


def kept_channels(source: AgeGenderModel, target: AgeGenderConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The source channels each layer keeps: the residual stream's for the stem and each block's output, and the
    inner ones for each block's first convolution."""
    stem, *blocks = list(source.backbone)[:-2]
    stage_of_block = [stage for stage, _ in block_positions(source.config)]
    stream_scores = [torch.zeros(width) for width in source.config.hidden_sizes]
    for block, stage in zip(blocks, stage_of_block):
        stream_scores[stage] += batch_norm_scale(block.conv2)
        if not isinstance(block.shortcut, nn.Identity):
            stream_scores[stage] += batch_norm_scale(block.shortcut)
    stem_tied = first_block_has_identity_shortcut(source.config)
    if stem_tied:
        stream_scores[0] += batch_norm_scale(stem)
    stream = [strongest(scores, width) for scores, width in zip(stream_scores, target.hidden_sizes)]
    stem_channels = stream[0] if stem_tied else strongest(batch_norm_scale(stem), target.embedding_size)
    outputs = [stem_channels] + [stream[stage] for stage in stage_of_block]
    inner = [strongest(batch_norm_scale(block.conv1), target.hidden_sizes[stage]) for block, stage in zip(blocks, stage_of_block)]
    return outputs, inner


@torch.no_grad()
def copy_unit(source: nn.Module, target: nn.Module, outputs: torch.Tensor, inputs: torch.Tensor | None) -> None:
    """Copy a `ConvBnAct` unit's kept output channels (and, for its convolution, kept input channels)."""
    weight = source[0].weight[outputs]
    target[0].weight.copy_(weight if inputs is None else weight[:, inputs])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target[1], name).copy_(getattr(source[1], name)[outputs])
    target[1].num_batches_tracked.copy_(source[1].num_batches_tracked)


@torch.no_grad()
def narrow_model(source: AgeGenderModel, hidden_sizes: list[int], embedding_size: int) -> AgeGenderModel:
    """A model of `source`'s config with fewer channels per stage (and in the stem), holding the source's
    strongest channels."""
    if source.config.backbone != "resnet" or source.config.ensemble_size != 1:
        raise ValueError("only a single resnet network can be narrowed; narrow each network before combining them")
    if source.config.head_hidden_size:
        raise ValueError(f"heads with a hidden layer (head_hidden_size {source.config.head_hidden_size}) cannot be narrowed")
    target_config = AgeGenderConfig.from_dict({**source.config.to_dict(), "hidden_sizes": hidden_sizes, "embedding_size": embedding_size})
    if any(new > old for new, old in zip(hidden_sizes, source.config.hidden_sizes)) or embedding_size > source.config.embedding_size:
        raise ValueError("a narrowed model can only remove channels; grow it with training.grow_model instead")
    if first_block_has_identity_shortcut(source.config) != first_block_has_identity_shortcut(target_config):
        raise ValueError(
            f"narrow the stem with the first stage (embedding_size {hidden_sizes[0]}): the first block passes the "
            "stem's output on unchanged"
        )
    narrowed = AgeGenderModel(target_config)
    outputs, inner = kept_channels(source, target_config)
    source_units, target_units = list(source.backbone)[:-2], list(narrowed.backbone)[:-2]
    copy_unit(source_units[0], target_units[0], outputs[0], None)
    for index, (block, narrow) in enumerate(zip(source_units[1:], target_units[1:])):
        block_inputs, block_outputs = outputs[index], outputs[index + 1]
        copy_unit(block.conv1, narrow.conv1, inner[index], block_inputs)
        copy_unit(block.conv2, narrow.conv2, block_outputs, inner[index])
        if not isinstance(block.shortcut, nn.Identity):
            copy_unit(block.shortcut, narrow.shortcut, block_outputs, block_inputs)
    for head, narrow_head in ((source.age_head, narrowed.age_head), (source.gender_head, narrowed.gender_head)):
        narrow_head[-1].weight.copy_(head[-1].weight[:, outputs[-1]])
        narrow_head[-1].bias.copy_(head[-1].bias)
    return narrowed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="A trained single-network model folder (e.g. runs/native8).")
    parser.add_argument("output_dir", help="Where the narrowed model goes; pass it to train.py --init_from.")
    parser.add_argument("--hidden_sizes", type=int, nargs="+", required=True, help="Channels per stage, each at most the source's.")
    parser.add_argument("--embedding_size", type=int, required=True, help="Channels of the stem, at most the source's.")
    args = parser.parse_args(argv)
    save_resized(args.source, args.output_dir, lambda source: narrow_model(source, args.hidden_sizes, args.embedding_size), "narrowed")


if __name__ == "__main__":
    main()
