"""Test predictions: written by train, checked and scored by evaluate."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.cli import InputError
from stages.predictions import load_predictions, save_predictions
from tests.services import run_python


def _manifest(hashes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"file": [f"{h}.png" for h in hashes], "sha256": hashes})


def test_predictions_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(["aa", "bb", "cc"])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    path = tmp_path / "models/test_predictions.npz"
    save_predictions(path, probabilities, manifest)
    loaded = load_predictions(path, manifest, num_classes=2)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, probabilities, rtol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("hashes", "num_classes", "message"),
    [
        (["aa", "bb", "dd"], 2, "another test split"),
        (["bb", "aa", "cc"], 2, "another test split"),
        (["aa", "bb"], 2, "has 2 images of 2 classes"),
        (["aa", "bb", "cc"], 3, "has 3 images of 3 classes"),
    ],
)
def test_predictions_of_other_images_rejected(
    tmp_path: Path, hashes: list[str], num_classes: int, message: str
) -> None:
    path = tmp_path / "test_predictions.npz"
    save_predictions(path, np.full((3, 2), 0.5), _manifest(["aa", "bb", "cc"]))
    with pytest.raises(InputError, match=message) as caught:
        load_predictions(path, _manifest(hashes), num_classes)
    assert str(path) in str(caught.value)
    assert "dvc repro train" in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"", b"not a zip file", b"PK\x03\x04broken", "npy", "no sha256"]
)
def test_unreadable_predictions_rejected(tmp_path: Path, content) -> None:
    path = tmp_path / "test_predictions.npz"
    if content == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((1, 2)))
    elif content == "no sha256":
        with open(path, "wb") as handle:
            np.savez(handle, probabilities=np.zeros((1, 2)))
    else:
        path.write_bytes(content)
    with pytest.raises(
        InputError, match=r"cannot be read|not an \.npz archive"
    ) as caught:
        load_predictions(path, _manifest(["aa"]), 2)
    assert str(path) in str(caught.value)
    assert "dvc repro train" in str(caught.value)


def test_missing_predictions_name_stage(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found; run the train stage"):
        load_predictions(tmp_path / "none.npz", _manifest(["aa"]), 2)


def test_predictions_match_saved_model(trained) -> None:
    import keras

    from stages.training import load_split, predict_probabilities, read_manifest

    project, _ = trained
    split_dir, processed = project / "data/split", project / "data/processed"
    manifest = read_manifest(split_dir, "test")
    stored = load_predictions(
        project / "models/test_predictions.npz", manifest, num_classes=10
    )
    model = keras.models.load_model(project / "models/model.keras")
    images, labels = load_split(processed, split_dir, "test")
    again = predict_probabilities(model, images, labels, batch_size=100)
    np.testing.assert_allclose(stored, again, atol=1e-5)
    np.testing.assert_allclose(stored.sum(axis=1), 1.0, atol=1e-4)


def test_evaluate_runs_without_tensorflow(evaluated, tmp_path: Path) -> None:
    project, _, metrics = evaluated
    outputs = tmp_path / "outputs"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from stages.evaluate import OUTPUTS, evaluate\n"
        f"outputs = {{k: Path({str(outputs)!r}) / v for k, v in OUTPUTS.items()}}\n"
        "result = evaluate([], outputs=outputs)\n"
        "print(result['accuracy'])\n"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "sys.exit(f'evaluate imported {heavy}' if heavy else 0)\n"
    )
    result = run_python(code, cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) == pytest.approx(metrics["accuracy"])
    assert (outputs / "plots/confusion_matrix.png").stat().st_size > 5000


def _saved(tmp_path: Path, probabilities) -> Path:
    path = tmp_path / "test_predictions.npz"
    with open(path, "wb") as handle:
        np.savez(handle, probabilities=probabilities, sha256=np.array(["aa", "bb"]))
    return path


@pytest.mark.parametrize(
    ("probabilities", "message"),
    [
        (np.array([[np.nan, np.nan], [0.5, 0.5]]), "NaN or infinite"),
        (np.array([[np.inf, 0.0], [0.5, 0.5]]), "NaN or infinite"),
        (np.array([[-0.9, -0.1], [0.5, 0.5]]), "not probabilities"),
        (np.array([[7.0, 0.0], [0.5, 0.5]]), "not probabilities"),
        (np.zeros((2, 2)), "row 1 sums to 0"),
        (np.array([[True, False], [False, True]]), "expected numbers"),
        (np.array([[1 + 0j, 0j], [0j, 1 + 0j]]), "expected numbers"),
        (np.array([["a", "b"], ["c", "d"]]), "expected numbers"),
        (np.float32(0.5), "of shape ()"),
    ],
)
def test_invalid_probabilities_rejected(
    tmp_path: Path, probabilities, message: str
) -> None:
    path = _saved(tmp_path, probabilities)
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        load_predictions(path, _manifest(["aa", "bb"]), 2)
    assert str(path) in str(caught.value)


def test_integer_probabilities_accepted(tmp_path: Path) -> None:
    path = _saved(tmp_path, np.array([[1, 0], [0, 1]]))
    loaded = load_predictions(path, _manifest(["aa", "bb"]), 2)
    assert loaded.dtype == np.float32


def test_garbage_file_message_not_about_pickles(tmp_path: Path) -> None:
    path = tmp_path / "test_predictions.npz"
    path.write_bytes(b"\x93NUMPY garbage" + bytes(range(256)))
    with pytest.raises(InputError) as caught:
        load_predictions(path, _manifest(["aa"]), 2)
    assert "allow_pickle" not in str(caught.value)
    assert "dvc repro train" in str(caught.value)
