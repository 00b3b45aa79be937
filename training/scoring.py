"""Predictions over cached pixels and the project's metrics, shared by training and evaluation."""

from __future__ import annotations

import copy
from pathlib import Path

import evaluate
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling.configuration_age_gender import AgeGenderConfig
from modeling.modeling_age_gender import age_interval_bounds, age_statistics, summarize_predictions

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "age_gender")


def load_metric() -> evaluate.EvaluationModule:
    """The local `age_gender` evaluate module: it needs no network."""
    return evaluate.load(METRIC_PATH)


@torch.inference_mode()
def face_distributions(
    model, processor, pixels: torch.Tensor, flip_tta: bool = False, framing_filled: torch.Tensor | bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Age and gender distributions for uint8 `(N, H, W, 3)` faces; with `flip_tta` the mirror image is
    predicted too and the two averaged, unless the model reads it already (`flip_average`: a shipped model as
    a teacher), which would only read every face twice over. `framing_filled` (per face, or one bool for all)
    is passed to the model (`AgeGenderModel.forward`)."""
    pixels = pixels.permute(0, 3, 1, 2)
    views = [pixels, pixels.flip(-1)] if flip_tta and not model.config.flip_average else [pixels]
    filled = None if framing_filled is None else torch.as_tensor(framing_filled, dtype=torch.bool).expand(len(pixels))
    outputs = [model(pixel_values=processor.normalize_batch(view), framing_filled=filled) for view in views]
    age_probs = torch.stack([o.age_logits.softmax(-1) for o in outputs]).mean(0)
    gender_probs = torch.stack([model.gender_probabilities(o.gender_logits) for o in outputs]).mean(0)
    return age_probs, gender_probs


def predict_batch(model, processor, pixels: torch.Tensor, framing_filled: bool | None = None) -> dict[str, torch.Tensor]:
    """Age, age spread and gender probabilities for uint8 `(N, H, W, 3)` faces (see `face_distributions`)."""
    return summarize_predictions(*face_distributions(model, processor, pixels, framing_filled=framing_filled), model.config)


def predict_distributions(
    model, processor, faces: torch.Tensor, flip_tta: bool = False, batch_size: int = 512, framing_filled: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`face_distributions` of many faces in batches on the model's device, returned on the CPU."""
    model.eval()
    parts = [
        face_distributions(model, processor, faces[i : i + batch_size].to(model.device), flip_tta, None if framing_filled is None else framing_filled[i : i + batch_size])
        for i in range(0, len(faces), batch_size)
    ]
    return torch.cat([age.cpu() for age, _ in parts]), torch.cat([gender.cpu() for _, gender in parts])


def predict_loader(model, processor, loader: DataLoader, accelerator, framing_filled: bool | None = None) -> dict[str, np.ndarray]:
    """Predictions and labels for every item of a (prepared) loader, gathered across processes; `framing_filled`
    holds for every face (UTKFace's crops: `faces.alignment.widened_crop_filled`)."""
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    for pixels, age, gender in tqdm(loader, desc="Predicting", leave=False, disable=not accelerator.is_local_main_process):
        prediction = predict_batch(model, processor, pixels, framing_filled)
        batch = {
            "age_pred": prediction["age"],
            "age_std": prediction["age_std"],
            "gender_pred": prediction["gender_id"],
            "gender_score": prediction["gender_score"],
            "age_true": age,
            "gender_true": gender,
        }
        for key, value in accelerator.gather_for_metrics(batch).items():
            collected.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(values) for key, values in collected.items()}


def score(predictions: dict[str, np.ndarray], metric: evaluate.EvaluationModule | None = None) -> dict[str, float]:
    """Age MAE, CS@5 and gender accuracy of gathered predictions."""
    metric = metric or load_metric()
    return metric.compute(
        age_predictions=predictions["age_pred"],
        age_references=predictions["age_true"],
        gender_predictions=predictions["gender_pred"].astype(int),
        gender_references=predictions["gender_true"].astype(int),
    )


def interval_coverage(predictions: dict[str, np.ndarray], config: AgeGenderConfig) -> float:
    """Share of true ages inside the age interval as it is reported: whole-year bounds from `config`."""
    low, high = age_interval_bounds(torch.from_numpy(predictions["age_pred"]), torch.from_numpy(predictions["age_std"]), config)
    true_age = torch.from_numpy(predictions["age_true"])
    return float(((true_age >= low) & (true_age <= high)).float().mean())


def calibrate_interval_scale(predictions: dict[str, np.ndarray], config: AgeGenderConfig, min_faces: int = 50) -> list[float]:
    """One scale per band of predicted age (`config.age_interval_bands`): the smallest multiple of the predicted
    spread whose interval, rounded out to whole years as it is reported, holds `config.age_interval_coverage`
    of the true ages of that band's faces. Per band because one scale for all held 97% for faces predicted
    under 10 and 70-74% for those over 30; bands with fewer than `min_faces` faces take the scale of all faces."""
    overall = smallest_covering_scale(predictions, config)
    return [
        smallest_covering_scale(band, config) if len(band["age_true"]) >= min_faces else overall
        for band in split_by_predicted_age(predictions, config).values()
    ]


