"""The test split's class probabilities, written by train and read by evaluate.

The train stage predicts the test split while TensorFlow is already loaded,
so the evaluate stage scores these numbers without importing it. Each row
is stored with its image's SHA-256, so a file made for another split or
class list is rejected rather than misread.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError
from stages.fsutil import atomic_file

RERUN_HINT = "run the train stage again (dvc repro train)"


def save_predictions(
    path: Path, probabilities: np.ndarray, manifest: pd.DataFrame
) -> None:
    """Write the probabilities of the manifest's images, in manifest order."""
    if len(probabilities) != len(manifest):
        raise ValueError(
            f"{len(probabilities)} rows of probabilities for {len(manifest)} images"
        )
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            probabilities=np.asarray(probabilities, dtype=np.float32),
            sha256=manifest["sha256"].to_numpy(dtype=str),
        )


def load_predictions(
    path: Path, manifest: pd.DataFrame, num_classes: int
) -> np.ndarray:
    """Read the probabilities of the manifest's images and check that they match.

    Raises:
        InputError: the file is missing or unreadable, was made for other
            images or another number of classes, or contains values that
            are not probabilities.
    """
    if not path.is_file():
        raise InputError(f"{path} not found; {RERUN_HINT}")
    try:
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise ValueError("it contains a single array, not an .npz archive")
        with stored:
            probabilities = stored["probabilities"]
            hashes = stored["sha256"]
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} cannot be read ({error}); {RERUN_HINT}") from error
    except ValueError as error:
        # NumPy's own message about pickled data would suggest an unsafe load.
        raise InputError(
            f"{path} is not an .npz archive of arrays; {RERUN_HINT}"
        ) from error
    expected = manifest["sha256"].to_numpy(dtype=str)
    shape = probabilities.shape
    if probabilities.ndim != 2 or shape != (len(expected), num_classes):
        raise InputError(
            f"{path} contains class probabilities of shape {shape}, but the test "
            f"split has {len(expected)} images of {num_classes} classes; "
            f"{RERUN_HINT}"
        )
    if not np.array_equal(hashes, expected):
        raise InputError(
            f"{path} was made for another test split (the image hashes differ); "
            f"{RERUN_HINT}"
        )
    check_probabilities(probabilities, path)
    return probabilities.astype(np.float32)


def check_probabilities(probabilities: np.ndarray, path: Path) -> None:
    """Raise InputError unless every row is finite, within [0, 1] and sums to 1."""
    if probabilities.dtype.kind not in "fiu":
        raise InputError(
            f"{path}: invalid probabilities of type {probabilities.dtype}, "
            f"expected numbers; {RERUN_HINT}"
        )
    values = probabilities.astype(np.float64)
    broken = ~np.isfinite(values).all(axis=1)
    if broken.any():
        raise InputError(
            f"{path}: {int(broken.sum())} of {len(values)} rows contain NaN or "
            "infinite values, as a model whose training diverged predicts; "
            "lower train.learning_rate (or set train.clipnorm) and run the "
            "train stage again"
        )
    sums = values.sum(axis=1)
    invalid = (values < -1e-6).any(axis=1) | (values > 1 + 1e-6).any(axis=1)
    invalid |= np.abs(sums - 1.0) > 1e-3
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise InputError(
            f"{path}: {int(invalid.sum())} rows are not probabilities (values "
            f"within 0 and 1 that sum to 1); row {row + 1} sums to "
            f"{sums[row]:.4g}. The model's last layer must be a softmax; "
            f"{RERUN_HINT}"
        )
