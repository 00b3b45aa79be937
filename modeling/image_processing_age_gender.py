"""Image processor of the age and gender CNN: the one preprocessing definition that training, evaluation,
the pipeline and the app all share."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes


class InvalidImageError(ValueError):
    """An input that is not an image this processor can read; the message says why."""


def _describe(source: object) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def open_image(source: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    """Open a file or bytes as a PIL image, refusing decompression bombs before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as error:
        raise InvalidImageError(f"no such image file: {_describe(source)}") from error
    except IsADirectoryError as error:
        raise InvalidImageError(f"expected an image file, got a folder: {_describe(source)}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidImageError(f"not an image or an unsupported format: {_describe(source)}") from error
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"image too large to decode safely: {_describe(source)} ({error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image too large: {width}x{height} pixels is over the limit of {max_pixels:,} ({_describe(source)})"
        )
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
    except Exception as error:  # truncated or corrupt data surfaces only when pixels are decoded
        raise InvalidImageError(f"image data is corrupt or truncated: {_describe(source)} ({error})") from error
    return image


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, upright: EXIF orientation applied, transparency laid on white, and 16-bit or
    float pixels scaled rather than clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(array_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer, float or boolean pixels to uint8: floats in [0, 1] are taken as fractions."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        peak = array.max(initial=0)
        if peak <= 255:
            return np.clip(array, 0, 255).astype(np.uint8)
        return (np.clip(array, 0, 65535).astype(np.float32) / 257.0).round().astype(np.uint8)
    raise InvalidImageError(f"unsupported pixel type {array.dtype}")


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """An RGB image from an array laid out (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidImageError(f"expected an image array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    if min(array.shape[:2]) < 1:
        raise InvalidImageError(f"image array is empty: shape {array.shape}")
    return pil_to_rgb(Image.fromarray(np.ascontiguousarray(array_to_uint8(array))))


DEFAULT_MAX_PIXELS = 100_000_000


def load_rgb_image(image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any supported input (path, bytes, PIL image, array, tensor) as an upright 8-bit RGB PIL image, or an
    `InvalidImageError` that says why not: EXIF rotation applied, every PIL mode read, files over `max_pixels`
    refused before decoding. Photos for face detection and face crops for the model are read alike."""
    if isinstance(image, (str, os.PathLike, bytes)):
        image = open_image(image, max_pixels)
    if isinstance(image, Image.Image):
        if min(image.size) < 1:
            raise InvalidImageError(f"image is empty: size {image.size}")
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    raise InvalidImageError(
        f"expected a PIL image, numpy array, torch tensor, file path or bytes, got {type(image).__name__}"
    )


def side_from_size(size: int | dict | None, default: int) -> int:
    """transformers' `size` argument (an int, `{"height": h, "width": w}` with h == w, or `{"shortest_edge": s}`)
    as the side of the square output."""
    if size is None:
        return default
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    if size.get("height") == size.get("width") and size.get("height"):
        return int(size["height"])
    raise ValueError(f"size must be an int, {{'height': s, 'width': s}} or {{'shortest_edge': s}}; this model's inputs are square, got {size}")


class AgeGenderImageProcessor(BaseImageProcessor):
    r"""
    Turns face crops into the model's `pixel_values`: any image mode to RGB (EXIF orientation honoured), a
    centred square crop, a resize to `image_size` and normalisation.

    Training caches the output of [`~AgeGenderImageProcessor.to_uint8`] and applies
    [`~AgeGenderImageProcessor.normalize_batch`] on the device after augmentation, so the model meets the same
    pixels in training and in use.

    Args:
        image_size (`int`, *optional*, defaults to 64):
            Side of the square output in pixels (the model's `config.input_size`).
        face_zoom (`float`, *optional*, defaults to 1.0):
            How the face crops it is given are framed: 1.0 as UTKFace frames its faces (and the app's aligner, at
            its default), above 1 that many times wider about the face's centre, more of the head and neck in
            view. It changes no pixels here: the crops given must be framed so. Photo analysis cuts each face at
            it (`faces.alignment.align_face`, `FaceAnalyzer.face_crops`); `faces.alignment.reframe_chip(crop,
            face_zoom)` widens a UTKFace-framed crop, its edge repeated, as training widens UTKFace's.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel mean subtracted after scaling pixels to [0, 1].
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel standard deviation divided by.
        max_image_pixels (`int`, *optional*, defaults to 100_000_000):
            Files with more pixels are refused before decoding (decompression bombs).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 64,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        face_zoom: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not face_zoom > 0:
            raise ValueError(f"face_zoom must be positive, got {face_zoom}")
        self.image_size = int(image_size)
        self.face_zoom = float(face_zoom)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_image_pixels = int(max_image_pixels)

    def load_rgb(self, image: ImageLike) -> Image.Image:
        """See `load_rgb_image`, with this processor's pixel limit."""
        return load_rgb_image(image, self.max_image_pixels)

    def to_uint8(self, image: ImageLike, side: int | None = None) -> np.ndarray:
        """The face as a `(side, side, 3)` uint8 array (default `image_size`): centre-cropped to a square, then
        resized; `side=0` keeps the square at its own size. Training caches this output, which depends on
        `image_size` alone: mean and standard deviation are applied after the cache."""
        rgb = self.load_rgb(image)
        width, height = rgb.size
        square_side = min(width, height)
        left, top = (width - square_side) // 2, (height - square_side) // 2
        square = rgb.crop((left, top, left + square_side, top + square_side))
        side = self.image_size if side is None else side
        if side == 0:
            return np.asarray(square)
        return np.asarray(square.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None))

    def normalize_batch(
        self, pixels: torch.Tensor, image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
    ) -> torch.Tensor:
        """Batched `(N, 3, H, W)` pixels on the 0-255 scale, of any dtype and on any device, to normalised float
        pixel values."""
        mean = torch.tensor(self.image_mean if image_mean is None else image_mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std if image_std is None else image_std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_tensors: str | None = "pt",
        do_resize: bool = True,
        size: int | dict | None = None,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """One image or a list of them to a batch of `pixel_values`. transformers' usual options override the
        saved settings for this call: `do_resize=False` keeps each centre square at its own size (all images
        must then share it), `size` sets the side, `do_normalize=False` leaves pixels on the 0-255 scale.
        Unknown options are refused rather than silently dropped."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected arguments: {', '.join(sorted(kwargs))}")
        if isinstance(images, (list, tuple)):
            if not images:
                raise InvalidImageError("no images given: expected one image or a non-empty list of images")
        else:
            images = [images]
        side = side_from_size(size, self.image_size) if do_resize else 0
        arrays = [self.to_uint8(image, side) for image in images]
        if len({array.shape for array in arrays}) > 1:
            raise ValueError(f"with do_resize=False every image must have the same size, got {sorted({a.shape[:2] for a in arrays})}")
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        pixel_values = self.normalize_batch(pixels, image_mean, image_std) if do_normalize else pixels.float()
        if return_tensors in (None, "np"):
            return BatchFeature({"pixel_values": pixel_values.numpy()})
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, not {return_tensors!r}")
        return BatchFeature({"pixel_values": pixel_values})

    def __call__(self, images: ImageLike | Sequence[ImageLike], **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
