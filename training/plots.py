"""Charts of training and evaluation figures (numbers only: never images from the dataset)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss, age MAE and gender accuracy per epoch, train against validation."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (key, title) in zip(axes, [("loss", "loss"), ("age_mae", "age MAE (years)"), ("gender_accuracy", "gender accuracy")]):
        for split in ("train", "val"):
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in history if f"{split}_{key}" in r]
            if points:
                axis.plot(*zip(*points), marker="o", label="train" if split == "train" else "validation")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_age_errors(predictions: dict, age_bands: list[tuple[int, int]], out: Path) -> None:
    """Predicted against true age (a 2-D histogram, so no face is shown) and MAE per age band."""
    true, predicted = predictions["age_true"], predictions["age_pred"]
    figure, axis = plt.subplots(figsize=(6, 6))
    counts = axis.hist2d(true, predicted, bins=[range(0, 118, 3)] * 2, cmap="viridis", cmin=1)
    figure.colorbar(counts[3], ax=axis, label="faces")
    axis.plot([0, 116], [0, 116], color="white", linestyle="--", linewidth=1)
    axis.set(xlabel="true age", ylabel="predicted age", title="Predicted against true age")
    figure.tight_layout()
    figure.savefig(out / "predicted_vs_true_age.png", dpi=100)
    plt.close(figure)

    names, maes, counts = [], [], []
    for low, high in age_bands:
        mask = (true >= low) & (true <= high)
        if mask.any():
            names.append(f"{low}+" if high >= 200 else f"{low}-{high}")
            maes.append(float(abs(predicted[mask] - true[mask]).mean()))
            counts.append(int(mask.sum()))
    figure, axis = plt.subplots(figsize=(8, 4))
    bars = axis.bar(names, maes, color="tab:blue")
    for bar, count in zip(bars, counts):
        axis.annotate(f"n={count}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axis.set(xlabel="true age band", ylabel="MAE (years)", title="Age error by age band")
    figure.tight_layout()
    figure.savefig(out / "mae_by_age.png", dpi=100)
    plt.close(figure)
