"""Classification metrics, the confusion matrix and their pictures."""

from __future__ import annotations

import logging
import math
import re
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from stages.fsutil import atomic_file

log = logging.getLogger(__name__)

_MISSING_GLYPH = re.compile(r"Glyph \d+ \((.*)\) missing from font\(s\) (.*)\.")


def _glyph_character(text: str) -> str:
    """Return the character that matplotlib names as `\\N{NAME}` or as itself."""
    named = re.fullmatch(r"\\N\{(.+)\}", text)
    if named is None:
        return text
    try:
        return unicodedata.lookup(named.group(1))
    except KeyError:
        return text


@contextmanager
def missing_glyphs_summarised(source: str) -> Iterator[None]:
    """Replace matplotlib's warning per character that its font lacks with
    one log line that names `source` and the characters, which show as boxes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing: dict[str, None] = {}
    fonts: dict[str, None] = {}
    for warning in caught:
        found = _MISSING_GLYPH.fullmatch(str(warning.message))
        if found:
            missing[_glyph_character(found.group(1))] = None
            fonts[found.group(2)] = None
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    if missing:
        log.warning(
            "%s: %d characters of the class names are not in the font (%s) and "
            "show as boxes: %s",
            source,
            len(missing),
            ", ".join(fonts),
            " ".join(list(missing)[:20]) + (" ..." if len(missing) > 20 else ""),
        )


# Class names on axes and in legends are shortened to this many characters.
MAX_LABEL_CHARS = 14
# Font sizes in points for confusion-matrix labels and cell values. In the
# 100 dpi PNG, 6 pt text is about 8 pixels high.
MIN_FONT_SIZE = 6.0
MAX_FONT_SIZE = 10.0
# Room for one tick label along its axis, as a multiple of its font size.
# A text box in DejaVu Sans, matplotlib's default font, is 1.0 to 1.08 font
# sizes high, so the rest is the gap between neighbouring labels.
LABEL_SPACING = 1.3
# Cell values are written for up to this many classes, at most this fraction
# of the label font size, and no wider than this fraction of a cell.
MAX_ANNOTATED_CLASSES = 30
ANNOTATION_SCALE = 0.8
CELL_FILL = 0.9


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


def shorten(name: str, width: int = MAX_LABEL_CHARS) -> str:
    """Shorten a label for an axis, keeping its start and end.

    The name is first put in Unicode normal form NFC, so an accented letter
    typed as a letter and a combining mark counts as one character.
    """
    name = unicodedata.normalize("NFC", name)
    if len(name) <= width:
        return name
    half = (width - 1) // 2
    return f"{name[:half]}…{name[-(width - 1 - half) :]}"


def text_width(text: str, font_size: float) -> float:
    """Return the width in points of `text` in matplotlib's default font."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(
        text, FontProperties(size=font_size), ismath=False
    )
    return width


def tick_layout(pitch: float) -> tuple[float, int]:
    """Choose the tick label font size and the step between labelled classes.

    Args:
        pitch: distance in points between the centres of neighbouring cells.

    Returns:
        The font size in points, between MIN_FONT_SIZE and MAX_FONT_SIZE,
        and the step: 1 labels every class, 2 every second class, and so on
        when even MIN_FONT_SIZE does not fit one label per cell.
    """
    font_size = min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, pitch / LABEL_SPACING))
    # The tolerance keeps rounding error from halving the labels at the limit.
    step = math.ceil(font_size * LABEL_SPACING / pitch - 1e-9)
    return font_size, max(step, 1)


def _cell_pitch(ax) -> float:
    """Return the distance in points between neighbouring cells of an image."""
    ax.apply_aspect()
    height = ax.get_position().height * ax.figure.get_figheight() * 72
    bottom, top = ax.get_ylim()
    return height / abs(bottom - top)


