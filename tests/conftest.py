"""Fixtures: scratch projects with the real conf/, and generated image data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# No usage reports or update checks from the tools the tests run.
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"


def copy_config(target: Path) -> Path:
    """Copy conf/ and params.yaml into `target` and return it."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "conf", target / "conf")
    shutil.copy(ROOT / "params.yaml", target / "params.yaml")
    return target


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project folder with the real config, as the working directory."""
    folder = copy_config(tmp_path / "project")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return folder


def class_pattern(class_index: int, size: tuple[int, int]) -> np.ndarray:
    """Return an RGB image whose stripes tell its class apart from the others."""
    height, width = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, class_index % 3] = 200
    pixels[:: class_index + 2, :, :] = 40
    return pixels


def make_image_folder(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 10)
) -> Path:
    """Write `counts[label]` distinct PNG images into root/<label>/."""
    rng = np.random.default_rng(0)
    for class_index, (label, count) in enumerate(sorted(counts.items())):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = class_pattern(class_index, size)
            noise = rng.integers(0, 30, size=pixels.shape, dtype=np.uint8)
            Image.fromarray(pixels + noise).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def digits_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch project where download, preprocess and split ran on the digits."""
    from stages.download import download
    from stages.preprocess import preprocess
    from stages.split import split

    folder = copy_config(tmp_path_factory.mktemp("digits") / "project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DVC_ROOT", raising=False)
        download([])
        preprocess([])
        split([])
        yield folder


def client_for(project: Path):
    """Return an MLflow client on the default store of `project`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="session")
def trained(digits_project: Path) -> Iterator[tuple[Path, dict]]:
    """The digits project after two epochs of the small CNN."""
    from stages.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(digits_project)
        metrics = train(["model=cnn_small", "train.epochs=2", "train.batch_size=64"])
        yield digits_project, metrics


@pytest.fixture(scope="session")
def evaluated(trained: tuple[Path, dict]) -> tuple[Path, dict, dict]:
    """The trained digits project after the evaluate stage."""
    from stages.evaluate import evaluate

    project, train_metrics = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        metrics = evaluate([])
    return project, train_metrics, metrics
