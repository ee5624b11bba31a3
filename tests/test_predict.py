"""Command image-predict: a real Keras model, from its file and from MLflow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.cli import InputError
from stages.config import load_params
from stages.images import decode_image
from stages.predict import main, predict_images, settings_from_run
from stages.preprocess import decode_settings
from tests.conftest import ROOT

DIGITS = {"digit_0.png": 0, "digit_1.png": 1, "digit_2.png": 2}
GOOD_FILES = [*DIGITS, "photo_7.jpg", "sub/digit_9.png"]
BAD_FILES = {
    "bad_broken.png": "corrupt or truncated image",
    "bad_notes.txt": "not an image or an unsupported format",
}


def digit_pixels(index: int) -> np.ndarray:
    """Return sample `index` of scikit-learn's digits as 8x8 uint8 pixels."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    return np.rint(images[index] * (255 / 16)).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of digits PNGs, an RGB JPEG, broken and hidden files."""
    folder = tmp_path_factory.mktemp("predict") / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name, index in DIGITS.items():
        Image.fromarray(digit_pixels(index), mode="L").save(folder / name)
    Image.fromarray(digit_pixels(9), mode="L").save(folder / "sub/digit_9.png")

    gray = np.kron(digit_pixels(7), np.ones((4, 4), dtype=np.uint8))
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(folder / "photo_7.jpg", quality=95)

    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "bad_broken.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    (folder / "bad_notes.txt").write_text("not a picture\n")

    Image.fromarray(digit_pixels(4), mode="L").save(folder / ".hidden.png")
    Image.fromarray(digit_pixels(5), mode="L").save(folder / ".cache/digit_5.png")
    (folder / "Thumbs.db").write_bytes(b"\x00" * 16)
    return folder