def _label_ticks(
    ax, labels: list[str], font_size: float, step: int, rotation: float | None
) -> None:
    """Label every `step`-th row and column of a matrix image.

    With `rotation` None, the column labels stay horizontal when the widest
    one fits between its neighbours, and are turned upright otherwise.
    """
    ticks = np.arange(0, len(labels), step)
    tick_labels = [labels[i] for i in ticks]
    if rotation is None:
        widths = [text_width(label, font_size) for label in tick_labels]
        fits = max(widths, default=0) * LABEL_SPACING <= _cell_pitch(ax) * step
        rotation = 0 if fits else 90
    ax.set_xticks(ticks, tick_labels, fontsize=font_size, rotation=rotation)
    ax.set_yticks(ticks, tick_labels, fontsize=font_size)
    if step > 1:
        ax.set_xlabel(f"predicted (one label per {step} classes)")
        ax.set_ylabel(f"true (one label per {step} classes)")


def _annotate_cells(ax, values: np.ndarray, fmt: str, font_size: float) -> None:
    """Write each value in its cell, in a font that fits the cell width.

    Matrices over MAX_ANNOTATED_CLASSES rows, or whose widest value would
    need a font under MIN_FONT_SIZE, are left without numbers.
    """
    n = len(values)
    if n > MAX_ANNOTATED_CLASSES or not values.size:
        return
    texts = [[format(value, fmt) for value in row] for row in values]
    widest = max(text_width(text, 1.0) for row in texts for text in row)
    size = min(ANNOTATION_SCALE * font_size, CELL_FILL * _cell_pitch(ax) / widest)
    if size < MIN_FONT_SIZE:
        return
    threshold = values.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                texts[i][j],
                ha="center",
                va="center",
                fontsize=size,
                color="white" if values[i, j] > threshold else "black",
                in_layout=False,  # inside its cell, so tight_layout can skip it
            )


def confusion_figure(counts: pd.DataFrame):
    """Draw counts and row-normalised confusion matrices side by side.

    Tick labels are shortened to MAX_LABEL_CHARS characters. Their font size
    and the rotation of the column labels follow the cell size, so that
    neighbouring labels do not overlap and no font is under MIN_FONT_SIZE.
    The figure stops growing at 30 inches high, so from about 250 classes
    only every second (or third, and so on) class gets a label.

    NOTE: DejaVu Sans, matplotlib's default font, has no Chinese, Japanese or
    Devanagari glyphs, so such class names show as empty boxes.

    Returns:
        The matplotlib figure, which the caller closes.
    """
    plt = _pyplot()
    values = counts.to_numpy()
    totals = values.sum(axis=1, keepdims=True)
    normalised = np.divide(values, totals, out=np.zeros(values.shape), where=totals > 0)
    panels = (
        (values, "Confusion matrix (counts)", "d"),
        (normalised, "Normalised by true class", ".2f"),
    )
    labels = [shorten(str(name)) for name in counts.index]
    side = min(30.0, max(5.0, 0.25 * len(labels) + 3))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, (matrix, title, _) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap="Blues", vmin=0)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        # The largest labels, upright, leave the least room for the cells.
        _label_ticks(ax, labels, MAX_FONT_SIZE, step=1, rotation=90)

    # Size the labels to the cells of this layout. Smaller labels only give
    # the cells more room in the final layout, so the labels still fit there.
    fig.tight_layout()
    for ax, (matrix, _, fmt) in zip(axes, panels, strict=True):
        font_size, step = tick_layout(_cell_pitch(ax))
        _label_ticks(ax, labels, font_size, step, rotation=None)
        _annotate_cells(ax, matrix, fmt, font_size)
    fig.tight_layout()
    return fig


def plot_confusion(counts: pd.DataFrame, target: Path) -> None:
    """Save counts and row-normalised confusion matrices side by side as a PNG.

    See `confusion_figure` for how the labels adapt to the number of classes.
    """
    _save(confusion_figure(counts), target)


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
