"""Export a trained model folder to ONNX, as Hub repositories lay it out, and check it against torch.

    python -m training.export_onnx model --data ../shared/datasets/UTKFace.tar.gz

Writes `onnx/model.onnx` (float32) and, when it passes the checks, `onnx/model_int8.onnx` (static int8 QDQ,
calibrated on real face chips: UTKFace validation faces and, where present, real-photo faces) into the folder,
beside its config.json (labels, age range, calibrated interval and gender temperature) and
preprocessor_config.json. Input `pixel_values` `(batch, 3, S, S)` as the image processor makes them, outputs
`age_logits` `(batch, num_ages)` and `gender_logits` `(batch, 2)`: the same post-processing as torch
(`post_process_age_gender`) turns them into answers.

The checks (written to `onnx/checks.json`): age MAE on UTKFace test faces within `MAE_TOLERANCE` years of
torch's, and gender agreement with torch of at least `AGREEMENT` there, on the real faces' validation part and on
the faces the app finds in wider-dev's photos. An int8 model
that misses them is removed, not offered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from faces.onnx_model import ONNX_DIR, cpu_session, onnx_inputs, onnx_path  # noqa: E402
from modeling import AgeGenderImageProcessor, AgeGenderModel  # noqa: E402

MAE_TOLERANCE = {"float32": 0.02, "int8": 0.05}
AGREEMENT = {"float32": 0.995, "int8": 0.99}
CALIBRATION_FACES = 1024  # batches of 32; 512 faces gave ranges that moved gender agreement by up to 0.4 points


class LogitsOnly(torch.nn.Module):
    """The model with its two logits as the graph's outputs: what ONNX users post-process themselves."""

    def __init__(self, model: AgeGenderModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, framing_filled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values=pixel_values, framing_filled=framing_filled)
        return outputs.age_logits, outputs.gender_logits


def export_float(model: AgeGenderModel, path: Path) -> Path:
    """The float32 graph with a dynamic batch dimension (torch's exporter, opset 18). A model whose networks read
    different framings takes `framing_filled` `(batch,)` booleans too (`AgeGenderModel.forward`)."""
    size = model.config.input_size
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs, names, shapes = (torch.zeros(2, 3, size, size),), ["pixel_values"], ({0: torch.export.Dim("batch")},)
    if model.config.reads_framings_apart:
        inputs, names, shapes = inputs + (torch.tensor([True, False]),), names + ["framing_filled"], shapes + ({0: torch.export.Dim("batch")},)
    torch.onnx.export(
        LogitsOnly(model.float().eval()).eval(), inputs, str(path), input_names=names, output_names=["age_logits", "gender_logits"],
        dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False,
    )
    return path


def head_nodes(path: Path) -> list[str]:
    """The graph's fully connected layers: the two heads, left in float32 by the int8 export. They are a sliver of
    the compute, and quantising them moved the ages twice as much (mean 0.30 against 0.27 years on UTKFace test)."""
    import onnx

    return [node.name for node in onnx.load(str(path), load_external_data=False).graph.node if node.op_type in ("Gemm", "MatMul")]


def graph_inputs(path: Path) -> list[str]:
    """The names of the graph's inputs (`pixel_values`, and `framing_filled` where the model takes it)."""
    import onnx

    return [graph_input.name for graph_input in onnx.load(str(path), load_external_data=False).graph.input]