@pytest.fixture
def in_trained(trained, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """The trained digits project as the working directory."""
    project, metrics = trained
    monkeypatch.chdir(project)
    return project, metrics


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger after a test that runs `main`, which configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def probabilities_by_file(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Map each predicted file to its label probabilities."""
    predicted = table[table["status"] == "ok"]
    return {
        file: dict(zip(rows["label"], rows["probability"], strict=True))
        for file, rows in predicted.groupby("file", sort=False)
    }


def expected_probabilities(project: Path, files: list[Path]) -> np.ndarray:
    """Predict with the saved Keras model on the pixels that decode_image returns."""
    import keras

    params = load_params(["preprocess"], params_file=project / "params.yaml")
    settings = decode_settings(params.preprocess)
    pixels = np.stack([decode_image(path, settings).pixels for path in files])
    model = keras.models.load_model(project / "models/model.keras")
    return model.predict(pixels, verbose=0)


def write_params(project: Path, **preprocess) -> None:
    """Change keys of the preprocess section in the project's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["preprocess"].update(preprocess)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_predict_local_model_top_k(in_trained, images: Path) -> None:
    table = predict_images([images])
    predicted = table[table["status"] == "ok"]
    expected_files = {str(images / name) for name in GOOD_FILES}
    assert set(predicted["file"]) == expected_files
    for file, rows in predicted.groupby("file"):
        assert rows["rank"].tolist() == [1, 2, 3], file
        assert rows["probability"].is_monotonic_decreasing, file
        assert set(rows["label"]) <= {str(d) for d in range(10)}, file
    assert list(table.columns) == [
        "file",
        "rank",
        "label",
        "probability",
        "status",
        "error",
    ]


def test_predict_bad_files_listed(in_trained, images: Path, caplog) -> None:
    table = predict_images([images])
    skipped = table[table["status"] == "skipped"].set_index("file")
    assert len(skipped) == len(BAD_FILES)
    for name, reason in BAD_FILES.items():
        assert reason in skipped.loc[str(images / name), "error"], name
        assert pd.isna(skipped.loc[str(images / name), "probability"]), name
    assert "2 skipped" in caplog.text
    for hidden in (".hidden.png", "digit_5.png", "Thumbs.db"):
        assert not table["file"].str.endswith(hidden).any(), hidden


def test_predict_probabilities_sum_to_one(in_trained, images: Path) -> None:
    table = predict_images([images], top_k=50)
    for file, probabilities in probabilities_by_file(table).items():
        assert len(probabilities) == 10, file
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4), file


def test_predict_matches_decoded_pixels(in_trained, images: Path) -> None:
    project, _ = in_trained
    table = predict_images([images], top_k=10, batch_size=2)
    files = [images / name for name in GOOD_FILES]
    expected = expected_probabilities(project, files)
    predicted = probabilities_by_file(table)
    for path, row in zip(files, expected, strict=True):
        by_label = predicted[str(path)]
        actual = [by_label[str(label)] for label in range(10)]
        assert actual == pytest.approx(row.tolist(), abs=1e-6), path.name


def test_predict_matches_training_shards(in_trained) -> None:
    import keras

    project, _ = in_trained
    index = pd.read_csv(project / "data/processed/index.csv", dtype=str).head(6)
    files = [Path("data/raw") / name for name in index["file"]]
    table = predict_images(files, top_k=10)

    shard = np.load(project / "data/processed/images-00000.npy")
    offsets = index["offset"].astype(int).to_numpy()
    assert (index["shard"] == "0").all()
    model = keras.models.load_model(project / "models/model.keras")
    expected = model.predict(shard[offsets], verbose=0)
    predicted = probabilities_by_file(table)
    for path, row in zip(files, expected, strict=True):
        actual = [predicted[str(path)][str(label)] for label in range(10)]
        assert actual == pytest.approx(row.tolist(), abs=1e-6), path


def test_predict_mlflow_run_model(in_trained, images: Path, caplog) -> None:
    _, metrics = in_trained
    caplog.set_level(logging.INFO, logger="stages.predict")
    local = predict_images([images])
    from_run = predict_images([images], model=f"runs:/{metrics['mlflow_run_id']}/model")
    columns = ["file", "rank", "label", "status", "error"]
    pd.testing.assert_frame_equal(from_run[columns], local[columns])
    assert from_run["probability"].tolist() == pytest.approx(
        local["probability"].tolist(), abs=1e-6, nan_ok=True
    )
    assert f"preprocess params of run {metrics['mlflow_run_id']}" in caplog.text
    assert "The MLflow model has no class names" in caplog.text


def test_predict_registered_model(in_trained, images: Path, caplog) -> None:
    import mlflow

    project, metrics = in_trained
    caplog.set_level(logging.INFO, logger="stages.predict")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    version = mlflow.register_model(
        f"runs:/{metrics['mlflow_run_id']}/model", "predict-digits"
    )
    table = predict_images(
        [images / "digit_1.png"], model=f"models:/predict-digits/{version.version}"
    )
    assert table["rank"].tolist() == [1, 2, 3]
    assert f"preprocess params of run {metrics['mlflow_run_id']}" in caplog.text


def test_predict_mlflow_uses_run_preprocess(
    trained, project: Path, images: Path, caplog
) -> None:
    trained_project, metrics = trained
    write_params(project, image_size=[8, 8])
    model = f"runs:/{metrics['mlflow_run_id']}/model"
    table = predict_images(
        [images / "digit_2.png"],
        model=model,
        top_k=10,
        tracking_uri=f"sqlite:///{trained_project / 'mlflow.db'}",
    )
    expected = expected_probabilities(trained_project, [images / "digit_2.png"])[0]
    by_label = probabilities_by_file(table)[str(images / "digit_2.png")]
    actual = [by_label[str(label)] for label in range(10)]
    assert actual == pytest.approx(expected.tolist(), abs=1e-6)
    assert "labels are class indices" in caplog.text


def test_predict_shape_mismatch(trained, project: Path, images: Path) -> None:
    trained_project, _ = trained
    write_params(project, image_size=[8, 8])
    with pytest.raises(InputError, match=r"shape \(16, 16, 1\).*\(8, 8, 1\)"):
        predict_images(
            [images],
            model=str(trained_project / "models/model.keras"),
            classes_file=trained_project / "data/processed/classes.json",
        )


def test_predict_too_large_image(trained, project: Path, images: Path) -> None:
    trained_project, _ = trained
    write_params(project, max_pixels=100)
    table = predict_images(
        [images / "digit_0.png", images / "photo_7.jpg"],
        model=str(trained_project / "models/model.keras"),
        classes_file=trained_project / "data/processed/classes.json",
    )
    status = dict(zip(table["file"], table["status"], strict=False))
    errors = dict(zip(table["file"], table["error"], strict=False))
    assert status[str(images / "digit_0.png")] == "ok"
    assert status[str(images / "photo_7.jpg")] == "skipped"
    assert (
        "32x32 pixels exceeds preprocess.max_pixels=100"
        in errors[str(images / "photo_7.jpg")]
    )


def test_predict_settings_from_run_params() -> None:
    run_params = {
        "preprocess.image_size": "[24, 32]",
        "preprocess.color_mode": "rgb",
        "preprocess.resize": "pad",
        "preprocess.background": "[0, 0, 0]",
        "preprocess.max_pixels": "1000",
        "train.epochs": "2",
    }
    settings = settings_from_run(run_params, "abc")
    assert (settings.height, settings.width, settings.channels) == (24, 32, 3)
    assert settings.resize == "pad"
    assert settings.background == (0, 0, 0)
    assert settings.max_pixels == 1000
    assert settings_from_run({"train.epochs": "2"}, "abc") is None


def test_predict_cli_prints_table(
    in_trained, images: Path, root_logging, capsys
) -> None:
    main([str(images / "digit_0.png"), str(images / "bad_notes.txt"), "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "file",
        "rank",
        "label",
        "probability",
        "status",
        "error",
    ]
    assert len(lines) == 4
    assert lines[1].split()[:2] == [str(images / "digit_0.png"), "1"]
    assert "skipped not an image" in lines[3]


def test_predict_cli_writes_csv(
    in_trained, images: Path, tmp_path: Path, root_logging, capsys
) -> None:
    output = tmp_path / "predictions.csv"
    main([str(images), "--output", str(output), "--batch-size", "3"])
    assert capsys.readouterr().out == ""
    table = pd.read_csv(output, keep_default_na=False)
    assert list(table.columns) == [
        "file",
        "rank",
        "label",
        "probability",
        "status",
        "error",
    ]
    assert len(table) == 3 * len(GOOD_FILES) + len(BAD_FILES)
    assert set(table["status"]) == {"ok", "skipped"}
    assert not list(tmp_path.glob(".predictions*"))


def test_predict_missing_path(project: Path, images: Path) -> None:
    with pytest.raises(InputError, match="Path not found: .*nowhere"):
        predict_images([images, images / "nowhere"])


def test_predict_missing_model(project: Path, images: Path) -> None:
    with pytest.raises(InputError, match="models/model.keras not found.*dvc pull"):
        predict_images([images])


def test_predict_unreadable_model(in_trained, images: Path, tmp_path: Path) -> None:
    model = tmp_path / "broken.keras"
    model.write_text("not a model\n")
    with pytest.raises(InputError, match="Cannot load model file .*dvc repro"):
        predict_images([images], model=str(model))


def test_predict_no_images(project: Path, tmp_path: Path) -> None:
    folder = tmp_path / "only_hidden"
    (folder / ".hidden").mkdir(parents=True)
    Image.fromarray(digit_pixels(0), mode="L").save(folder / ".hidden/x.png")
    (folder / "Thumbs.db").write_bytes(b"\x00")
    with pytest.raises(InputError, match="No images found"):
        predict_images([folder])


@pytest.mark.parametrize(
    "uri", ["runs:/", "runs:/abc", "models:/", "models:/name/1/extra"]
)
def test_predict_invalid_model_uri(project: Path, images: Path, uri: str) -> None:
    with pytest.raises(InputError, match="Invalid MLflow model URI"):
        predict_images([images], model=uri)


def test_predict_unknown_run(in_trained, images: Path) -> None:
    with pytest.raises(InputError, match="Cannot load MLflow model .*not found"):
        predict_images([images], model=f"runs:/{'0' * 32}/model")


def test_predict_missing_store(project: Path, images: Path) -> None:
    with pytest.raises(InputError, match="MLflow store .*mlflow.db not found"):
        predict_images([images], model=f"runs:/{'0' * 32}/model")
    assert not (project / "mlflow.db").exists()


def test_predict_cli_error_before_tensorflow(project: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from stages.predict import main\n"
        "try:\n"
        f"    main([{str(tmp_path / 'nowhere')!r}])\n"
        "except SystemExit as exit:\n"
        "    heavy = ('tensorflow', 'keras', 'mlflow')\n"
        "    print(exit.code, [m for m in heavy if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "2 []", result.stderr
    assert "Path not found" in result.stderr
