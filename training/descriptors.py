"""A face-recognition descriptor as an auxiliary training target (`train.py --descriptor_weight`).

dlib's face descriptor (a ResNet trained on about 3 million faces of 7,500 people photographed in the wild;
128-D; the model file ships in the PyPI package `face_recognition_models`, CC0) places a face by who it is,
not by how the photo was taken: the same person blurred, small or badly lit lands near the same point. Its
value for each training face is computed once, on the clean UTKFace crop, and the network learns to predict
it (through a linear projection that exists only during training) from the augmented and degraded view it
trains on, so its features learn to see through what real photos do to faces. Nothing of it is left at
inference. dlib and the model file are needed for training with it only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from faces.onnx_model import usable_cores

DESCRIPTOR_SIZE = 128
DLIB_CHIP_SIZE = 150  # the input of dlib's recognition network, cut with its own padding of 0.25
# UTKFace's crops are dlib face chips with padding 0.2: the face rectangle that dlib's 5-point model expects
# is the middle 1/1.4 of the crop.
UTKFACE_CHIP_PADDING = 0.2


class DescriptorUnavailableError(RuntimeError):
    """dlib or its model files are not installed."""


@cache
def dlib_models():
    """dlib's 5-point shape model and face recognition network, read from `face_recognition_models` without
    importing it (its `__init__` needs setuptools' `pkg_resources`, gone from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models" if spec and spec.submodule_search_locations else None
    try:
        import dlib
    except ImportError as error:
        raise DescriptorUnavailableError("--descriptor_weight needs dlib: pip install dlib-bin face_recognition_models") from error
    if folder is None or not (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file():
        raise DescriptorUnavailableError("--descriptor_weight needs dlib's models: pip install face_recognition_models")
    return (
        dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat")),
        dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat")),
    )


def utkface_descriptor(crop: np.ndarray) -> np.ndarray:
    """The 128-D descriptor of one UTKFace crop (`(H, W, 3)` uint8 RGB): its 5 landmarks found within the face
    rectangle the crop was cut around, then dlib's own face chip and network."""
    import dlib

    shape_model, network = dlib_models()
    height, width = crop.shape[:2]
    margin_x = round(width * UTKFACE_CHIP_PADDING / (1 + 2 * UTKFACE_CHIP_PADDING))
    margin_y = round(height * UTKFACE_CHIP_PADDING / (1 + 2 * UTKFACE_CHIP_PADDING))
    shape = shape_model(crop, dlib.rectangle(margin_x, margin_y, width - margin_x, height - margin_y))
    chip = dlib.get_face_chip(crop, shape, DLIB_CHIP_SIZE, 0.25)
    return np.asarray(network.compute_face_descriptor(chip), dtype=np.float32)


def _descriptor_of_file(image: dict) -> np.ndarray:
    from modeling.image_processing_age_gender import load_rgb_image

    return utkface_descriptor(np.asarray(load_rgb_image(image["bytes"] or image["path"])))


def face_descriptors(dataset, cache_dir: str | os.PathLike, workers: int | None = None) -> torch.Tensor:
    """`(N, 128)` descriptors of the faces of a UTKFace `dataset`, in its order. About 80 ms a face on one core
    (11 minutes for the 16,774 training faces on two), so computed in parallel once and cached, keyed by the
    faces' hashes."""
    from datasets import Image

    from training.data import write_atomically

    key = hashlib.sha1("|".join(dataset["sha1"]).encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / "descriptors" / f"{key}.npy"
    if cache_file.is_file():  # dlib is needed only to compute them
        return torch.from_numpy(np.load(cache_file))
    dlib_models()  # loaded once here, before the workers fork, so a missing dependency stops the run at once
    images = dataset.cast_column("image", Image(decode=False))["image"]
    workers = workers or usable_cores()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            descriptors = list(pool.map(_descriptor_of_file, images, chunksize=64))
    else:
        descriptors = [_descriptor_of_file(image) for image in images]
    write_atomically(cache_file, lambda path: np.save(path, np.stack(descriptors)))
    return torch.from_numpy(np.load(cache_file))


def descriptor_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine distance: the descriptor's direction carries identity (dlib compares descriptors by distance,
    and their lengths vary little)."""
    return (1 - F.cosine_similarity(predicted.float(), target, dim=-1)).mean()
