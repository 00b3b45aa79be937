"""The age and gender CNN as a transformers model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_age_gender import AgeGenderConfig


@dataclass
class AgeGenderOutput(ModelOutput):
    """
    Output of [`AgeGenderModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `age` and `gender` are given):
            DLDL-v2 age loss (KL divergence to a Gaussian label distribution plus L1 on the expected age) plus
            the weighted gender cross-entropy.
        age (`torch.FloatTensor` of shape `(batch_size,)`):
            Expected age in years under the predicted distribution.
        age_std (`torch.FloatTensor` of shape `(batch_size,)`):
            Standard deviation in years of the predicted age distribution: the model's own uncertainty.
        age_logits (`torch.FloatTensor` of shape `(batch_size, config.num_ages)`):
            Logits over whole years `config.min_age` to `config.max_age`; softmax gives the distribution.
        gender_logits (`torch.FloatTensor` of shape `(batch_size, 2)`):
            Logits of the classes in `config.id2label` (0 male, 1 female).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, ensemble_size * hidden_sizes[-1])`):
            The pooled backbone features that the heads read (each network's side by side): a face embedding, and
            what training's auxiliary targets (`training/descriptors.py`) are predicted from. With networks of
            different widths (`network_hidden_sizes`) its width is the sum of their last stages'.
    """

    loss: torch.FloatTensor | None = None
    age: torch.FloatTensor | None = None
    age_std: torch.FloatTensor | None = None
    age_logits: torch.FloatTensor | None = None
    gender_logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


class ConvBnAct(nn.Sequential):
    """Convolution, batch norm and (optionally) activation: the unit every residual block is made of."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3, act: str | None = "silu"):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            ACT2FN[act] if act else nn.Identity(),
        )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): two 3x3 convolutions and a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, act: str):
        super().__init__()
        self.conv1 = ConvBnAct(in_channels, out_channels, stride, act=act)
        self.conv2 = ConvBnAct(out_channels, out_channels, act=None)
        self.conv2[1].closes_residual_branch = True  # zero-initialised: see `AgeGenderPreTrainedModel._init_weights`
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = ConvBnAct(in_channels, out_channels, stride, kernel_size=1, act=None) if needs_projection else nn.Identity()
        self.act = ACT2FN[act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(hidden)) + self.shortcut(hidden))


class ResNetBackbone(nn.Sequential):
    """A small ResNet: at 64 px the stem brings faces to 32 px, and four stages to 4 px, then average pooling
    (at 96 px with `downsample_in_first_stage`: 48, then 24 to 3 px)."""

    def __init__(self, config: AgeGenderConfig, index: int = 0):
        embedding_size, hidden_sizes = config.network_widths(index)
        layers: list[nn.Module] = [ConvBnAct(config.num_channels, embedding_size, stride=2, act=config.hidden_act)]
        in_channels = embedding_size
        for stage, (width, depth) in enumerate(zip(hidden_sizes, config.depths)):
            for block in range(depth):
                stride = 2 if block == 0 and (stage > 0 or config.downsample_in_first_stage) else 1
                layers.append(BasicBlock(in_channels, width, stride, config.hidden_act))
                in_channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)
        self.out_features = in_channels


class PlainBackbone(nn.Sequential):
    """The seed notebook's network: unpadded 3x3 convolutions, each followed by 2x2 max-pooling, then flatten."""

    def __init__(self, config: AgeGenderConfig, index: int = 0):
        layers: list[nn.Module] = []
        in_channels, side = config.num_channels, config.image_size
        for width in config.network_widths(index)[1]:
            layers += [nn.Conv2d(in_channels, width, 3), ACT2FN[config.hidden_act], nn.MaxPool2d(2)]
            in_channels, side = width, (side - 2) // 2
        if side < 1:
            raise ValueError(f"image_size {config.image_size} is too small for {len(config.hidden_sizes)} plain stages")
        layers.append(nn.Flatten())
        super().__init__(*layers)
        self.out_features = in_channels * side * side


class PredictionHead(nn.Sequential):
    """An optional hidden dense layer, dropout, then the output layer."""

    def __init__(self, in_features: int, out_features: int, config: AgeGenderConfig):
        layers: list[nn.Module] = []
        if config.head_hidden_size:
            layers += [nn.Linear(in_features, config.head_hidden_size), ACT2FN[config.hidden_act]]
            in_features = config.head_hidden_size
        layers += [nn.Dropout(config.head_dropout), nn.Linear(in_features, out_features)]
        super().__init__(*layers)


