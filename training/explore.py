"""Explore UTKFace: a summary per split and charts.

    python -m training.explore --data ../shared/datasets/UTKFace.tar.gz --out explore

Prints counts, age statistics and gender and race balance per split, and writes to --out: age_histogram.png,
gender_counts.png, race_counts.png, age_by_gender.png and sample_faces.png. The last shows UTKFace images,
which may never be committed: keep --out in a git-ignored folder (`explore/` is).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from datasets import DatasetDict  # noqa: E402

from training.data import GENDER_NAMES, RACE_NAMES, load_utkface  # noqa: E402


def split_summary(splits: DatasetDict) -> str:
    """Counts, age statistics, gender and race balance per split."""
    lines = []
    for name, dataset in splits.items():
        ages = np.asarray(dataset["age"])
        genders = np.bincount(dataset["gender"], minlength=len(GENDER_NAMES))
        races = np.bincount(dataset["race"], minlength=len(RACE_NAMES))
        lines.append(f"[{name}] {len(dataset):,} faces")
        if len(dataset):
            lines.append(
                f"  age: mean {ages.mean():.1f}, median {np.median(ages):.0f}, std {ages.std():.1f}, "
                f"min {ages.min()}, max {ages.max()}"
            )
        lines.append("  gender: " + ", ".join(f"{g} {c:,} ({c / max(len(dataset), 1):.1%})" for g, c in zip(GENDER_NAMES, genders)))
        lines.append("  race: " + ", ".join(f"{r} {c:,} ({c / max(len(dataset), 1):.1%})" for r, c in zip(RACE_NAMES, races)))
    return "\n".join(lines)


def save_bar_chart(labels: list[str], by_split: dict[str, np.ndarray], title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(by_split), 1)
    for i, (split, counts) in enumerate(by_split.items()):
        axis.bar(np.arange(len(labels)) + i * width, counts, width, label=split)
    axis.set_xticks(np.arange(len(labels)) + width * (len(by_split) - 1) / 2, labels)
    axis.set(title=title, ylabel="faces")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_charts(splits: DatasetDict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    ages = {name: np.asarray(d["age"]) for name, d in splits.items()}
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.hist(list(ages.values()), bins=range(0, 118, 2), stacked=True, label=list(ages))
    axis.set(title="Age histogram", xlabel="age", ylabel="faces")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "age_histogram.png", dpi=100)
    plt.close(figure)

    save_bar_chart(GENDER_NAMES, {n: np.bincount(d["gender"], minlength=2) for n, d in splits.items()}, "Gender", out / "gender_counts.png")
    save_bar_chart(RACE_NAMES, {n: np.bincount(d["race"], minlength=len(RACE_NAMES)) for n, d in splits.items()}, "Race", out / "race_counts.png")

    every = {k: np.concatenate([np.asarray(d[k]) for d in splits.values()]) for k in ("age", "gender")}
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.hist([every["age"][every["gender"] == g] for g in range(2)], bins=range(0, 118, 2), label=GENDER_NAMES, alpha=0.7, histtype="stepfilled")
    axis.set(title="Age by gender", xlabel="age", ylabel="faces")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "age_by_gender.png", dpi=100)
    plt.close(figure)
    write_sample_grid(splits["train"], out / "sample_faces.png")
    return sorted(out.glob("*.png"))


def write_sample_grid(dataset, path: Path, rows: int = 4, columns: int = 6, seed: int = 0) -> None:
    """Random faces with their labels (UTKFace images: never commit this file)."""
    picks = np.random.default_rng(seed).choice(len(dataset), size=min(rows * columns, len(dataset)), replace=False)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 2.1))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, index in zip(np.ravel(axes), picks):
        row = dataset[int(index)]
        axis.imshow(row["image"])
        axis.set_title(f"{row['age']} {GENDER_NAMES[row['gender']][0].upper()} {RACE_NAMES[row['race']]}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="UTKFace folder, UTKFace.tar.gz or Hub dataset id.")
    parser.add_argument("--out", default="explore", help="Folder for the charts (git-ignored by default).")
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args(argv)
    splits = load_utkface(args.data, args.cache_dir)
    print(split_summary(splits))
    for path in write_charts(splits, Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