def split_by_predicted_age(predictions: dict[str, np.ndarray], config: AgeGenderConfig) -> dict[str, dict[str, np.ndarray]]:
    """The predictions of each band of predicted age (`config.age_interval_bands`, bucketed as the model's
    `interval_scale` does), named "0-9", "10-29", ..., "50+"; empty bands included."""
    edges = [0, *config.age_interval_bands, None]
    bands = np.digitize(predictions["age_pred"], config.age_interval_bands)
    return {
        f"{low}-{high - 1}" if high is not None else f"{low}+": {k: v[bands == band] for k, v in predictions.items()}
        for band, (low, high) in enumerate(zip(edges[:-1], edges[1:]))
    }


def smallest_covering_scale(predictions: dict[str, np.ndarray], config: AgeGenderConfig) -> float:
    """The smallest single scale whose rounded-out interval holds `config.age_interval_coverage` of the true
    ages of n faces, counted as split conformal prediction does (ceil((n + 1) x coverage) of them), so that the
    interval holds the aimed share of new faces like them. Rounding widens every interval by up to a year on
    each side, so the plain quantile of |error| / spread over-covers (82.4% of test ages for an 80% aim with the
    session-5 model); the search goes through `age_interval_bounds` itself."""
    count = len(predictions["age_true"])
    aim = min(1.0, np.ceil((count + 1) * config.age_interval_coverage) / count)
    trial = copy.copy(config)
    ratios = np.abs(predictions["age_true"] - predictions["age_pred"]) / np.maximum(predictions["age_std"], 1e-6)
    low, high = 0.0, float(ratios.max()) + 1.0  # coverage is 1 at `high` and never falls as the scale grows
    for _ in range(40):
        trial.age_interval_scale = (low + high) / 2
        if interval_coverage(predictions, trial) >= aim - 1e-9:
            high = trial.age_interval_scale
        else:
            low = trial.age_interval_scale
    return high


def coverage_by_predicted_age(predictions: dict[str, np.ndarray], config: AgeGenderConfig) -> dict[str, dict]:
    """The interval's coverage among the faces of each band of predicted age: what a user who reads "55
    (47-62)" may expect of it."""
    return {
        name: {"faces": len(band["age_true"]), "coverage": interval_coverage(band, config)}
        for name, band in split_by_predicted_age(predictions, config).items()
        if len(band["age_true"])
    }


def interval_report(predictions: dict[str, np.ndarray], config: AgeGenderConfig) -> dict:
    """The interval's coverage in all and by band of predicted age, as metrics.json and reports record it."""
    return {"age_interval_coverage": interval_coverage(predictions, config), "age_interval_by_predicted_age": coverage_by_predicted_age(predictions, config)}


def balanced_gender_accuracy(model, processor, faces: tuple[torch.Tensor, ...] | None) -> dict[str, float] | None:
    """Gender accuracy of real faces `(pixels, genders[, framing_filled])`: for women, for men, their mean
    (balanced: real photos hold twice as many men, and the errors gather on women) and over all faces; None
    without faces."""
    if faces is None or not len(faces[1]):
        return None
    age_probs, gender_probs = predict_distributions(model, processor, faces[0], framing_filled=filled_flags(faces))
    return gender_figures(gender_probs, faces[1], age_statistics(age_probs, model.config.min_age)[0])


def filled_flags(faces: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The `framing_filled` flags of a `(pixels, genders[, framing_filled])` tuple, if it has them."""
    return faces[2] if len(faces) > 2 else None


def gender_figures(gender_probs: torch.Tensor, genders: torch.Tensor, ages: torch.Tensor) -> dict[str, float]:
    """Accuracy over all faces, for men, for women and balanced (their mean), and how the labels' "?" rule
    (`faces.analysis.gender_is_guess`, from the gender's confidence and the face's estimated age `ages`) fares:
    the share of faces shown without "?" and how often those are right."""
    from faces.analysis import gender_is_guess

    right = gender_probs.argmax(-1) == genders
    men, women = right[genders == 0].float().mean().item(), right[genders == 1].float().mean().item()
    sure = ~gender_is_guess(gender_probs.max(-1).values, ages)
    return {
        "gender_accuracy": right.float().mean().item(), "gender_balanced_accuracy": (men + women) / 2,
        "gender_accuracy_men": men, "gender_accuracy_women": women, "faces": int(len(genders)),
        "confident_share": sure.float().mean().item(), "confident_accuracy": right[sure].float().mean().item() if sure.any() else float("nan"),
    }


def calibrate_gender_temperature(model, processor, faces: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The temperature that, dividing the gender logits, minimises the negative log-likelihood of the real
    faces' genders (Guo et al., "On Calibration of Modern Neural Networks", 2017): UTKFace-trained confidences
    ran high on real photos (a face shown at 85% was right 80% of the time). Accuracy is unchanged."""
    pixels, genders = faces[:2]
    saved = model.config.gender_temperature
    model.config.gender_temperature = 1.0
    try:
        _, gender_probs = predict_distributions(model, processor, pixels, framing_filled=filled_flags(faces))
    finally:
        model.config.gender_temperature = saved
    log_probs = gender_probs.clamp_min(1e-7).log()  # logits up to a constant per face, which softmax ignores
    temperatures = torch.linspace(0.5, 4.0, 351)
    losses = [torch.nn.functional.cross_entropy(log_probs / t, genders.long()).item() for t in temperatures]
    return round(float(temperatures[int(np.argmin(losses))]), 3)
