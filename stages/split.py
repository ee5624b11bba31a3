"""Stage split: assign every processed image to train, val or test.

Reads params: split. Reads: data/processed/index.csv. Writes: data/split/
(train.csv, val.csv, test.csv manifests, label_conflicts.csv),
metrics/class_distribution.csv and plots/class_distribution.png.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from stages.cli import InputError, run_stage
from stages.config import load_params
from stages.fsutil import atomic_dir, atomic_file
from stages.metrics import missing_glyphs_summarised
from stages.splitting import (
    SPLITS,
    assign_splits,
    class_distribution,
    duplicate_groups,
    missing_splits,
)

log = logging.getLogger("stages.split")

PROCESSED_DIR = Path("data/processed")
SPLIT_DIR = Path("data/split")
DISTRIBUTION_FILE = Path("metrics/class_distribution.csv")
DISTRIBUTION_PLOT = Path("plots/class_distribution.png")


def plot_distribution(table: pd.DataFrame, target: Path) -> None:
    """Save a grouped bar chart of images per class and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.0, 0.35 * len(table))
    fig, ax = plt.subplots(figsize=(min(width, 40.0), 4.0))
    table.set_index("label")[list(SPLITS)].plot.bar(ax=ax, stacked=True)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title("Images per class and split")
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def handle_label_conflicts(
    index: pd.DataFrame, conflicts: pd.DataFrame, policy: str, index_file: Path
) -> pd.DataFrame:
    """Apply split.label_conflicts to identical images with different labels.

    Returns:
        The index rows to split: without the conflicting images under "drop".

    Raises:
        InputError: under "fail", naming one conflict.
    """
    if conflicts.empty:
        return index
    first = conflicts[conflicts["sha256"] == conflicts["sha256"].iloc[0]]
    example = " and ".join(
        f"{file!r} ({label!r})"
        for file, label in zip(first["file"], first["label"], strict=True)
    )
    groups = conflicts["sha256"].nunique()
    if policy == "fail":
        raise InputError(
            f"{index_file}: {len(conflicts)} images in {groups} groups are "
            f"identical but labelled differently, e.g. {example}; fix their "
            "labels, or set split.label_conflicts=drop (leave them out) or keep"
        )
    action = "left out of every split" if policy == "drop" else "kept"
    log.warning(
        "%d images in %d groups are identical but labelled differently, e.g. %s; "
        "%s (split.label_conflicts=%s), listed in label_conflicts.csv",
        len(conflicts),
        groups,
        example,
        action,
        policy,
    )
    if policy == "drop":
        return index[~index["sha256"].isin(conflicts["sha256"])]
    return index


def split(
    overrides: list[str],
    processed_dir: Path = PROCESSED_DIR,
    output: Path = SPLIT_DIR,
    distribution_file: Path = DISTRIBUTION_FILE,
    distribution_plot: Path = DISTRIBUTION_PLOT,
) -> dict[str, int]:
    """Write the split manifests and return the number of images per split."""
    cfg = load_params(["split"], overrides).split
    index_file = processed_dir / "index.csv"
    if not index_file.is_file():
        raise InputError(f"{index_file} not found; run the preprocess stage first")
    index = pd.read_csv(
        index_file, dtype={"label": str, "sha256": str}, keep_default_na=False
    )
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    log.info(
        "Splitting %d images with fractions %s, seed %d",
        len(index),
        fractions,
        cfg.seed,
    )

    duplicated, conflicts = duplicate_groups(index)
    if duplicated:
        log.warning(
            "%d images are exact duplicates of another; each group shares one split",
            duplicated,
        )
    index = handle_label_conflicts(index, conflicts, cfg.label_conflicts, index_file)
    assigned = assign_splits(index, fractions, cfg.seed)
    for label, splits in missing_splits(index, assigned, fractions).items():
        log.warning(
            "Class '%s' has too few images for every split; none in %s",
            label,
            ", ".join(splits),
        )

    counts = {}
    with atomic_dir(output) as tmp:
        for name in SPLITS:
            rows = index[assigned == name]
            rows.to_csv(tmp / f"{name}.csv", index=False)
            counts[name] = len(rows)
        conflicts.to_csv(tmp / "label_conflicts.csv", index=False)
    table = class_distribution(index, assigned)
    with atomic_file(distribution_file) as tmp:
        table.to_csv(tmp, index=False)
    with missing_glyphs_summarised(str(distribution_plot)):
        plot_distribution(table, distribution_plot)
    log.info("Wrote %s to %s", ", ".join(f"{n} {k}" for k, n in counts.items()), output)
    return counts


if __name__ == "__main__":
    run_stage(split, __doc__)
