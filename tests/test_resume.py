"""Checkpoints of the train stage.

A training process killed with SIGKILL resumes from its last complete epoch
in the same MLflow run, and ends with the same weights as an uninterrupted
run. A changed config or a finished run starts fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.training import CheckpointStore, TrainingState
from tests.conftest import client_for

EPOCHS = 6
ARGS = [
    "model=cnn_small",
    f"train.epochs={EPOCHS}",
    "train.batch_size=16",
    "train.deterministic=true",
    "augment=basic",
    "augment.flip=none",
    "tracking.log_model=false",
]


def copy_project(source: Path, target: Path) -> Path:
    """Copy a prepared project, keeping 320 train and 64 val images."""
    target.mkdir(parents=True)
    for name in ("conf", "data/processed", "data/split"):
        shutil.copytree(source / name, target / name)
    shutil.copy(source / "params.yaml", target / "params.yaml")
    for split, count in (("train", 320), ("val", 64)):
        manifest = target / "data/split" / f"{split}.csv"
        lines = manifest.read_text().splitlines()
        manifest.write_text("\n".join(lines[: count + 1]) + "\n")
    return target


def start_training(project: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", *ARGS, *extra],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(project / "train.log").open("a"),
    )


def read_state(project: Path) -> dict | None:
    try:
        return json.loads((project / "checkpoints/state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_after_first_checkpoint(process: subprocess.Popen, project: Path) -> dict:
    """SIGKILL `process` as soon as a checkpoint exists; return that checkpoint."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        saved = read_state(project)
        if saved and not saved["complete"] and saved["state"]["epoch"] >= 1:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return read_state(project)
        time.sleep(0.02)
    process.kill()
    log = (project / "train.log").read_text()[-3000:]
    pytest.fail(f"no checkpoint before the run ended or timed out:\n{log}")


def final_weights(project: Path) -> list[np.ndarray]:
    return keras.models.load_model(project / "models/model.keras").get_weights()


def test_resume_after_kill_matches_whole_run(
    digits_project: Path, tmp_path: Path
) -> None:
    whole = copy_project(digits_project, tmp_path / "whole")
    killed = copy_project(digits_project, tmp_path / "killed")
    reference = start_training(whole)
    victim = start_training(killed)
    try:
        saved = kill_after_first_checkpoint(victim, killed)
        assert victim.returncode == -signal.SIGKILL
        epoch, run_id = saved["state"]["epoch"], saved["state"]["run_id"]
        assert 1 <= epoch < EPOCHS
        assert not (killed / "models/model.keras").exists()

        resumed = start_training(killed)
        assert resumed.wait(timeout=300) == 0, (killed / "train.log").read_text()
        assert reference.wait(timeout=300) == 0, (whole / "train.log").read_text()
    finally:
        for process in (reference, victim):
            if process.poll() is None:
                process.kill()

    metrics = json.loads((killed / "metrics/train.json").read_text())
    assert metrics["resumed_at_epoch"] == epoch
    assert metrics["epochs"] == EPOCHS
    assert metrics["mlflow_run_id"] == run_id
    client = client_for(killed)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_epoch"] == str(epoch)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for name in ("val_loss", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), name
    assert read_state(killed)["complete"] is True
    assert not list((killed / "checkpoints").glob("epoch-*"))

    resumed_weights, whole_weights = final_weights(killed), final_weights(whole)
    assert len(resumed_weights) == len(whole_weights)
    for resumed_array, whole_array in zip(resumed_weights, whole_weights, strict=True):
        assert np.array_equal(resumed_array, whole_array)
    whole_metrics = json.loads((whole / "metrics/train.json").read_text())
    assert metrics["val_loss"] == whole_metrics["val_loss"]


def test_run_with_other_settings_ends_the_killed_run(
    digits_project: Path, tmp_path: Path
) -> None:
    project = copy_project(digits_project, tmp_path / "project")
    victim = start_training(project)
    try:
        killed_run = kill_after_first_checkpoint(victim, project)["state"]["run_id"]
    finally:
        if victim.poll() is None:
            victim.kill()
    client = client_for(project)
    assert client.get_run(killed_run).info.status == "RUNNING"

    other = start_training(project, "train.epochs=1")
    assert other.wait(timeout=300) == 0, (project / "train.log").read_text()

    new_run = json.loads((project / "metrics/train.json").read_text())["mlflow_run_id"]
    assert new_run != killed_run
    ended = client.get_run(killed_run)
    assert ended.info.status == "KILLED"
    reason = f"run {new_run} replaced its unfinished checkpoint"
    assert reason in ended.data.tags["error"]
    assert client.get_run(new_run).info.status == "FINISHED"


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_resume_store_checks_fingerprint(tmp_path: Path) -> None:
    model = tiny_model()
    store = CheckpointStore(tmp_path, {"params": "a", "data": "x"})
    assert store.load() is None
    store.save(model, TrainingState(epoch=1, phase="train", phase_start=0))
    store.save(model, TrainingState(epoch=2, phase="train", phase_start=0, run_id="r"))
    assert store.load().epoch == 2
    assert not store.weights_file(1).exists()

    changed = CheckpointStore(tmp_path, {"params": "b", "data": "x"})
    assert changed.load() is None
    store.mark_complete("r", 2)
    assert store.load() is None
    assert not store.weights_file(2).exists()


def test_resume_store_keeps_best_epoch(tmp_path: Path) -> None:
    model = tiny_model()
    store = CheckpointStore(tmp_path, {"params": "a"})
    for epoch in (1, 2, 3):
        state = TrainingState(epoch=epoch, phase="train", phase_start=0)
        store.save(model, state, best_epoch=1)
    assert sorted(p.parent.name for p in tmp_path.glob("epoch-*/*.weights.h5")) == [
        "epoch-0001",
        "epoch-0003",
    ]


def test_resume_store_ignores_unreadable_state(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{truncated")
    assert CheckpointStore(tmp_path, {"params": "a"}).load() is None


def test_fingerprint_ignores_cache_setting(tmp_path: Path) -> None:
    from stages.training import training_fingerprint

    for name in ("train", "val"):
        (tmp_path / f"{name}.csv").write_text("file,label\n")
    params = {"train": {"learning_rate": 0.001, "cache_mb": 1024}, "model": {}}
    base = training_fingerprint(params, tmp_path, [])
    streamed = {**params, "train": {**params["train"], "cache_mb": 0}}
    other_rate = {**params, "train": {**params["train"], "learning_rate": 0.01}}
    assert training_fingerprint(streamed, tmp_path, []) == base
    assert training_fingerprint(other_rate, tmp_path, []) != base
