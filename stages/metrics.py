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
    plt = _pyplot()
    values = counts.to_numpy()
    totals = values.sum(axis=1, keepdims=True)
    normalised = np.divide(values, totals, out=np.zeros(values.shape), where=totals > 0)
    side = min(30.0, max(5.0, 0.25 * len(counts) + 3))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    labels = [str(c) for c in counts.index]
    _draw_matrix(axes[0], values, labels, "Confusion matrix (counts)", "d")
    _draw_matrix(axes[1], normalised, labels, "Normalised by true class", ".2f")
    fig.tight_layout()
    _save(fig, target)


def normalised_confusion(counts: pd.DataFrame) -> pd.DataFrame:
    """Divide each row of the confusion matrix by its true-class total."""
    totals = counts.sum(axis=1).replace(0, 1)
    return counts.div(totals, axis=0)


def one_vs_rest_curves(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Compute one-vs-rest ROC and precision-recall curves and their areas.

    Returns:
        A long table (curve, class, x, y) and the areas: `roc_auc.<class>`,
        `pr_auc.<class>` (average precision) and their macro means. A class
        absent from `labels` has no curve and no area.
    """
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    rows, areas = [], {}
    for index, name in enumerate(classes):
        truth = labels == index
        if truth.all() or not truth.any():
            continue
        scores = probabilities[:, index]
        fpr, tpr, _ = roc_curve(truth, scores)
        precision, recall, _ = precision_recall_curve(truth, scores)
        rows += [("roc", name, x, y) for x, y in zip(fpr, tpr, strict=True)]
        rows += [("pr", name, x, y) for x, y in zip(recall, precision, strict=True)]
        areas[f"roc_auc.{name}"] = float(roc_auc_score(truth, scores))
        areas[f"pr_auc.{name}"] = float(average_precision_score(truth, scores))
    for kind in ("roc_auc", "pr_auc"):
        values = [v for k, v in areas.items() if k.startswith(f"{kind}.")]
        if values:
            areas[f"{kind}_macro"] = float(np.mean(values))
    return pd.DataFrame(rows, columns=["curve", "class", "x", "y"]), areas


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: Path) -> None:
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)


def plot_curves(curves: pd.DataFrame, areas: dict[str, float], target: Path) -> None:
    """Save ROC and precision-recall curves side by side; the legend lists at
    most 20 classes, with their areas under the curve."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    names = list(dict.fromkeys(curves["class"]))
    for ax, kind, title, labels in (
        (
            axes[0],
            "roc",
            "ROC (one vs rest)",
            ("false positive rate", "true positive rate"),
        ),
        (axes[1], "pr", "Precision-recall (one vs rest)", ("recall", "precision")),
    ):
        for name in names:
            part = curves[(curves["curve"] == kind) & (curves["class"] == name)]
            area = areas.get(f"{kind}_auc.{name}", float("nan"))
            show = len(names) <= 20
            ax.plot(
                part["x"],
                part["y"],
                lw=1,
                label=f"{shorten(name)} ({area:.3f})" if show else None,
            )
        macro = areas.get(f"{kind}_auc_macro", float("nan"))
        ax.set_title(f"{title}, macro AUC {macro:.3f}")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if len(names) <= 20:
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    _save(fig, target)


def plot_misclassified(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    target: Path,
    limit: int = 36,
) -> int:
    """Save a grid of the most confident mistakes with true and predicted labels.

    Returns:
        The number of images shown (0 writes a picture that says so).
    """
    plt = _pyplot()
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:limit]
    columns = max(1, min(6, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center")
    for ax, i in zip(axes.flat, wrong, strict=False):
        picture = images[i]
        ax.imshow(
            picture[..., 0] if picture.shape[-1] == 1 else picture,
            cmap="gray",
            vmin=0,
            vmax=255,
        )
        confidence = probabilities[i, predicted[i]]
        true_name = shorten(classes[labels[i]], 10)
        predicted_name = shorten(classes[predicted[i]], 10)
        title = f"true {true_name}\npred {predicted_name} ({confidence:.2f})"
        ax.set_title(title, fontsize=8)
    fig.suptitle("Misclassified test images, most confident first")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, target)
    return len(wrong)


def plot_history(history: pd.DataFrame, target: Path) -> None:
    """Save loss, accuracy and learning rate per epoch as three panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", None))
    for ax, (metric, suffix) in zip(axes, panels, strict=True):
        names = [f"train_{suffix}", f"val_{suffix}"] if suffix else [metric]
        for name in names:
            if name in history:
                ax.plot(history["epoch"], history[name], marker=".", label=name)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", " "))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend()
    fig.tight_layout()
    _save(fig, target)
