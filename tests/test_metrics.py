"""Confusion-matrix pictures: legible labels from 2 to 300 classes.

Each figure is rendered by the Agg canvas, and the checks measure the window
extents of its texts in pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from PIL import Image

from stages import metrics

# Smallest font size in points that stays legible in the 100 dpi PNG.
READABLE_FONT_SIZE = 6.0
LONG_NAME_LENGTH = 60
STEMS = ["Ærøskøbing", "Straße", "Ελληνικά", "жёлтый", "café", "Łódź"]


def class_names(num_classes: int) -> list[str]:
    """Return distinct class names with non-ASCII letters, a third of them long."""
    names = []
    for index in range(num_classes):
        stem = STEMS[index % len(STEMS)]
        if index % 3 == 0:
            words = f"{stem} very long descriptive class name " * 4
            names.append(words[: LONG_NAME_LENGTH - 4] + f"{index:04d}")
        else:
            names.append(f"{stem} {index}")
    return names


@dataclass
class Drawn:
    """A rendered confusion figure and what went into it."""

    names: list[str]
    figure: object
    renderer: object
    warnings: list[str]

    @property
    def panels(self) -> list:
        """The two matrix axes (the colorbar axes contain no image)."""
        return [ax for ax in self.figure.axes if ax.images]

    def tick_labels(self, ax=None) -> list[Text]:
        """Return the non-empty tick labels of one panel, or of both."""
        labels = []
        for panel in [ax] if ax is not None else self.panels:
            labels += panel.get_xticklabels() + panel.get_yticklabels()
        return [label for label in labels if label.get_visible() and label.get_text()]

    def extent(self, artist) -> np.ndarray:
        """Return the pixel box (x0, y0, x1, y1) of a text or axes."""
        return np.array(artist.get_window_extent(self.renderer).extents)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(2, id="2_classes"),
        pytest.param(6, id="6_classes"),
        pytest.param(20, id="20_classes"),
        pytest.param(120, id="120_classes"),
        pytest.param(300, id="300_classes", marks=pytest.mark.slow),
    ],
)
def drawn(request: pytest.FixtureRequest):
    """The confusion figure of random counts, rendered by the Agg canvas."""
    import matplotlib.pyplot as plt

    num_classes = request.param
    names = class_names(num_classes)
    rng = np.random.default_rng(num_classes)
    counts = pd.DataFrame(
        rng.integers(0, 2000, size=(num_classes, num_classes)),
        index=names,
        columns=names,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = metrics.confusion_figure(counts)
        figure.canvas.draw()
    yield Drawn(
        names, figure, figure.canvas.get_renderer(), [str(w.message) for w in caught]
    )
    plt.close(figure)


def overlapping_pairs(boxes: np.ndarray) -> list[tuple[int, int]]:
    """Return the index pairs (i < j) of boxes whose interiors intersect."""
    x0, y0, x1, y1 = boxes.T
    overlap = (x0[:, None] < x1[None, :]) & (x0[None, :] < x1[:, None])
    overlap &= (y0[:, None] < y1[None, :]) & (y0[None, :] < y1[:, None])
    rows, columns = np.nonzero(np.triu(overlap, k=1))
    return list(zip(rows.tolist(), columns.tolist(), strict=True))


def test_confusion_has_two_panels(drawn: Drawn) -> None:
    assert len(drawn.panels) == 2
    for ax in drawn.panels:
        assert ax.images[0].get_array().shape == (len(drawn.names),) * 2


def test_confusion_tick_labels_do_not_overlap(drawn: Drawn) -> None:
    labels = drawn.tick_labels()
    boxes = np.array([drawn.extent(label) for label in labels])
    pairs = overlapping_pairs(boxes)
    examples = [(labels[i].get_text(), labels[j].get_text()) for i, j in pairs[:5]]
    assert not pairs, f"{len(pairs)} overlapping tick labels, e.g. {examples}"


def test_confusion_tick_labels_clear_of_axes(drawn: Drawn) -> None:
    labels = drawn.tick_labels()
    axes = drawn.figure.axes
    boxes = np.array([drawn.extent(item) for item in [*labels, *axes]])
    pairs = [(i, j) for i, j in overlapping_pairs(boxes) if i < len(labels) <= j]
    examples = [labels[i].get_text() for i, _ in pairs[:5]]
    assert not pairs, f"{len(pairs)} tick labels cover a panel or colorbar: {examples}"


def drawn_texts(figure) -> list[Text]:
    """Return the visible, non-empty texts that the canvas draws.

    Labels of ticks outside their axis' view limits are left out, because
    matplotlib keeps such ticks, for example on a colorbar, but skips them.
    """
    skipped = set()
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            margin = 1e-9 * (high - low)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - margin <= tick.get_loc() <= high + margin:
                    skipped.update((id(tick.label1), id(tick.label2)))
    return [
        text
        for text in figure.findobj(Text)
        if text.get_visible() and text.get_text() and id(text) not in skipped
    ]


def test_confusion_texts_inside_figure(drawn: Drawn) -> None:
    texts = drawn_texts(drawn.figure)
    x0, y0, x1, y1 = drawn.figure.bbox.extents
    outside = []
    for text in texts:
        left, bottom, right, top = drawn.extent(text)
        if left < x0 or bottom < y0 or right > x1 or top > y1:
            outside.append(text.get_text())
    assert len(texts) > 2 * len(drawn.names)
    assert not outside, f"texts cut off at the figure edge: {outside[:5]}"


def test_confusion_font_size_readable(drawn: Drawn) -> None:
    for ax in drawn.panels:
        sizes = [label.get_fontsize() for label in drawn.tick_labels(ax)]
        sizes += [text.get_fontsize() for text in ax.texts]
        assert min(sizes) >= READABLE_FONT_SIZE


def test_confusion_labels_shortened(drawn: Drawn) -> None:
    limit = metrics.MAX_LABEL_CHARS
    for ax in drawn.panels:
        for tick, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True):
            name, text = drawn.names[int(tick)], label.get_text()
            assert len(text) <= limit, text
            if len(name) <= limit:
                assert text == name
                continue
            assert len(text) == limit, text
            assert "…" in text, text
            assert name.startswith(text[:3]), text
            assert name.endswith(text[-4:]), text


def test_confusion_labels_follow_classes(drawn: Drawn) -> None:
    num_classes = len(drawn.names)
    for ax in drawn.panels:
        for ticks, labels in (
            (ax.get_xticks(), ax.get_xticklabels()),
            (ax.get_yticks(), ax.get_yticklabels()),
        ):
            texts = [label.get_text() for label in labels]
            expected = [metrics.shorten(drawn.names[int(tick)]) for tick in ticks]
            assert texts == expected
            assert ticks[0] == 0
            steps = set(np.diff(ticks).tolist()) or {1}
            assert len(steps) == 1, steps
            if num_classes <= 120:
                assert steps == {1}, "every class up to 120 gets a label"


def test_confusion_annotations_fit_cells(drawn: Drawn) -> None:
    num_classes = len(drawn.names)
    for ax in drawn.panels:
        if num_classes > metrics.MAX_ANNOTATED_CLASSES:
            assert not ax.texts
            continue
        assert len(ax.texts) == num_classes**2
        for text in ax.texts:
            column, row = text.get_position()
            corners = ax.transData.transform(
                [(column - 0.5, row + 0.5), (column + 0.5, row - 0.5)]
            )
            left, bottom, right, top = drawn.extent(text)
            assert corners[0][0] <= left, text.get_text()
            assert right <= corners[1][0], text.get_text()
            assert corners[0][1] <= bottom, text.get_text()
            assert top <= corners[1][1], text.get_text()


def test_confusion_draws_every_glyph(drawn: Drawn) -> None:
    missing = [message for message in drawn.warnings if "missing from" in message]
    assert not missing


def test_plot_confusion_writes_png(tmp_path) -> None:
    names = class_names(4)
    counts = pd.DataFrame(np.eye(4, dtype=int) * 5, index=names, columns=names)
    target = tmp_path / "confusion_matrix.png"
    metrics.plot_confusion(counts, target)
    with Image.open(target) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 500)


def test_missing_glyphs_logged_once(tmp_path, caplog) -> None:
    names = ["日本", "本語", "plain"]
    counts = pd.DataFrame(np.eye(3, dtype=int) * 5, index=names, columns=names)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with metrics.missing_glyphs_summarised("pictures"):
            metrics.plot_confusion(counts, tmp_path / "confusion_matrix.png")
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in escaped]
    assert not [m for m in messages if "missing from font" in m]
    assert "unrelated" in messages
    (line,) = [
        r.getMessage() for r in caplog.records if "show as boxes" in r.getMessage()
    ]
    assert line.startswith("pictures: 3 characters")
    assert line.endswith("日 本 語")


@pytest.mark.parametrize(
    ("pitch", "font_size", "step"),
    [(30.0, 10.0, 1), (9.1, 7.0, 1), (7.8, 6.0, 1), (6.3, 6.0, 2), (2.5, 6.0, 4)],
)
def test_tick_layout_fits_pitch(pitch: float, font_size: float, step: int) -> None:
    chosen_size, chosen_step = metrics.tick_layout(pitch)
    assert chosen_size == pytest.approx(font_size)
    assert chosen_step == step
    assert chosen_size * metrics.LABEL_SPACING <= pitch * chosen_step + 1e-9


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cat", "cat"),
        ("fourteen_chars", "fourteen_chars"),
        ("fifteen_chars!!", "fiftee…chars!!"),
        ("Cafe\u0301", "Café"),
        ("Ærøskøbing harbour at night, 0042", "Ærøskø…t, 0042"),
    ],
)
def test_shorten_keeps_start_and_end(name: str, expected: str) -> None:
    assert metrics.shorten(name) == expected
    assert len(metrics.shorten(name)) <= metrics.MAX_LABEL_CHARS
