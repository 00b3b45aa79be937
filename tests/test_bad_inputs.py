"""The corpus of bad and odd files through the image processor and the pipeline: each gives a correct result
or a clear InvalidImageError, never a crash from deep inside a library."""

from __future__ import annotations

import pytest
from transformers import AutoImageProcessor, pipeline

from bad_inputs import make_bad_files
from conftest import require_shipped_model
from modeling import PIPELINE_TASK, InvalidImageError


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def test_corpus_through_the_image_processor(bad_files):
    processor = AutoImageProcessor.from_pretrained(require_shipped_model())
    for name, (path, expectation) in bad_files.items():
        if expectation == "ok":
            pixels = processor(images=str(path))["pixel_values"]
            assert pixels.shape[0] == 1 and pixels.isfinite().all(), name
        else:
            with pytest.raises(InvalidImageError, match="(?i)image|large|decode"):
                processor(images=str(path))


def test_corpus_through_the_pipeline(bad_files):
    estimator = pipeline(PIPELINE_TASK, model=str(require_shipped_model()))
    for name, (path, expectation) in bad_files.items():
        if expectation == "ok":
            result = estimator(str(path))
            assert 0 <= result["age"] <= 116 and result["gender"] in ("male", "female"), name
        else:
            with pytest.raises(InvalidImageError):
                estimator(str(path))