def network_parts(config: AgeGenderConfig, index: int = 0) -> tuple[nn.Module, PredictionHead, PredictionHead]:
    """A backbone of `config` with its age and gender heads: network `index` of the model (0: its own)."""
    backbone = (ResNetBackbone if config.backbone == "resnet" else PlainBackbone)(config, index)
    return backbone, PredictionHead(backbone.out_features, config.num_ages, config), PredictionHead(backbone.out_features, 2, config)


class AgeGenderNetwork(nn.Module):
    """One more network of an ensemble (`config.ensemble_size`), beside the one the model holds itself."""

    def __init__(self, config: AgeGenderConfig, index: int):
        super().__init__()
        self.backbone, self.age_head, self.gender_head = network_parts(config, index)


def read_faces(network: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features, age logits and gender logits of one network (anything holding a backbone and the two
    heads: the model itself or an `AgeGenderNetwork`)."""
    features = network.backbone(pixel_values)
    return features, network.age_head(features).float(), network.gender_head(features).float()


def framed_view(pixel_values: torch.Tensor, share: float, size: int) -> torch.Tensor:
    """The centred `share` of each image's side, at `size` pixels (channels last, as the backbone runs fastest):
    what a network that reads a tighter framing than the model's input sees of it. At UTKFace's framing the cut
    is `size` pixels already and nothing is resampled."""
    side = pixel_values.shape[-1]
    cut = round(side * share)
    start = (side - cut) // 2
    view = pixel_values[..., start : start + cut, start : start + cut]
    if cut != size:
        # in float32: antialiased resizing has no bfloat16 kernel on the CPU
        view = F.interpolate(view.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).to(view.dtype)
    return view.contiguous(memory_format=torch.channels_last)


def gaussian_label_distribution(age: torch.Tensor, ages: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each true age as a normalised Gaussian over the age bins: neighbouring ages look alike (DLDL)."""
    weights = torch.exp(-0.5 * ((ages[None, :] - age[:, None]) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def age_bins(min_age: int, num_ages: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The age of each bin in years. Made on the fly, not kept as a buffer: transformers builds models on the
    meta device when loading, which would leave a non-persistent buffer uninitialised."""
    return torch.arange(min_age, min_age + num_ages, device=device, dtype=dtype)


def age_statistics(age_probs: torch.Tensor, min_age: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation in years of distributions over whole years starting at `min_age`."""
    bins = age_bins(min_age, age_probs.shape[-1], age_probs.device, age_probs.dtype)
    mean = age_probs @ bins
    variance = age_probs @ bins.square() - mean.square()
    return mean, variance.clamp_min(1e-6).sqrt()


def interval_scale(age: torch.Tensor, config: AgeGenderConfig) -> torch.Tensor | float:
    """The age interval's half-width in units of the predicted spread, for each face: the one scale, or that of
    the band of `config.age_interval_bands` its predicted age falls in."""
    if not isinstance(config.age_interval_scale, (list, tuple)):
        return config.age_interval_scale
    edges = torch.tensor(config.age_interval_bands, dtype=age.dtype, device=age.device)
    scales = torch.tensor(config.age_interval_scale, dtype=age.dtype, device=age.device)
    return scales[torch.bucketize(age, edges, right=True)]


def age_interval_bounds(age: torch.Tensor, age_std: torch.Tensor, config: AgeGenderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-year bounds of the interval meant to hold `config.age_interval_coverage` of true ages, its
    half-width calibrated on validation data in units of the predicted spread."""
    half_width = interval_scale(age, config) * age_std
    low = (age - half_width).floor().clamp(config.min_age, config.max_age)
    high = (age + half_width).ceil().clamp(config.min_age, config.max_age)
    return low.long(), high.long()


def summarize_predictions(age_probs: torch.Tensor, gender_probs: torch.Tensor, config: AgeGenderConfig) -> dict[str, torch.Tensor]:
    """From age and gender distributions `(batch, num_ages)` and `(batch, num_labels)` to what is reported:
    expected age and its spread, the calibrated interval, the gender id and its probability. Everything that
    turns the model's distributions into answers (the pipeline, photo analysis, webcam smoothing, evaluation)
    goes through here."""
    age, age_std = age_statistics(age_probs.float(), config.min_age)
    low, high = age_interval_bounds(age, age_std, config)
    gender_score, gender_id = gender_probs.float().max(dim=-1)
    return {"age": age, "age_std": age_std, "age_low": low, "age_high": high, "gender_id": gender_id, "gender_score": gender_score}


def gender_probabilities(gender_logits: torch.Tensor, config: AgeGenderConfig) -> torch.Tensor:
    """The gender distribution, the logits divided by `config.gender_temperature` (calibrated on real photos):
    what every reported gender confidence is. Configs saved before the field existed read as 1."""
    return (gender_logits.float() / getattr(config, "gender_temperature", 1.0)).softmax(-1)


def prediction_records(age_probs: torch.Tensor, gender_probs: torch.Tensor, config: AgeGenderConfig, return_distributions: bool = False) -> list[dict]:
    """One record per face: `{"age": 31.4, "age_interval": [27, 36], "age_std": 3.9, "gender": "female",
    "gender_score": 0.97}`, gender names from `config.id2label`; with `return_distributions`, also
    `age_distribution` (over whole years from `config.min_age`) and `gender_probs` (in label id order)."""
    summary = {key: value.tolist() for key, value in summarize_predictions(age_probs, gender_probs, config).items()}
    records = []
    for i, gender_id in enumerate(summary["gender_id"]):
        record = {
            "age": round(summary["age"][i], 1),
            "age_interval": [summary["age_low"][i], summary["age_high"][i]],
            "age_std": round(summary["age_std"][i], 2),
            "gender": config.id2label[gender_id],
            "gender_score": round(summary["gender_score"][i], 4),
        }
        if return_distributions:
            record["age_distribution"] = [round(p, 5) for p in age_probs[i].float().tolist()]
            record["gender_probs"] = [round(p, 4) for p in gender_probs[i].float().tolist()]
        records.append(record)
    return records


class AgeGenderPreTrainedModel(PreTrainedModel):
    config_class = AgeGenderConfig
    base_model_prefix = "age_gender"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            # The last norm of each residual branch starts at zero, so every block starts as its shortcut (Goyal
            # et al., 2017): deep nets from scratch train faster and more stably. It is decided here, on the norm
            # itself, because transformers initialises children before their parents and each weight only once.
            if getattr(module, "closes_residual_branch", False):
                nn.init.zeros_(module.weight)
            else:
                nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            # A norm missing from a checkpoint is made on the meta device, its statistics left as whatever memory
            # held (a variance of 0 gave NaN answers in evaluation): they start as batch norm's own defaults.
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
            nn.init.zeros_(module.num_batches_tracked)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Weights come only from safetensors: a pickle file in a model folder is never unpickled. A damaged
        weights file is named in the error, which safetensors itself does not do."""
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(*args, **kwargs)
        except SafetensorError as error:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(f"the weights file model.safetensors of {source} is corrupt or truncated ({error})") from error


class AgeGenderModel(AgeGenderPreTrainedModel):
    """A CNN with an age head (distribution over whole years) and a gender head, for aligned face crops.

    transformers names a model with task heads `XModelForTask` beside a headless `XModel`. Here there is no
    headless model worth publishing (the backbone is small and trained only for these two heads) and no single
    task name covers an age regression with a gender classification, so the one class keeps the plain name;
    `AutoModel` loads it."""

    def __init__(self, config: AgeGenderConfig):
        super().__init__(config)
        self.backbone, self.age_head, self.gender_head = network_parts(config)
        # An ensemble's other networks. The first keeps the top-level names, so single-network checkpoints load
        # as they are and a combined model's first network is the model it was made from, weight for weight.
        self.other_networks = nn.ModuleList(AgeGenderNetwork(config, index) for index in range(1, config.ensemble_size))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        age: torch.Tensor | None = None,
        gender: torch.Tensor | None = None,
        age_range: torch.Tensor | None = None,
        framing_filled: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AgeGenderOutput | tuple:
        """
        Args:
            pixel_values: `(batch, channels, input_size, input_size)` as the image processor makes them
                (`input_size` is `image_size` unless a network reads a wider framing: `config.network_zooms`).
            age: true ages in years, for the loss; a negative age marks a face whose age is unknown.
            gender: true gender ids (0 male, 1 female), for the loss; a negative id (-1, or transformers'
                ignore index -100) marks a face whose gender is unknown.
            age_range: `(batch, 2)` lowest and highest age in years that a face's label allows (a perceived age
                group), for the loss; a negative or NaN bound marks a face without one.
            framing_filled: `(batch,)` booleans, True for a face whose input framing reaches well beyond its photo
                (`faces.alignment.framing_filled`: a crop widened with its edge repeated, a face at a photo's
                border). In a model whose networks read different framings, such a face is read by the networks
                at the tightest framing beside its mirror image instead of by the wider ones, which would see a
                repeated edge where they learnt to read hair and shoulders; at about the same cost. The other faces
                are read by `config.photo_networks`. None: no face is filled. Ignored in training and by models
                whose networks all read one framing.

        The loss is returned when any label is given. Each face contributes the terms its labels allow, each term
        summed over those faces and divided by the batch size, so that a face without a label adds nothing to
        that label's gradient and a batch of fully labelled faces gives the plain mean.
        """
        pixel_values = pixel_values.to(dtype=self.dtype)
        if self.training or not self.config.reads_framings_apart:
            everything = range(self.config.ensemble_size)
            features, age_logits, gender_logits = self.read(self.views(pixel_values, everything), everything, self.config.flip_average and not self.training)
        else:
            if framing_filled is None:
                framing_filled = torch.zeros(pixel_values.shape[0], dtype=torch.bool)
            features, age_logits, gender_logits = self.read_framings_apart(pixel_values, framing_filled.to(device=pixel_values.device, dtype=torch.bool))
        expected_age, age_std = age_statistics(age_logits.softmax(dim=-1), self.config.min_age)

        loss = None
        if age is not None or gender is not None or age_range is not None:
            loss = age_logits.new_zeros(())
            if age is not None:
                loss = loss + self.age_loss(age_logits, expected_age, age)
            if gender is not None:
                loss = loss + self.config.gender_loss_weight * self.gender_loss(gender_logits, gender)
            if age_range is not None:
                loss = loss + self.config.age_range_loss_weight * self.age_range_loss(age_logits, age_range)
        output = AgeGenderOutput(
            loss=loss, age=expected_age, age_std=age_std, age_logits=age_logits, gender_logits=gender_logits,
            pooler_output=features,
        )
        return output if return_dict is not False else output.to_tuple()

    def readings(self, indices: list[int] | range) -> set[tuple[float, int]]:
        """The framings (zoom, read size) that the networks at `indices` read."""
        return {(self.config.network_zooms[index], self.config.network_read_sizes[index]) for index in indices}

    def views(self, pixel_values: torch.Tensor, indices: list[int] | range) -> dict[tuple[float, int], torch.Tensor]:
        """Each framing that the networks at `indices` read, cut out of the model's input (`framed_view`)."""
        return {(zoom, size): framed_view(pixel_values, zoom / self.config.input_zoom, size) for zoom, size in self.readings(indices)}

    def read(
        self, views: dict[tuple[float, int], torch.Tensor], indices: list[int] | range, mirrored: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled features (side by side) and logits (averaged) of the networks at `indices`, each reading its own
        framing among `views`, and with `mirrored` its mirror image too (averaged)."""
        if mirrored:
            views = {reading: torch.cat([view, view.flip(-1)]) for reading, view in views.items()}
        if torch.compiler.is_exporting():  # a subset's size is known only at run time: the exporter traces it as
            for view in views.values():  # non-empty, and onnxruntime reads empty ones too (tests/test_combine_models.py)
                torch._check(view.shape[0] != 0)
        networks, config = self.networks(), self.config
        readings = [(networks[i], views[config.network_zooms[i], config.network_read_sizes[i]]) for i in indices]
        features, age_logits, gender_logits = zip(*(read_faces(network, view) for network, view in readings))
        features = torch.cat(features, dim=-1)
        age_logits, gender_logits = torch.stack(age_logits).mean(0), torch.stack(gender_logits).mean(0)
        if mirrored:
            faces = features.shape[0] // 2
            features, age_logits, gender_logits = ((t[:faces] + t[faces:]) / 2 for t in (features, age_logits, gender_logits))
        return features, age_logits, gender_logits

    def read_framings_apart(self, pixel_values: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`read` for a model whose networks read different framings: the faces framed from their photo by
        `config.photo_networks`, the filled ones by the tightest-framed networks beside their mirror image. Each
        face is read only by the networks its answer comes from; in `pooler_output` the places of the networks
        that did not read a face hold zeros."""
        config, faces = self.config, pixel_values.shape[0]
        views = self.views(pixel_values, range(config.ensemble_size))
        widths = [network.backbone.out_features for network in self.networks()]
        groups = ((~filled, config.photo_network_indices, config.flip_average), (filled, config.tightest_networks, True))
        readings = [(rows, indices, self.read({k: views[k][rows] for k in self.readings(indices)}, indices, mirrored)) for rows, indices, mirrored in groups]
        features, age_logits, gender_logits = readings[0][2]
        all_features = features.new_zeros(faces, sum(widths))
        all_age, all_gender = age_logits.new_zeros(faces, config.num_ages), gender_logits.new_zeros(faces, 2)
        for rows, indices, (features, age_logits, gender_logits) in readings:
            columns = torch.cat([torch.full((width,), index in indices, dtype=torch.bool) for index, width in enumerate(widths)])
            read_rows = all_features[rows]
            read_rows[:, columns.to(read_rows.device)] = features
            all_features[rows], all_age[rows], all_gender[rows] = read_rows, age_logits, gender_logits
        return all_features, all_age, all_gender

    def networks(self) -> list[nn.Module]:
        """Every network the model reads faces with (`config.ensemble_size`): the model's own backbone and heads,
        then the others."""
        return [self, *self.other_networks]

    def gender_probabilities(self, gender_logits: torch.Tensor) -> torch.Tensor:
        """See `gender_probabilities`."""
        return gender_probabilities(gender_logits, self.config)

    def post_process_age_gender(self, outputs: AgeGenderOutput, return_distributions: bool = False) -> list[dict]:
        """One record per image of a forward pass, in the manner of transformers' `post_process_*` methods
        (see `prediction_records`). It lives on the model rather than the image processor because the answers
        depend on the model's config: its age range, calibrated interval and gender labels."""
        return prediction_records(outputs.age_logits.softmax(-1), self.gender_probabilities(outputs.gender_logits), self.config, return_distributions)

    def age_loss(self, age_logits: torch.Tensor, expected_age: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """DLDL-v2 (Gao et al., "Age Estimation Using Expectation of Label Distribution Learning", IJCAI 2018):
        KL divergence from a Gaussian label distribution, plus an L1 term on the expected age, so that the
        distribution is learnt and its mean is pulled to the true age. Faces with a negative age are skipped."""
        known = age >= 0
        age = age.float().clamp(self.config.min_age, self.config.max_age)
        bins = age_bins(self.config.min_age, self.config.num_ages, age.device)
        target = gaussian_label_distribution(age, bins, self.config.age_label_sigma)
        kl = F.kl_div(age_logits.log_softmax(dim=-1), target, reduction="none").sum(-1)
        per_face = kl + self.config.age_l1_weight * (expected_age - age).abs()
        return torch.where(known, per_face, 0.0).sum() / len(age)

    def gender_loss(self, gender_logits: torch.Tensor, gender: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing and the config's class weights, over the faces whose gender is
        known (a non-negative id). Weighted faces count as that many faces, so the term keeps its scale."""
        known = gender >= 0
        targets = torch.where(known, gender.long(), 0)
        per_face = F.cross_entropy(gender_logits, targets, reduction="none", label_smoothing=self.config.gender_label_smoothing)
        if self.config.gender_class_weights is not None:
            per_face = per_face * torch.tensor(self.config.gender_class_weights, device=per_face.device)[targets]
        return torch.where(known, per_face, 0.0).sum() / len(gender)

    def age_range_loss(self, age_logits: torch.Tensor, age_range: torch.Tensor) -> torch.Tensor:
        """Minus the log of the probability the predicted age distribution puts inside each face's allowed range
        of years: zero once all the mass lies in the range, whatever its shape there. Faces without a range (a
        negative or NaN bound) are skipped."""
        low, high = age_range.float().unbind(-1)
        known = (low >= 0) & (high >= low)  # NaN compares false
        bins = age_bins(self.config.min_age, self.config.num_ages, age_logits.device)
        inside = (bins[None, :] >= low[:, None]) & (bins[None, :] <= high[:, None])
        log_probs = age_logits.log_softmax(dim=-1)
        log_mass = torch.logsumexp(log_probs.masked_fill(~inside, -torch.inf), dim=-1)
        return -torch.where(known, log_mass, 0.0).sum() / len(age_range)
