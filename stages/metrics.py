"""Classification metrics, the confusion matrix and their pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.fsutil import atomic_file


def summary_metrics(
    labels: np.ndarray, probabilities: np.ndarray, top_k: int
) -> dict[str, float]:
    """Return accuracy, top-k accuracy and macro and weighted precision, recall, F1."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    k = min(top_k, probabilities.shape[1])
    top = np.argsort(probabilities, axis=1)[:, -k:]
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        f"top_{top_k}_accuracy": float(
            np.mean([y in row for y, row in zip(labels, top, strict=True)])
        ),
    }
    classes = np.arange(probabilities.shape[1])
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=classes, average=average, zero_division=0
        )
        metrics[f"precision_{average}"] = float(precision)
        metrics[f"recall_{average}"] = float(recall)
        metrics[f"f1_{average}"] = float(f1)
    return metrics


def per_class_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Return precision, recall, F1 and support for each class."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {
            "class": classes,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )


def confusion_counts(
    labels: np.ndarray, predicted: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Return the confusion matrix as a table: rows true class, columns predicted."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=np.arange(len(classes)))
    return pd.DataFrame(matrix, index=classes, columns=classes)


def most_confused(counts: pd.DataFrame, limit: int = 10) -> pd.DataFrame:
    """List the off-diagonal cells with the most errors, largest first."""
    cells = counts.stack().rename("count").reset_index()
    cells.columns = ["true", "predicted", "count"]
    errors = cells[(cells["true"] != cells["predicted"]) & (cells["count"] > 0)]
    return errors.sort_values("count", ascending=False, kind="stable").head(limit)


def shorten(name: str, width: int = 14) -> str:
    """Shorten a label for an axis, keeping its start and end."""
    if len(name) <= width:
        return name
    half = (width - 1) // 2
    return f"{name[:half]}…{name[-(width - 1 - half) :]}"


def _draw_matrix(
    ax, values: np.ndarray, labels: list[str], title: str, fmt: str
) -> None:
    n = len(labels)
    font = max(3.0, min(10.0, 220.0 / max(n, 1)))
    image = ax.imshow(values, cmap="Blues", vmin=0)
    ax.set_title(title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ticks = np.arange(n)
    shown = [shorten(label) for label in labels]
    ax.set_xticks(ticks, shown, fontsize=font, rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, shown, fontsize=font)
    if n <= 30:
        threshold = values.max() / 2 if values.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if values[i, j] > threshold else "black"
                ax.text(
                    j,
                    i,
                    format(values[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=font * 0.8,
                    color=color,
                )
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_confusion(counts: pd.DataFrame, target: Path) -> None:
    """Save counts and row-normalised confusion matrices side by side as a PNG.

    Label size, tick rotation and cell annotations adapt to the number of
    classes, so the picture stays readable from 2 to a few hundred classes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = counts.to_numpy()
    totals = values.sum(axis=1, keepdims=True)
    normalised = np.divide(values, totals, out=np.zeros(values.shape), where=totals > 0)
    side = min(30.0, max(5.0, 0.25 * len(counts) + 3))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    labels = [str(c) for c in counts.index]
    _draw_matrix(axes[0], values, labels, "Confusion matrix (counts)", "d")
    _draw_matrix(axes[1], normalised, labels, "Normalised by true class", ".2f")
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
