"""Evaluate a saved model on any split of any UTKFace source, with the fairness view: the same figures per
race, per gender and per age band, a gender confusion matrix, and charts.

    python training/eval_model.py --model model --data ../shared/datasets/UTKFace.tar.gz --split test --out reports/test

Writes report.json and report.md, predicted_vs_true_age.png and mae_by_age.png to --out. With
--update_card, also writes the per-group figures into the model folder's card (README.md). With
--calibrate, first recalibrates the model folder's age interval on the validation split and its gender
confidence on the real faces' validation part (config.json); with --flip_tta the model then keeps averaging each
face with its mirror image (`flip_average`), the setting its calibration was made with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project root holds modeling/

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoImageProcessor, AutoModel

import modeling  # noqa: F401  (registers the model with the Auto classes)
from faces.alignment import widened_crop_filled
from faces.analysis import CHILD_AGE
from training.data import GENDER_NAMES, RACE_NAMES, load_utkface, pixel_cache
from training.model_card import write_model_card
from training.plots import plot_age_errors
from training.real_faces import DEFAULT_LFW_GENDER, DEFAULT_WIDER_FACES
from training.scoring import (
    balanced_gender_accuracy, calibrate_gender_temperature, calibrate_interval_scale, gender_figures, interval_report, load_metric, predict_distributions, predict_loader, score,
)
from training.wider_dev import DEFAULT_WIDER_DEV, real_face_pixels

AGE_BANDS = [(0, 2), (3, 9)] + [(low, low + 9) for low in range(10, 70, 10)] + [(70, 200)]


def band_name(low: int, high: int) -> str:
    return f"{low}+" if high >= 200 else f"{low}-{high}"


def group_scores(predictions: dict[str, np.ndarray], masks: dict[str, np.ndarray], metric) -> dict[str, dict]:
    return {name: score({k: v[mask] for k, v in predictions.items()}, metric) for name, mask in masks.items() if mask.any()}


def breakdown(predictions: dict[str, np.ndarray], race: np.ndarray, metric) -> dict:
    """Overall figures, the same per age band, race and gender, the confusion matrix and plain-words weak spots."""
    age, gender = predictions["age_true"], predictions["gender_true"].astype(int)
    overall = score(predictions, metric)
    report = {
        "overall": overall,
        "age_band": group_scores(predictions, {band_name(lo, hi): (age >= lo) & (age <= hi) for lo, hi in AGE_BANDS}, metric),
        "race": group_scores(predictions, {name: race == i for i, name in enumerate(RACE_NAMES)}, metric),
        "gender": group_scores(predictions, {name: gender == i for i, name in enumerate(GENDER_NAMES)}, metric),
        "gender_confusion": {
            f"true_{t}": {f"pred_{p}": int(((gender == i) & (predictions["gender_pred"] == j)).sum()) for j, p in enumerate(GENDER_NAMES)}
            for i, t in enumerate(GENDER_NAMES)
        },
    }
    report["weaknesses"] = weaknesses(report, overall)
    return report


def weaknesses(report: dict, overall: dict) -> list[str]:
    """Groups (of at least 20 faces) clearly worse than the whole: age MAE 25% above it, or gender accuracy
    3 points below."""
    found = []
    for group in ("age_band", "race", "gender"):
        for name, m in report[group].items():
            if m["count"] < 20:
                continue
            if m["age_mae"] > 1.25 * overall["age_mae"]:
                found.append(f"age is less accurate for {group.replace('_', ' ')} {name}: MAE {m['age_mae']:.2f} against {overall['age_mae']:.2f} overall")
            if m["gender_accuracy"] < overall["gender_accuracy"] - 0.03:
                found.append(f"gender is less accurate for {group.replace('_', ' ')} {name}: {m['gender_accuracy']:.1%} against {overall['gender_accuracy']:.1%} overall")
    return found


def report_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "", "| group | faces | age MAE | CS@5 | gender accuracy |", "|---|---|---|---|---|"]
    o = report["overall"]
    lines.append(f"| all | {o['count']} | {o['age_mae']:.2f} | {o['age_cs5']:.1%} | {o['gender_accuracy']:.1%} |")
    for group in ("age_band", "race", "gender"):
        for name, m in report[group].items():
            lines.append(f"| {group.replace('_', ' ')} {name} | {m['count']} | {m['age_mae']:.2f} | {m['age_cs5']:.1%} | {m['gender_accuracy']:.1%} |")
    by_band = ", ".join(f"{name}: {b['coverage']:.0%} of {b['faces']}" for name, b in report["age_interval_by_predicted_age"].items())
    lines += ["", f"The age interval held {report['age_interval_coverage']:.1%} of true ages (aimed at {report['age_interval_aim']:.0%}); by predicted age: {by_band}."]
    if "real_photos" in report:
        real = report["real_photos"]
        lines += [
            "", f"Real photos (wider-dev, faces of 32 px and more that the app finds): gender accuracy {real['gender_accuracy']:.1%} of "
            f"{real['faces']} faces, balanced {real['gender_balanced_accuracy']:.1%} (men {real['gender_accuracy_men']:.1%}, women "
            f"{real['gender_accuracy_women']:.1%}); {real['confident_share']:.0%} of faces shown without \"?\" (90% or more, not read as under 10), right {real['confident_accuracy']:.1%} of the time"
        ]
    if "real_faces_validation" in report:
        lines += real_faces_markdown(report["real_faces_validation"])
    lines += ["", "Gender confusion (rows true, columns predicted):", "", "| | male | female |", "|---|---|---|"]
    for true, row in report["gender_confusion"].items():
        lines.append(f"| {true.removeprefix('true_')} | {row['pred_male']} | {row['pred_female']} |")
    lines += ["", "Weak spots:", ""] + [f"- {w}" for w in report["weaknesses"] or ["none beyond the thresholds"]]
    return "\n".join(lines) + "\n"


def real_faces_report(model, processor, args: argparse.Namespace) -> dict:
    """Gender figures (balanced over women and men, and the "?" rule) of the real faces' validation part in all,
    by source, by WIDER's perceived skin type, by face size and by WIDER's flags, and how often the predicted age
    falls inside the perceived age group's years (`AGE_GROUP_RANGES`), and how the children picked by eye are read
    (WIDER's groups have none for them: `children_by_eye`)."""
    from training.real_faces import AGE_GROUP_RANGES, AGE_GROUPS, children_by_eye, framing_filled, load_real_faces, size_band

    faces = load_real_faces(args.wider_faces or None, args.lfw_gender or None, args.cache_dir, verbose=False, zoom=processor.face_zoom)["validation"]
    pixels = torch.from_numpy(np.array(pixel_cache(faces, processor, args.cache_dir)))
    age_probs, gender_probs = predict_distributions(model, processor, pixels, framing_filled=framing_filled(faces, processor.face_zoom))
    ages = (age_probs @ torch.arange(model.config.min_age, model.config.min_age + age_probs.shape[1]).float()).numpy()
    columns = faces.select_columns(["gender", "age_group", "source", "skin", "face_height", "blur", "occlusion", "pose"]).to_pandas()
    genders = torch.tensor(columns["gender"].to_numpy())
    groups = {
        "all": np.ones(len(columns), bool),
        **{f"source {name}": (columns["source"] == name).to_numpy() for name in sorted(columns["source"].unique())},
        **{f"skin {name}": (columns["skin"] == name).to_numpy() for name in ["I", "II", "III", "IV", "V", "VI"]},
        **{f"size {name}": np.array([size_band(h) == name for h in columns["face_height"]]) for name in ["under 32 px", "32-63 px", "64-127 px", "128 px and more"]},
        "heavy blur": (columns["blur"] == 2).to_numpy(), "heavy occlusion": (columns["occlusion"] == 2).to_numpy(), "atypical pose": (columns["pose"] == 1).to_numpy(),
    }
    report = {}
    for name, mask in groups.items():
        known = mask & (columns["gender"] >= 0).to_numpy()
        if known.sum() >= 10 and (genders[known] == 1).any() and (genders[known] == 0).any():
            report[name] = gender_figures(gender_probs[known], genders[known], torch.from_numpy(ages)[known])
    age_group = columns["age_group"].to_numpy()
    ranges = np.asarray(AGE_GROUP_RANGES)[np.clip(age_group, 0, None)]
    inside = (ages >= ranges[:, 0]) & (ages <= ranges[:, 1])
    report["age_group_inside"] = {AGE_GROUPS[g]: {"faces": int((age_group == g).sum()), "inside": float(inside[age_group == g].mean())} for g in range(len(AGE_GROUPS)) if (age_group == g).any()}
    children = children_by_eye(faces)
    if children.any():
        report["children_by_eye"] = {"faces": int(children.sum()), "read_under_child_age": int((ages[children] < CHILD_AGE).sum()), "median_age": float(np.median(ages[children]))}
    return report


def real_faces_markdown(report: dict) -> list[str]:
    lines = ["", "Real faces, validation part (gender; no \"?\": share of faces shown without \"?\", 90% or more and not read as under 10, and how often right):", "",
             "| group | faces | balanced | men | women | no \"?\" share | no \"?\" right |", "|---|---|---|---|---|---|---|"]
    for name, f in report.items():
        if "gender_balanced_accuracy" in f:  # a group's gender figures, not the age summaries
            lines.append(f"| {name} | {f['faces']} | {f['gender_balanced_accuracy']:.1%} | {f['gender_accuracy_men']:.1%} | {f['gender_accuracy_women']:.1%} | {f['confident_share']:.0%} | {f['confident_accuracy']:.1%} |")
    inside = ", ".join(f"{group} {v['inside']:.0%} of {v['faces']}" for group, v in report["age_group_inside"].items())
    lines += ["", f"Predicted age inside the perceived age group's years: {inside}."]
    if "children_by_eye" in report:  # WIDER's demographics have no group for children
        c = report["children_by_eye"]
        lines += ["", f"Children picked by eye (training/wider_faces_children.txt): {c['read_under_child_age']} of {c['faces']} read as under {CHILD_AGE} years, median age {c['median_age']:.1f}."]
    return lines


def face_loader(dataset, processor, args: argparse.Namespace) -> DataLoader:
    """Cached pixels, ages and genders of a UTKFace split, in batches."""
    pixels = torch.from_numpy(np.array(pixel_cache(dataset, processor, args.cache_dir)))
    return DataLoader(
        TensorDataset(pixels, torch.tensor(dataset["age"], dtype=torch.float32), torch.tensor(dataset["gender"])),
        batch_size=args.batch_size,
    )


def recalibrate(model, processor, validation, args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Set the model folder's age interval scales (one per band of predicted age) from UTKFace's validation split
    and, given real faces, its gender temperature from their validation part, as training does at its end, and
    save them with the `flip_average` they were made with in its config.json: for a model trained before a
    calibration changed, or now read with its mirror image. Returns the validation figures with the new setting,
    which `record_calibrated_figures` writes into metrics.json with the test split's."""
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: --calibrate needs a local model folder; {args.model} has no config.json")
    loader = accelerator.prepare(face_loader(validation, processor, args))
    val_predictions = predict_loader(model, processor, loader, accelerator, widened_crop_filled(processor.face_zoom))
    model.config.age_interval_scale = calibrate_interval_scale(val_predictions, model.config)
    figures = {"validation": score(val_predictions, load_metric())}
    calibrated = {
        "age_interval_scale": model.config.age_interval_scale, "age_interval_bands": model.config.age_interval_bands,
        "flip_average": model.config.flip_average,
    }
    scales = ", ".join(f"{scale:.3f}" for scale in model.config.age_interval_scale)
    print(f"age interval scales {scales} (predicted ages split at {model.config.age_interval_bands})")
    if args.wider_faces or args.lfw_gender:
        real_faces = real_validation_faces(processor, args)
        model.config.gender_temperature = calibrate_gender_temperature(model, processor, real_faces)
        calibrated["gender_temperature"] = model.config.gender_temperature
        figures["real_validation"] = balanced_gender_accuracy(model, processor, real_faces)
        print(f"gender temperature {model.config.gender_temperature} (real faces' validation part)")
    update_json(model_dir / "config.json", lambda config: config.update(calibrated))
    print(f"saved to {model_dir / 'config.json'} (flip_average {model.config.flip_average})")
    return {**figures, **calibrated}


def real_validation_faces(processor, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, genders and `framing_filled` of the real faces' validation part whose gender is known."""
    from training.real_faces import framing_filled, load_real_faces

    faces = load_real_faces(args.wider_faces or None, args.lfw_gender or None, args.cache_dir, verbose=False, zoom=processor.face_zoom)["validation"]
    faces = faces.filter(lambda gender: gender >= 0, input_columns="gender")
    pixels = torch.from_numpy(np.array(pixel_cache(faces, processor, args.cache_dir)))
    return pixels, torch.tensor(faces["gender"]), framing_filled(faces, processor.face_zoom)


def record_calibrated_figures(
    model, processor, splits, predictions: dict[str, np.ndarray], calibrated: dict, args: argparse.Namespace, accelerator: Accelerator
) -> None:
    """Write the recalibrated model's figures into its folder's metrics.json, which its model card is made from:
    validation and real validation (from `recalibrate`), the test split's (from the evaluation's own
    predictions when it evaluated the test split), the calibration and `flip_average`."""
    metrics_file = Path(args.model) / "metrics.json"
    if not metrics_file.is_file():
        return
    if args.split != "test":
        predictions = predict_loader(model, processor, accelerator.prepare(face_loader(splits["test"], processor, args)), accelerator, widened_crop_filled(processor.face_zoom))
    test = {**score(predictions, load_metric()), **interval_report(predictions, model.config)}

    def change(metrics: dict) -> None:
        metrics.update({key: value for key, value in calibrated.items() if key not in ("age_interval_scale", "age_interval_bands")}, test=test)
        metrics.pop("flip_tta", None)  # the name `flip_average` had before it was a setting of the model

    update_json(metrics_file, change)


def update_json(path: Path, change) -> None:
    """Apply `change` to the JSON object in `path` and write it back, leaving every other field as it was."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="model", help="Model folder or Hub id.")
    parser.add_argument("--data", required=True, help="UTKFace folder, UTKFace.tar.gz or Hub dataset id.")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    parser.add_argument("--out", required=True, help="Folder for the report and charts.")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--split_ratios", type=float, nargs=3, default=[0.8, 0.1, 0.1])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--flip_tta", action="store_true",
        help="Average each face with its mirror image (the model's flip_average; saved in its config with --calibrate).",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Weights and activations; bfloat16 is how faces.py runs on CPUs with native bf16.")
    parser.add_argument(
        "--real_photos", default=str(DEFAULT_WIDER_DEV) if DEFAULT_WIDER_DEV.is_dir() else "",
        help="wider-dev folder: also report gender accuracy on the faces the app finds in these real photos ('' to skip).",
    )
    parser.add_argument("--wider_faces", default=str(DEFAULT_WIDER_FACES) if DEFAULT_WIDER_FACES.is_dir() else "", help="wider-faces folder: report on its validation part ('' to skip).")
    parser.add_argument("--lfw_gender", default=str(DEFAULT_LFW_GENDER) if DEFAULT_LFW_GENDER.is_dir() else "", help="lfw-gender folder: report on its validation part ('' to skip).")
    parser.add_argument("--update_card", action="store_true", help="Write the per-group figures into the model's README.md.")
    parser.add_argument(
        "--calibrate", action="store_true",
        help="First recalibrate the model folder's age interval (validation split) and gender temperature (real faces' validation part) and save them in its config.json.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    model = AutoModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(accelerator.device).eval()
    model.config.flip_average = model.config.flip_average or args.flip_tta
    processor = AutoImageProcessor.from_pretrained(args.model)
    splits = load_utkface(args.data, args.cache_dir, tuple(args.split_ratios))
    from datasets import concatenate_datasets

    dataset = concatenate_datasets(list(splits.values())) if args.split == "all" else splits[args.split]
    loader = face_loader(dataset, processor, args)
    calibrated = recalibrate(model, processor, splits["validation"], args, accelerator) if args.calibrate else None
    predictions = predict_loader(model, processor, accelerator.prepare(loader), accelerator, widened_crop_filled(processor.face_zoom))
    if calibrated:
        record_calibrated_figures(model, processor, splits, predictions, calibrated, args, accelerator)
    report = breakdown(predictions, np.asarray(dataset["race"]), load_metric())
    report.update(interval_report(predictions, model.config), age_interval_aim=model.config.age_interval_coverage)
    report.update({"model": str(args.model), "data": str(args.data), "split": args.split, "flip_average": model.config.flip_average, "dtype": args.dtype})
    if args.real_photos:
        faces = tuple(torch.from_numpy(part) for part in real_face_pixels(args.real_photos, processor, args.cache_dir))
        report["real_photos"] = balanced_gender_accuracy(model, processor, faces)
    if args.wider_faces or args.lfw_gender:
        report["real_faces_validation"] = real_faces_report(model, processor, args)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report, f"{args.model} on the {args.split} split"))
    plot_age_errors(predictions, AGE_BANDS, out)
    print(report_markdown(report, f"{args.model} on the {args.split} split"))
    if args.update_card:
        model_dir = Path(args.model)
        results = json.loads((model_dir / "metrics.json").read_text())
        write_model_card(model_dir, results, breakdown=report)
        print(f"updated {model_dir / 'README.md'}")
    return report


if __name__ == "__main__":
    main()
