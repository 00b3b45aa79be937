"""Configuration of the age and gender CNN."""

from __future__ import annotations

from transformers import PretrainedConfig

# Named architectures. "small" is the default: it trains well from scratch on 2 CPU cores in about an
# hour. "base" is wider, deeper and sees more pixels, for GPU runs. "seed" reproduces the network of the
# project's seed notebook (a plain Keras CNN) so that every comparison with it is measured.
PRESETS: dict[str, dict] = {
    "small": {
        "backbone": "resnet",
        "image_size": 64,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 2, 2, 2],
        "head_hidden_size": 0,
        "head_dropout": 0.1,
    },
    "base": {
        "backbone": "resnet",
        "image_size": 96,
        "embedding_size": 48,
        "hidden_sizes": [48, 96, 192, 384],
        "depths": [2, 2, 3, 2],
        "head_hidden_size": 0,
        "head_dropout": 0.2,
    },
    "seed": {
        "backbone": "plain",
        "image_size": 128,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "hidden_act": "relu",
        "head_hidden_size": 256,
        "head_dropout": 0.3,
    },
}


class AgeGenderConfig(PretrainedConfig):
    r"""
    Configuration of [`AgeGenderModel`]: a convolutional backbone with an age head (a distribution over whole
    years) and a gender head (two logits).

    Args:
        backbone (`str`, *optional*, defaults to `"resnet"`):
            `"resnet"`: a stem convolution with stride 2, then residual stages of basic blocks with batch norm,
            the first stage at stride 1 and each later one halving the resolution, then global average pooling.
            `"plain"`: the seed notebook's network, unpadded 3x3 convolutions each followed by 2x2 max-pooling,
            then flattening.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input images (RGB).
        image_size (`int`, *optional*, defaults to 64):
            Side of the square input in pixels. The image processor resizes faces to it.
        embedding_size (`int`, *optional*, defaults to 32):
            Channels of the stem convolution (`"resnet"` only).
        hidden_sizes (`list[int]`, *optional*, defaults to `[32, 64, 128, 256]`):
            Channels of each stage.
        depths (`list[int]`, *optional*, defaults to `[1, 2, 2, 2]`):
            Residual blocks in each stage (`"resnet"` only; `"plain"` has one convolution per stage).
        downsample_in_first_stage (`bool`, *optional*, defaults to `False`):
            Whether the first stage halves the resolution too (`"resnet"` only), as in transformers' `ResNetConfig`:
            a 96 px input then reaches the stages at 24 px and costs what a 64 px input costs without it.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the backbone and of the heads' hidden layers.
        head_hidden_size (`int`, *optional*, defaults to 0):
            Width of a hidden dense layer in each head; 0 puts the output layers straight on the pooled features.
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before each head's output layer.
        min_age (`int`, *optional*, defaults to 0):
            Youngest age the age head can predict (one bin per whole year).
        max_age (`int`, *optional*, defaults to 116):
            Oldest age the age head can predict (UTKFace goes up to 116).
        age_label_sigma (`float`, *optional*, defaults to 2.0):
            Standard deviation in years of the Gaussian label distribution that stands for each true age in the
            loss (DLDL-v2).
        age_l1_weight (`float`, *optional*, defaults to 1.0):
            Weight of the L1 term on the expected age, next to the KL term on the distribution (DLDL-v2).
        gender_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the gender cross-entropy in the total loss.
        gender_label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the gender cross-entropy; UTKFace labels hold some errors.
        age_interval_coverage (`float`, *optional*, defaults to 0.8):
            Share of true ages that the reported age interval is meant to hold.
        age_interval_scale (`float` or `list[float]`, *optional*, defaults to 1.2816):
            Half-width of the age interval in units of the predicted standard deviation: one scale for every
            face, or one per band of predicted age (`age_interval_bands`). Training calibrates one per band on
            the validation split so that the interval holds `age_interval_coverage` of true ages in each band:
            one scale for all held 97% for faces predicted under 10 and 70-74% for those predicted over 30,
            whose spread the model underrates. The default is the Gaussian value for 80%.
        age_interval_bands (`list[int]`, *optional*, defaults to `[10, 30, 50]`):
            Predicted ages at which the interval's scale changes when `age_interval_scale` is a list (which then
            holds one scale more than this holds ages).
        gender_class_weights (`list[float]`, *optional*):
            Weight of each gender class (in `id2label` order) in the gender cross-entropy, for training data that
            holds more of one class (WIDER FACE's real faces are two thirds male); None weighs both alike.
        age_range_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the loss that puts the age distribution's mass inside a known age range, for faces whose
            label is an age group (a range of years) rather than an age.
        gender_temperature (`float`, *optional*, defaults to 1.0):
            The gender logits are divided by it before the softmax in `post_process_age_gender`: calibrated on
            real-photo validation faces, so that a confidence of 90% is right about 90% of the time there.
        flip_average (`bool`, *optional*, defaults to `False`):
            Outside training, read each face and its mirror image and average their logits (test-time
            augmentation). It doubles the network's cost per face, which is small beside the face detector's per
            photo, and measured on validation it lowered UTKFace's age error and raised real-face gender
            accuracy (docs/experiments.md). Calibrations (`age_interval_scale`, `gender_temperature`) hold for
            the setting they were made with.
        ensemble_size (`int`, *optional*, defaults to 1):
            Networks in the model, each a backbone of this config with both heads, read side by side with their
            logits averaged. Networks of different origin (one fine-tuned, one trained from scratch) misread
            different faces: on validation two of them read faces better than one network with `flip_average`,
            at the same cost (docs/experiments.md). `training/combine_models.py` puts trained models together.
        network_zooms (`list[float]`, *optional*):
            The framing each network reads (one per network): 1.0 is UTKFace's, 1.3125 a face 1.3125 times wider
            about its centre, with hair, ears and neck in view, where a person reads what the tight chip cuts off.
            The model's input is framed at the widest of them, at `input_size`; each network reads its own framing
            out of it (the centre, at its `network_read_sizes`). None: every network reads UTKFace's framing.
        network_read_sizes (`list[int]`, *optional*):
            Side in pixels at which each network reads its framing (one per network). None: `image_size` each, a
            wider framing shrunk to it, so that the face fills fewer pixels than in UTKFace's. `round(image_size *
            zoom)` reads a wider framing at the tight chip's scale instead (`train.py --native_framing`): the face
            keeps every pixel and the network costs about `zoom` squared as much.
        network_hidden_sizes (`list[list[int]]`, *optional*):
            Channels per stage of each network (one list per network, the first `hidden_sizes`), for an ensemble
            whose networks differ in width: a network that reads a wider framing at full scale costs about twice
            a tight one, and narrowed (`training/narrow_model.py`) it costs about as much. None: every network
            has `hidden_sizes`.
        network_embedding_sizes (`list[int]`, *optional*):
            Channels of each network's stem (one per network, the first `embedding_size`), given with
            `network_hidden_sizes`. None: every network has `embedding_size`.
        photo_networks (`list[int]`, *optional*):
            Outside training, in a model whose networks read different framings: the networks (indices, from 0)
            that read a face framed from its photo, the faces that are not `framing_filled`. None: every network.
            A network that reads a wider framing at full scale can read photo faces better alone than averaged
            with a tight network that errs on the same faces, while the tight one still reads the edge-filled crops
            (UTKFace's) it was chosen on (docs/experiments.md).
    """

    model_type = "age_gender_cnn"

    def __init__(
        self,
        backbone: str = "resnet",
        num_channels: int = 3,
        image_size: int = 64,
        embedding_size: int = 32,
        hidden_sizes: list[int] | None = None,
        depths: list[int] | None = None,
        downsample_in_first_stage: bool = False,
        hidden_act: str = "silu",
        head_hidden_size: int = 0,
        head_dropout: float = 0.1,
        min_age: int = 0,
        max_age: int = 116,
        age_label_sigma: float = 2.0,
        age_l1_weight: float = 1.0,
        gender_loss_weight: float = 1.0,
        gender_label_smoothing: float = 0.0,
        age_interval_coverage: float = 0.8,
        age_interval_scale: float | list[float] = 1.2816,
        age_interval_bands: list[int] | None = None,
        gender_class_weights: list[float] | None = None,
        age_range_loss_weight: float = 1.0,
        gender_temperature: float = 1.0,
        flip_average: bool = False,
        ensemble_size: int = 1,
        network_zooms: list[float] | None = None,
        network_read_sizes: list[int] | None = None,
        network_hidden_sizes: list[list[int]] | None = None,
        network_embedding_sizes: list[int] | None = None,
        photo_networks: list[int] | None = None,
        **kwargs,
    ):
        if backbone not in ("resnet", "plain"):
            raise ValueError(f"backbone must be 'resnet' or 'plain', not {backbone!r}")
        hidden_sizes = list(hidden_sizes or [32, 64, 128, 256])
        depths = list(depths or [1, 2, 2, 2])
        if len(hidden_sizes) != len(depths):
            raise ValueError(f"hidden_sizes {hidden_sizes} and depths {depths} must have the same length")
        if not 0 <= min_age < max_age:
            raise ValueError(f"need 0 <= min_age < max_age, got {min_age} and {max_age}")
        self.backbone = backbone
        self.num_channels = num_channels
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.hidden_sizes = hidden_sizes
        self.depths = depths
        self.downsample_in_first_stage = downsample_in_first_stage
        self.hidden_act = hidden_act
        self.head_hidden_size = head_hidden_size
        self.head_dropout = head_dropout
        self.min_age = min_age
        self.max_age = max_age
        self.age_label_sigma = age_label_sigma
        self.age_l1_weight = age_l1_weight
        self.gender_loss_weight = gender_loss_weight
        self.gender_label_smoothing = gender_label_smoothing
        self.age_interval_coverage = age_interval_coverage
        self.age_interval_bands = list(age_interval_bands or [10, 30, 50])
        if isinstance(age_interval_scale, (list, tuple)) and len(age_interval_scale) != len(self.age_interval_bands) + 1:
            raise ValueError(
                f"age_interval_scale needs one scale per band of age_interval_bands {self.age_interval_bands}: "
                f"{len(self.age_interval_bands) + 1}, got {len(age_interval_scale)}"
            )
        self.age_interval_scale = age_interval_scale
        if gender_class_weights is not None and (len(gender_class_weights) != 2 or min(gender_class_weights) <= 0):
            raise ValueError(f"gender_class_weights must be two positive numbers, got {gender_class_weights}")
        if gender_temperature <= 0:
            raise ValueError(f"gender_temperature must be positive, got {gender_temperature}")
        self.gender_class_weights = None if gender_class_weights is None else [float(w) for w in gender_class_weights]
        self.age_range_loss_weight = age_range_loss_weight
        self.gender_temperature = float(gender_temperature)
        self.flip_average = bool(flip_average)
        if int(ensemble_size) != ensemble_size or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be a whole number of networks, 1 or more, got {ensemble_size}")
        self.ensemble_size = int(ensemble_size)
        network_zooms = [1.0] * self.ensemble_size if network_zooms is None else [float(z) for z in network_zooms]
        if len(network_zooms) != self.ensemble_size or min(network_zooms) < 1:
            raise ValueError(f"network_zooms needs one zoom of 1 or more per network ({self.ensemble_size}), got {network_zooms}")
        self.network_zooms = network_zooms
        network_read_sizes = [self.image_size] * self.ensemble_size if network_read_sizes is None else [int(n) for n in network_read_sizes]
        if len(network_read_sizes) != self.ensemble_size or min(network_read_sizes) < 1:
            raise ValueError(f"network_read_sizes needs one positive size per network ({self.ensemble_size}), got {network_read_sizes}")
        self.network_read_sizes = network_read_sizes
        self.network_hidden_sizes, self.network_embedding_sizes = checked_network_widths(
            network_hidden_sizes, network_embedding_sizes, hidden_sizes, embedding_size, self.ensemble_size
        )
        self.photo_networks = checked_photo_networks(photo_networks, self.ensemble_size)
        if self.photo_networks is not None and not self.reads_framings_apart:
            raise ValueError(f"photo_networks is for networks that read different framings; these all read {network_zooms[0]:g}")
        kwargs.setdefault("id2label", {0: "male", 1: "female"})
        kwargs.setdefault("label2id", {"male": 0, "female": 1})
        super().__init__(**kwargs)

    @property
    def num_ages(self) -> int:
        """Bins of the age head, one per whole year from `min_age` to `max_age`."""
        return self.max_age - self.min_age + 1

    def network_widths(self, index: int) -> tuple[int, list[int]]:
        """Stem channels and channels per stage of network `index` (0: the model's own)."""
        if self.network_hidden_sizes is None:
            return self.embedding_size, self.hidden_sizes
        return self.network_embedding_sizes[index], self.network_hidden_sizes[index]

    @property
    def input_zoom(self) -> float:
        """The framing of the model's input: the widest any network reads."""
        return max(self.network_zooms)

    @property
    def reads_framings_apart(self) -> bool:
        """Whether its networks read different framings: then a face whose wider framing reaches well beyond its
        photo is read by the tightest-framed networks alone (`framing_filled` in `AgeGenderModel.forward`)."""
        return len(set(self.network_zooms)) > 1

    @property
    def tightest_networks(self) -> list[int]:
        """The networks that read the tightest framing: the readers of a `framing_filled` face."""
        return [index for index, zoom in enumerate(self.network_zooms) if zoom == min(self.network_zooms)]

    @property
    def photo_network_indices(self) -> list[int]:
        """The readers of a face framed from its photo: `photo_networks`, or every network."""
        return list(range(self.ensemble_size)) if self.photo_networks is None else self.photo_networks

    @property
    def input_size(self) -> int:
        """Side in pixels of the model's input (`pixel_values`): `image_size` at UTKFace's framing, grown with the
        framing, so that a network that reads UTKFace's framing reads its `image_size` pixels as they are."""
        return round(self.image_size * self.input_zoom)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AgeGenderConfig":
        """A config from one of `PRESETS`, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def checked_network_widths(
    network_hidden_sizes: list[list[int]] | None, network_embedding_sizes: list[int] | None, hidden_sizes: list[int],
    embedding_size: int, ensemble_size: int,
) -> tuple[list[list[int]] | None, list[int] | None]:
    """Each network's widths as given, checked against the ensemble (one per network, as many stages as
    `hidden_sizes`, the first network's equal to `hidden_sizes` and `embedding_size`), or None for all alike."""
    if network_hidden_sizes is None and network_embedding_sizes is None:
        return None, None
    if network_hidden_sizes is None or network_embedding_sizes is None:
        raise ValueError("give network_hidden_sizes and network_embedding_sizes together, or neither")
    widths = [[int(width) for width in network] for network in network_hidden_sizes]
    stems = [int(width) for width in network_embedding_sizes]
    if len(widths) != ensemble_size or len(stems) != ensemble_size:
        raise ValueError(f"network_hidden_sizes and network_embedding_sizes need one entry per network ({ensemble_size}), got {widths} and {stems}")
    if any(len(network) != len(hidden_sizes) for network in widths) or min(min(network) for network in widths + [stems]) < 1:
        raise ValueError(f"each of network_hidden_sizes {widths} needs {len(hidden_sizes)} positive widths, one per stage")
    if widths[0] != hidden_sizes or stems[0] != embedding_size:
        raise ValueError(f"the first network's widths ({stems[0]}, {widths[0]}) must be hidden_sizes {hidden_sizes} and embedding_size {embedding_size}")
    return widths, stems


def checked_photo_networks(photo_networks: list[int] | None, ensemble_size: int) -> list[int] | None:
    """`photo_networks` in order, checked to name one or more of the ensemble's networks, each once."""
    if photo_networks is None:
        return None
    indices = sorted(int(index) for index in photo_networks)
    if not indices or len(set(indices)) != len(indices) or indices[0] < 0 or indices[-1] >= ensemble_size:
        raise ValueError(
            f"photo_networks must name one or more of the {ensemble_size} networks by index (0 to {ensemble_size - 1}), "
            f"each once, got {photo_networks}"
        )
    return indices
