"""Fresh git copies of the project, and what its pipeline wrote in them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from bench.measure import BenchError, child_env

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = ["download", "preprocess", "split", "train", "evaluate"]
GIT_IDENTITY = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]


def _git(args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=child_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed in {cwd}: {result.stderr}")
    return result.stdout


def copy_project(target: Path, root: Path = ROOT) -> Path:
    """Copy the project's files into a new git repository at `target`.

    The files are those git tracks plus untracked ones it does not ignore,
    as they are in the working tree now, so uncommitted changes are measured
    too. Ignored outputs (data/, models/, mlflow.db) are not copied.
    """
    listed = _git(["ls-files", "--cached", "--others", "--exclude-standard"], root)
    target.mkdir(parents=True)
    for name in filter(None, listed.split("\n")):
        source = root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    _git(["init", "-q"], target)
    _git(["add", "-A"], target)
    _git([*GIT_IDENTITY, "commit", "-qm", "Project as benchmarked"], target)
    return target


def pipeline_overrides(
    data_dir: Path,
    image_size: tuple[int, int],
    epochs: int,
    learning_rate: float,
    seed: int,
) -> list[str]:
    """Return Hydra overrides that make the pipeline follow the reference recipe.

    The model is the project's cnn with the tutorial's layers, trained with
    Adam at a constant learning rate and no weight decay on batches of 32,
    without augmentation, and tracked in the copy's own MLflow store. `seed`
    sets both the split and the training seed. The config requires
    split.test above 0. So the split closest to the tutorial's 80/20 gives
    test a share of 0.001, and the split stage still puts one image of each
    class there.
    """
    height, width = image_size
    return [
        "dataset=folder",
        f"dataset.path={data_dir}",
        f"preprocess.image_size=[{height},{width}]",
        "preprocess.color_mode=rgb",
        "model=cnn",
        "model.filters=[16,32,64]",
        "model.convs_per_block=1",
        "model.dense_units=[128]",
        "model.dropout=0.0",
        "augment=none",
        "split.train=0.8",
        "split.val=0.199",
        "split.test=0.001",
        f"split.seed={seed}",
        f"train.seed={seed}",
        "train.weight_decay=0.0",
        f"train.epochs={epochs}",
        "train.batch_size=32",
        "train.optimizer=adam",
        f"train.learning_rate={learning_rate}",
        "train.lr_schedule=constant",
        "train.label_smoothing=0.0",
        # Each copy logs to its own mlflow.db, where epoch_seconds reads it.
        "tracking.uri=null",
    ]


def stages_run(output: str) -> list[str]:
    """Return the names of the stages that DVC ran, from its output."""
    return [
        line.split("'")[1]
        for line in output.splitlines()
        if line.startswith("Running stage")
    ]


def check_stages(output: str, expected: list[str], command: str) -> None:
    """Raise BenchError unless DVC ran exactly the `expected` stages, in order."""
    ran = stages_run(output)
    if ran != expected:
        raise BenchError(f"{command} ran stages {ran}; expected {expected}")


def train_metrics(copy: Path) -> dict:
    """Read metrics/train.json that the train stage wrote in `copy`."""
    return json.loads((copy / "metrics/train.json").read_text(encoding="utf-8"))


def split_sizes(copy: Path) -> dict[str, int]:
    """Count the images of each split manifest in `copy`."""
    return {
        name: len(pd.read_csv(copy / "data/split" / f"{name}.csv"))
        for name in ("train", "val", "test")
    }


def _history_seconds(copy: Path) -> tuple[list[float], str] | None:
    """Return per-epoch seconds from metrics/history.csv, if it records them."""
    history = pd.read_csv(copy / "metrics/history.csv")
    columns = [c for c in history.columns if c.endswith("seconds") or c == "time"]
    if not columns:
        return None
    column = columns[0]
    # NOTE: a history column may time a shorter span than the reference's
    # callback, which runs from one epoch's end to the next.
    return history[column].astype(float).tolist(), f"metrics/history.csv:{column}"


def epoch_seconds(copy: Path, run_id: str) -> tuple[list[float], str]:
    """Return the seconds of each epoch after the first, and where they came from.

    metrics/history.csv is used if it has a column of seconds. Otherwise the
    times are the gaps between the MLflow timestamps of consecutive epochs'
    val_accuracy, which the pipeline logs at the end of each epoch, after the
    validation pass. The timestamps have millisecond resolution.
    """
    from_history = _history_seconds(copy)
    if from_history is not None:
        seconds, source = from_history
        return seconds[1:], source

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    points = sorted(
        client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step
    )
    stamps = [p.timestamp / 1000 for p in points]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return gaps, "MLflow timestamps of val_accuracy"
