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


def load_predictions(path: Path, manifest: pd.DataFrame, num_classes: int) -> np.ndarray:
    """Read the probabilities of the manifest's images and check that they match.

    Raises:
        InputError: the file is missing, unreadable, or made for other
            images or another number of classes.
    """
    if not path.is_file():
        raise InputError(f"{path} not found; {RERUN_HINT}")
    try:
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with stored:
            probabilities = stored["probabilities"]
            hashes = stored["sha256"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} cannot be read ({error}); {RERUN_HINT}") from error
    expected = manifest["sha256"].to_numpy(dtype=str)
    if probabilities.shape != (len(expected), num_classes):
        raise InputError(
            f"{path} contains {probabilities.shape[0]} rows of "
            f"{probabilities.shape[-1]} class probabilities, but the test split "
            f"has {len(expected)} images of {num_classes} classes; {RERUN_HINT}"
        )
    if not np.array_equal(hashes, expected):
        raise InputError(
            f"{path} was made for another test split (the image hashes differ); "
            f"{RERUN_HINT}"
        )
    return probabilities
