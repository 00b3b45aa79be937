"""The exported model (`python -m training.export_onnx`) on onnxruntime, answering as `AgeGenderModel` does, so
that `FaceAnalyzer(..., runtime="onnx")` runs the same post-processing on the same logits. One face, which the
webcam and most photos send, is answered several times faster than by torch on a CPU (benchmarks/inference.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from modeling.modeling_age_gender import AgeGenderOutput, age_statistics, gender_probabilities, prediction_records

ONNX_DIR = "onnx"
ONNX_FILES = {"float32": "model.onnx", "int8": "model_int8.onnx"}


def cpu_session(model: str | os.PathLike | bytes, threads: int = 1):
    """An onnxruntime session on the CPU with `threads` intra-op threads, for a file or ONNX bytes."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"])


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def onnx_path(folder: str | os.PathLike, precision: str = "float32") -> Path:
    """Where a model folder keeps its ONNX export of that precision, as Hub repositories lay it out."""
    if precision not in ONNX_FILES:
        raise ValueError(f"ONNX precision must be one of {sorted(ONNX_FILES)}, not {precision!r}")
    return Path(folder) / ONNX_DIR / ONNX_FILES[precision]


def onnx_inputs(names: list[str], pixel_values: np.ndarray, framing_filled: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of an exported graph: `pixel_values`, and `framing_filled` where the graph takes it (a model whose
    networks read different framings)."""
    feed = {"pixel_values": pixel_values}
    if "framing_filled" in names:
        feed["framing_filled"] = np.ascontiguousarray(framing_filled, dtype=bool)
    return feed


class OnnxAgeGenderModel:
    """An ONNX export of a model folder with that folder's config (labels, age range, calibrated interval and
    gender temperature).

    Args:
        folder: a local model folder holding `onnx/model.onnx` (or `onnx/model_int8.onnx`) and config.json.
        precision: "float32" or "int8" (offered only where the export passed its checks).
        threads: onnxruntime's intra-op threads (default: every core this process may use). On the project's
            2-core machine two threads gave 1.7-1.9x the faces/s of one (887 against 462 at batch 64).
    """

    dtype = torch.float32

    def __init__(self, folder: str | os.PathLike, precision: str = "float32", threads: int | None = None):
        path = onnx_path(folder, precision)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ONNX model at {path}: export it with `python -m training.export_onnx {folder} --data UTKFACE`"
                + (" (an int8 export that missed its accuracy checks is not written)" if precision == "int8" else "")
            )
        self.config = AutoConfig.from_pretrained(folder)
        self.session = cpu_session(path, threads or usable_cores())
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.path = path

    def __call__(self, pixel_values: torch.Tensor, framing_filled: torch.Tensor | None = None, **kwargs) -> AgeGenderOutput:
        pixels = np.ascontiguousarray(pixel_values.detach().cpu().float().numpy())
        filled = np.zeros(len(pixels), dtype=bool) if framing_filled is None else framing_filled.cpu().numpy().astype(bool)
        inputs = onnx_inputs(self.input_names, pixels, filled)
        age_logits, gender_logits = (torch.from_numpy(x) for x in self.session.run(None, inputs))
        age, age_std = age_statistics(age_logits.softmax(-1), self.config.min_age)
        return AgeGenderOutput(age=age, age_std=age_std, age_logits=age_logits, gender_logits=gender_logits)

    def post_process_age_gender(self, outputs: AgeGenderOutput, return_distributions: bool = False) -> list[dict]:
        """As `AgeGenderModel.post_process_age_gender`."""
        return prediction_records(
            outputs.age_logits.softmax(-1), gender_probabilities(outputs.gender_logits, self.config), self.config, return_distributions
        )

    def parameters(self):
        """The graph's weights, as torch modules list theirs (for counts in logs): float or int8, without the
        quantisation's own scales and zero points."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        return [
            torch.empty(tuple(t.dims)) for t in graph.initializer if t.data_type in kinds and not t.name.endswith(("_scale", "_zero_point"))
        ]
