"""What an MLflow run contains after the real stages: config, inputs, hashes,
evaluation files, and safe keys for awkward class names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.download import download
from stages.evaluate import evaluate
from stages.preprocess import preprocess
from stages.split import split
from stages.train import train
from tests.conftest import client_for, make_image_folder

ODD_CLASSES = {"a,b": 8, "dog@home": 8, "[x]": 8, "crème": 8}


def test_run_holds_config_and_overrides(evaluated) -> None:
    project, train_metrics, _ = evaluated
    client = client_for(project)
    run_id = train_metrics["mlflow_run_id"]
    config = yaml.safe_load(
        Path(client.download_artifacts(run_id, "config/params.yaml")).read_text()
    )
    assert config["train"]["epochs"] == 2
    assert config["model"]["name"] == "cnn_small"
    overrides = yaml.safe_load(
        Path(client.download_artifacts(run_id, "config/overrides.yaml")).read_text()
    )
    assert overrides == ["model=cnn_small", "train.epochs=2", "train.batch_size=64"]


def test_run_records_data_inputs_and_hashes(evaluated) -> None:
    project, train_metrics, _ = evaluated
    run = client_for(project).get_run(train_metrics["mlflow_run_id"])
    contexts = {
        tag.value
        for data in run.inputs.dataset_inputs
        for tag in data.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"train", "val", "test"}
    for name in ("train", "val", "test", "processed"):
        assert len(run.data.tags[f"data_sha256.{name}"]) == 64, name
    assert run.data.tags["overrides"].startswith("model=cnn_small")


def test_run_holds_evaluation_bundle(evaluated) -> None:
    project, train_metrics, metrics = evaluated
    client = client_for(project)
    run = client.get_run(train_metrics["mlflow_run_id"])
    assert 0.5 < metrics["roc_auc_macro"] <= 1.0
    assert run.data.metrics["test_roc_auc_macro"] == pytest.approx(
        metrics["roc_auc_macro"]
    )
    assert "test_roc_auc.7" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in (
        "roc_pr_curves.png",
        "misclassified.png",
        "training_curves.png",
        "confusion_matrix_normalised.csv",
        "curves.csv",
        "class_keys.json",
    ):
        assert f"evaluation/{name}" in logged, name
    for picture in ("roc_pr_curves", "misclassified", "training_curves"):
        assert (project / f"plots/{picture}.png").stat().st_size > 5000, picture


@pytest.fixture(scope="module")
def odd_project(tmp_path_factory: pytest.TempPathFactory):
    """A project whose class names need sanitising, after all five stages."""
    from tests.conftest import copy_config

    root = tmp_path_factory.mktemp("odd")
    folder = copy_config(root / "project")
    images = make_image_folder(root / "images", ODD_CLASSES, size=(16, 16))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DVC_ROOT", raising=False)
        download(["dataset=folder", f"dataset.path={images}"])
        preprocess([])
        split(["split.train=0.5", "split.val=0.25", "split.test=0.25"])
        common = ["model=cnn_small", "train.batch_size=8"]
        train([*common, "train.epochs=2"])
        evaluate([])
        yield folder


def test_odd_class_names_get_safe_keys(odd_project: Path) -> None:
    metrics = json.loads((odd_project / "metrics/evaluate.json").read_text())
    client = client_for(odd_project)
    run = client.get_run(metrics["mlflow_run_id"])
    keys = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "evaluation/class_keys.json")
        ).read_text()
    )
    assert keys == {
        "[x]": "_x_",
        "a,b": "a_b",
        "crème": "cr_me",
        "dog@home": "dog_home",
    }
    for key in keys.values():
        assert f"test_f1.{key}" in run.data.metrics, key
    assert run.info.status == "FINISHED"


def test_nan_loss_is_tagged_not_logged(odd_project: Path, monkeypatch) -> None:
    monkeypatch.chdir(odd_project)
    metrics = train(
        [
            "model=cnn_small",
            "train.epochs=1",
            "train.batch_size=8",
            "train.optimizer=sgd",
            "train.learning_rate=1e30",
        ]
    )
    run = client_for(odd_project).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("nonfinite.train_loss") == "nan"
    assert "train_loss" not in run.data.metrics


def test_crash_mid_training_marks_run_failed(
    digits_project: Path, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits_project / "data", broken / "data")
    manifest = broken / "data/split/train.csv"
    rows = manifest.read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("class_index")
    first = rows[1].split(",")
    first[column] = "99"  # no such class: the loss fails inside fit()
    manifest.write_text("\n".join([rows[0], ",".join(first), *rows[2:]]) + "\n")
    monkeypatch.chdir(digits_project)
    client = client_for(digits_project)
    experiment = client.get_experiment_by_name("image-classification").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    with pytest.raises(Exception, match="99"):
        train(
            ["model=cnn_small", "train.epochs=1"],
            processed_dir=broken / "data/processed",
            split_dir=broken / "data/split",
            outputs={
                "model": tmp_path / "model.keras",
                "predictions": tmp_path / "test_predictions.npz",
                "metrics": tmp_path / "train.json",
                "history": tmp_path / "history.csv",
            },
        )
    runs = client.search_runs([experiment])
    (failed,) = [r for r in runs if r.info.run_id not in before]
    assert failed.info.status == "FAILED"
    assert "99" in failed.data.tags["error"]
    assert not (tmp_path / "model.keras").exists()


def test_system_metrics_logged_when_enabled(
    digits_project: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(digits_project)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    outputs = {
        "model": tmp_path / "model.keras",
        "predictions": tmp_path / "test_predictions.npz",
        "metrics": tmp_path / "train.json",
        "history": tmp_path / "history.csv",
    }
    metrics = train(
        ["model=cnn_small", "train.epochs=3", "tracking.system_metrics=true"],
        outputs=outputs,
    )
    run = client_for(digits_project).get_run(metrics["mlflow_run_id"])
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system
