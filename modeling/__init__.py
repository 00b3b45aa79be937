"""The age and gender CNN as a transformers model.

`import modeling` registers the config, the model, the image processor and the `"age-gender-estimation"`
pipeline with transformers, so that the Auto classes and `pipeline()` load local folders with no remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_age_gender import PRESETS, AgeGenderConfig
from .image_processing_age_gender import AgeGenderImageProcessor, InvalidImageError
from .modeling_age_gender import AgeGenderModel, AgeGenderOutput
from .pipeline_age_gender import AgeGenderPipeline

PIPELINE_TASK = "age-gender-estimation"

AutoConfig.register(AgeGenderConfig.model_type, AgeGenderConfig, exist_ok=True)
AutoModel.register(AgeGenderConfig, AgeGenderModel, exist_ok=True)
AutoImageProcessor.register(AgeGenderConfig, image_processor_classes={"pil": AgeGenderImageProcessor}, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=AgeGenderPipeline, pt_model=AutoModel, type="image")

# save_pretrained copies the code files and writes `auto_map`, so that a pushed model loads with
# `trust_remote_code=True` for someone who has only transformers.
AgeGenderConfig.register_for_auto_class()
AgeGenderModel.register_for_auto_class("AutoModel")
AgeGenderImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PIPELINE_TASK",
    "PRESETS",
    "AgeGenderConfig",
    "AgeGenderImageProcessor",
    "AgeGenderModel",
    "AgeGenderOutput",
    "AgeGenderPipeline",
    "InvalidImageError",
]