def quantize_int8(float_path: Path, int8_path: Path, calibration: tuple[np.ndarray, np.ndarray]) -> Path:
    """Static int8 quantisation with activation ranges measured on real faces; the heads stay float32.

    Integer operators (QLinearConv: uint8 activations, per-channel int8 weights, 7-bit ranges) rather than float
    operators between quantise and dequantise nodes: onnxruntime's CPU kernels run them 2.5 times as fast as the
    float32 graph here (batch 64), where the QDQ form ran no faster than float32. The 7-bit ranges
    (`reduce_range`) keep the uint8 x int8 products from saturating on x86 CPUs without VNNI. Each activation's
    range is the moving average of the calibration batches' minima and maxima rather than the extremes of all of
    them, so that a few outlying faces do not stretch a range: v7's export agreed with torch on 98.9% of
    wider-dev's found faces with the extremes (under the 99% asked), on 99.4-99.6% of each check set now
    (docs/experiments.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    session_inputs = graph_inputs(float_path)

    class Faces(CalibrationDataReader):
        def __init__(self):
            # Whole batches only: the calibrator stacks every batch's outputs and fails on a shorter last one.
            self.batches = iter([onnx_inputs(session_inputs, calibration[0][i : i + 32], calibration[1][i : i + 32]) for i in range(0, len(calibration[0]) - 31, 32)])

        def get_next(self):
            return next(self.batches, None)

    prepared = int8_path.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(int8_path), Faces(), quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head_nodes(float_path),
            extra_options={"CalibMovingAverage": True},
        )
    finally:
        prepared.unlink(missing_ok=True)
    return int8_path


def onnx_logits(session, pixel_values: np.ndarray, filled: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    parts = [session.run(None, onnx_inputs(names, pixel_values[i : i + batch_size], filled[i : i + batch_size])) for i in range(0, len(pixel_values), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def expected_ages(age_logits: np.ndarray, min_age: int) -> np.ndarray:
    probs = np.exp(age_logits - age_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs @ np.arange(min_age, min_age + age_logits.shape[-1])


def compare(model: AgeGenderModel, session, pixel_values: np.ndarray, ages: np.ndarray | None, filled: np.ndarray) -> dict:
    """Age MAE of torch and of the ONNX model (to the true ages where known, else to torch's ages) and how often
    their genders agree, each told which faces are framing filled."""
    with torch.inference_mode():
        outputs = [
            model(pixel_values=torch.from_numpy(pixel_values[i : i + 256]), framing_filled=torch.from_numpy(filled[i : i + 256]))
            for i in range(0, len(pixel_values), 256)
        ]
    torch_age = torch.cat([o.age for o in outputs]).numpy()
    torch_gender = torch.cat([o.gender_logits.argmax(-1) for o in outputs]).numpy()
    age_logits, gender_logits = onnx_logits(session, pixel_values, filled)
    onnx_age = expected_ages(age_logits, model.config.min_age)
    figures = {"faces": int(len(pixel_values)), "gender_agreement": float((gender_logits.argmax(-1) == torch_gender).mean())}
    if ages is not None:
        torch_mae, onnx_mae = float(np.abs(torch_age - ages).mean()), float(np.abs(onnx_age - ages).mean())
        figures.update(torch_age_mae=torch_mae, onnx_age_mae=onnx_mae, age_mae_difference=abs(onnx_mae - torch_mae))
    figures["mean_abs_age_difference"] = float(np.abs(onnx_age - torch_age).mean())
    return figures


def passes(figures: dict[str, dict], precision: str) -> bool:
    """Gender agreement on every set; the age MAE (to true ages) where a set has them."""
    return all(
        f.get("age_mae_difference", 0.0) <= MAE_TOLERANCE[precision] and f["gender_agreement"] >= AGREEMENT[precision] for f in figures.values()
    )


def check_faces(data: str, cache_dir: str | None, processor: AgeGenderImageProcessor, max_faces: int | None) -> dict[str, tuple]:
    """Normalised pixel values (and true ages where known) of the faces the export uses: UTKFace validation and
    the real faces' training part to calibrate int8, UTKFace test and the real faces' validation part to check
    (the real faces where ../shared has them). No face both calibrates and checks."""
    from training.data import load_utkface, pixel_cache
    from training.real_faces import DEFAULT_LFW_GENDER, DEFAULT_WIDER_FACES, framing_filled, load_real_faces
    from training.wider_dev import DEFAULT_WIDER_DEV, real_face_pixels

    def normalised(pixels: np.ndarray) -> np.ndarray:
        """uint8 `(N, H, W, 3)` faces as the model's input."""
        return processor.normalize_batch(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()

    def first(dataset):
        return dataset if max_faces is None else dataset.shuffle(seed=0).select(range(min(max_faces, len(dataset))))

    def check_set(dataset, ages: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """A dataset's faces as the model's input, their true ages if given, and their framing flags."""
        return normalised(np.array(pixel_cache(dataset, processor, cache_dir))), ages, framing_filled(dataset, processor.face_zoom).numpy()

    splits = load_utkface(data, cache_dir, verbose=False)
    validation, test = first(splits["validation"]), first(splits["test"])
    faces = {
        "utkface_validation": check_set(validation),
        "utkface_test": check_set(test, np.asarray(test["age"], dtype=float)),
    }
    if DEFAULT_WIDER_FACES.is_dir() and DEFAULT_LFW_GENDER.is_dir():
        real_faces = load_real_faces(cache_dir=cache_dir, verbose=False, zoom=processor.face_zoom)
        faces["real_faces_train"] = check_set(first(real_faces["train"].shuffle(seed=0).select(range(CALIBRATION_FACES))))
        faces["real_faces_validation"] = check_set(first(real_faces["validation"]))
    if DEFAULT_WIDER_DEV.is_dir():  # the faces the app finds in wider-dev's real photos: checked, never calibrated on
        pixels, _, filled = (part[:max_faces] for part in real_face_pixels(DEFAULT_WIDER_DEV, processor, cache_dir))
        faces["wider_dev_found_faces"] = (normalised(pixels), None, filled)
    return faces


def export(folder: str | Path, data: str, cache_dir: str | None = None, max_faces: int | None = None) -> dict:
    """Export, quantise and check; returns (and writes to onnx/checks.json) the figures of both precisions."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} is not a saved model folder (config.json is missing)")
    model = AgeGenderModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AgeGenderImageProcessor.from_pretrained(folder)
    faces = check_faces(data, cache_dir, processor, max_faces)
    out = folder / ONNX_DIR
    float_path = export_float(model, onnx_path(folder, "float32"))
    sets = [faces[name] for name in ("utkface_validation", "real_faces_train") if name in faces]
    order = np.random.default_rng(0).permutation(sum(len(pixels) for pixels, _, _ in sets))[:CALIBRATION_FACES]
    calibration = tuple(np.concatenate([part[index] for part in sets])[order] for index in (0, 2))
    int8_path = quantize_int8(float_path, onnx_path(folder, "int8"), calibration)
    checked = {name: faces[name] for name in ("utkface_test", "real_faces_validation", "wider_dev_found_faces") if name in faces}
    report = {}
    for precision, path in (("float32", float_path), ("int8", int8_path)):
        session = cpu_session(path)
        figures = {name: compare(model, session, pixels, ages, filled) for name, (pixels, ages, filled) in checked.items()}
        report[precision] = {"file": f"{ONNX_DIR}/{path.name}", "passes": passes(figures, precision), **figures}
    if not report["int8"]["passes"]:
        int8_path.unlink()
        report["int8"]["file"] = None
    report["tolerances"] = {"age_mae_difference": MAE_TOLERANCE, "gender_agreement": AGREEMENT}
    (out / "checks.json").write_text(json.dumps(report, indent=2))
    if not report["float32"]["passes"]:
        raise SystemExit(f"error: the float32 export differs from torch beyond the tolerances: {json.dumps(report['float32'])}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A saved model folder (config.json, model.safetensors).")
    parser.add_argument("--data", required=True, help="UTKFace folder or archive: calibration and check faces.")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--max_faces", type=int, default=None, help="Use at most N faces per set (quick runs).")
    args = parser.parse_args(argv)
    report = export(args.model, args.data, args.cache_dir, args.max_faces)
    for precision in ("float32", "int8"):
        entry = report[precision]
        print(f"{precision}: {entry['file'] or 'not offered (misses the tolerances)'}")
        for name, figures in entry.items():
            if isinstance(figures, dict):
                print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
