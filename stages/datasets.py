"""Dataset sources: each one materialises a folder of class sub-folders.

Whatever the source, the result is `<root>/<class name>/<image files>`, so
preprocessing treats the built-in digits exactly like a user's folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.cli import InputError
from stages.images import is_ignored

log = logging.getLogger(__name__)

DIGITS_MAX_VALUE = 16  # load_digits stores intensities 0..16


def export_digits(target: Path) -> Counter[str]:
    """Write scikit-learn's digits as one 8-bit grayscale PNG per sample.

    Returns:
        Number of images written per class.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    counts: Counter[str] = Counter()
    for index, (image, label) in enumerate(
        tqdm(zip(pixels, digits.target, strict=True), total=len(pixels), desc="digits")
    ):
        folder = target / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
        counts[str(label)] += 1
    return counts


def _check_class_folder(source: Path) -> list[Path]:
    if not source.exists():
        raise InputError(
            f"dataset.path {source} does not exist; set dataset.path to a folder "
            "with one sub-folder per class"
        )
    if not source.is_dir():
        raise InputError(
            f"dataset.path {source} is a file, not a folder; set dataset.path to a "
            "folder with one sub-folder per class"
        )
    classes = sorted(
        p for p in source.iterdir() if p.is_dir() and not is_ignored(p.name)
    )
    if not classes:
        raise InputError(
            f"dataset.path {source} has no class sub-folders; put each class's "
            "images in a sub-folder named after the class"
        )
    return classes


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_folder(source: Path, target: Path) -> Counter[str]:
    """Copy a folder of class sub-folders into `target`, hard-linking where possible.

    Hidden and system files are left out. Returns the number of files per class.
    """
    counts: Counter[str] = Counter()
    for class_dir in _check_class_folder(source):
        shutil.copytree(
            class_dir,
            target / class_dir.name,
            copy_function=_link_or_copy,
            ignore=lambda _, names: [n for n in names if is_ignored(n)],
        )
        counts[class_dir.name] = sum(
            1 for p in (target / class_dir.name).rglob("*") if p.is_file()
        )
    return counts
