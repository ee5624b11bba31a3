"""Stratified, seeded and stable train/val/test assignment.

Each image's split follows from a hash of its content and the seed alone, so
adding images never moves an image that was already assigned, and exact
duplicates always land in the same split. Within each class the split sizes
follow the configured fractions up to sampling noise. A class that would get
no image in a split receives the image whose hash lies nearest to it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def hash_position(sha256: str, seed: int) -> float:
    """Map an image's content hash and the seed to a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _fill_empty_splits(
    index: pd.DataFrame,
    rows: pd.Index,
    positions: pd.Series,
    assigned: pd.Series,
    bounds: dict[str, tuple[float, float]],
) -> None:
    """Give one class an image in each split it lacks, while it has images to spare.

    The image moved is the one whose hash position is nearest to the empty
    split's interval, taken from a split that keeps at least one image; its
    duplicates move with it. Splits are filled in the order train, test, val.
    """
    # Filled in this order, so a class of two images gets train and test.
    to_fill = [s for s in ("train", "test", "val") if bounds[s][1] > bounds[s][0]]
    for split in to_fill:
        current = assigned[rows]
        if (current == split).any():
            continue
        counts = current.value_counts()
        donors = current[current.map(counts) > 1].index
        if donors.empty:
            return
        low, high = bounds[split]
        chosen = (positions[donors] - (low + high) / 2).abs().idxmin()
        assigned[index["sha256"] == index.at[chosen, "sha256"]] = split


def assign_splits(
    index: pd.DataFrame, fractions: dict[str, float], seed: int
) -> pd.Series:
    """Return the split name ("train", "val" or "test") of every row of `index`."""
    edges = np.cumsum([0.0] + [fractions[s] for s in SPLITS])
    bounds = {s: (edges[i], edges[i + 1]) for i, s in enumerate(SPLITS)}
    positions = index["sha256"].map(lambda h: hash_position(h, seed))
    slot = np.searchsorted(edges[1:-1], positions.to_numpy(), side="right")
    assigned = pd.Series(np.array(SPLITS)[slot], index=index.index)
    for _, rows in index.groupby("label"):
        _fill_empty_splits(index, rows.index, positions, assigned, bounds)
    check_disjoint(index, assigned)
    return assigned


def check_disjoint(index: pd.DataFrame, assigned: pd.Series) -> None:
    """Raise if any content hash appears in more than one split."""
    spread = assigned.groupby(index["sha256"]).nunique()
    leaked = spread[spread > 1]
    if len(leaked):
        raise RuntimeError(
            f"{len(leaked)} images appear in several splits, e.g. {leaked.index[0]}"
        )


def class_distribution(index: pd.DataFrame, assigned: pd.Series) -> pd.DataFrame:
    """Count images per class (rows) and split (columns)."""
    table = pd.crosstab(index["label"], assigned).reindex(
        columns=list(SPLITS), fill_value=0
    )
    return table.rename_axis(index="label", columns=None).reset_index()


def duplicate_groups(index: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """Count duplicated images and list hashes that carry more than one label."""
    duplicated = int(index["sha256"].duplicated().sum())
    labels = index.groupby("sha256")["label"].nunique()
    conflicts = index[index["sha256"].isin(labels[labels > 1].index)]
    return duplicated, conflicts.sort_values(["sha256", "label"])[
        ["sha256", "file", "label"]
    ]


def missing_splits(
    index: pd.DataFrame, assigned: pd.Series, fractions: dict[str, float]
) -> dict[str, list[str]]:
    """Name, per class, the splits with a non-zero fraction that got no image."""
    nonempty = [s for s in SPLITS if fractions[s] > 0]
    present = assigned.groupby(index["label"]).agg(set)
    return {
        label: [s for s in nonempty if s not in splits]
        for label, splits in present.items()
        if any(s not in splits for s in nonempty)
    }
