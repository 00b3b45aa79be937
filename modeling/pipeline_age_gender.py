"""`pipeline("age-gender-estimation")`: images in, one record of age and gender per image out."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline


class AgeGenderPipeline(Pipeline):
    """Estimates age and gender of face crops (paths, PIL images, arrays, or lists of them).

    Each image gives `{"age": 31.4, "age_interval": [27, 36], "age_std": 3.9, "gender": "female", "gender_score": 0.97}`. The
    images should be face crops framed like UTKFace's; to find faces in a whole photo use `faces.FaceAnalyzer`.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError("no images given: expected one image or a non-empty list of images")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        return self.image_processor(images=image, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, torch.Tensor]):
        return self.model(**model_inputs)

    def postprocess(self, model_outputs) -> dict[str, Any]:
        return self.model.post_process_age_gender(model_outputs)[0]
