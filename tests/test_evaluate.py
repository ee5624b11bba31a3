"""Stage evaluate: test metrics, confusion matrix files and MLflow logging."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from stages.evaluate import OUTPUTS, evaluate
from tests.conftest import client_for


def test_evaluate_writes_metrics(evaluated) -> None:
    project, _, metrics = evaluated
    assert metrics["num_test_images"] == len(
        pd.read_csv(project / "data/split/test.csv")
    )
    assert 0.5 < metrics["accuracy"] <= metrics["top_3_accuracy"] <= 1.0
    for key in ("precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        assert 0.0 < metrics[key] <= 1.0, key
    saved = json.loads((project / "metrics/evaluate.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]


def test_evaluate_confusion_tables_agree(evaluated) -> None:
    project, _, metrics = evaluated
    predictions = pd.read_csv(project / "metrics/confusion.csv", dtype=str)
    assert list(predictions.columns) == ["actual", "predicted"]
    accuracy = (predictions["actual"] == predictions["predicted"]).mean()
    assert accuracy == pytest.approx(metrics["accuracy"])
    matrix = pd.read_csv(project / "metrics/confusion_matrix.csv", index_col="true")
    assert matrix.to_numpy().sum() == metrics["num_test_images"]
    assert (
        matrix.to_numpy().trace()
        == (predictions["actual"] == predictions["predicted"]).sum()
    )
    per_class = pd.read_csv(project / "metrics/per_class.csv", dtype={"class": str})
    assert per_class["class"].tolist() == [str(d) for d in range(10)]
    assert per_class["support"].sum() == metrics["num_test_images"]
    assert (project / "plots/confusion_matrix.png").stat().st_size > 5000


def test_evaluate_logs_to_training_run(evaluated) -> None:
    project, train_metrics, metrics = evaluated
    client = client_for(project)
    run = client.get_run(train_metrics["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert "test_f1.3" in run.data.metrics
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts
    assert "evaluation/per_class.csv" in artifacts


def test_evaluate_changed_settings_use_child_run(evaluated, monkeypatch) -> None:
    project, train_metrics, _ = evaluated
    monkeypatch.chdir(project)
    outputs = {k: project / "scratch" / v.name for k, v in OUTPUTS.items()}
    metrics = evaluate(["evaluate.top_k=5"], outputs=outputs)
    saved = json.loads(outputs["metrics"].read_text())
    child = client_for(project).get_run(saved["mlflow_run_id"])
    assert saved["mlflow_run_id"] != train_metrics["mlflow_run_id"]
    assert child.data.tags["mlflow.parentRunId"] == train_metrics["mlflow_run_id"]
    assert child.data.params["evaluate.top_k"] == "5"
    assert child.data.metrics["test_top_5_accuracy"] == metrics["top_5_accuracy"]


def _broken_split(project: Path, target: Path, edit) -> Path:
    """Copy the project's split manifests to `target`, editing test.csv."""
    shutil.copytree(project / "data/split", target)
    manifest = target / "test.csv"
    manifest.write_text(edit(manifest.read_text()))
    return target


def _set_first_row(column: str, value: str):
    def edit(text: str) -> str:
        lines = text.splitlines()
        header = lines[0].split(",")
        cells = lines[1].split(",")
        cells[header.index(column)] = value
        return "\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n"

    return edit


def _drop_column(column: str):
    def edit(text: str) -> str:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        return table.drop(columns=[column]).to_csv(index=False)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_first_row("class_index", "-1"), "class_index -1 is outside"),
        (_set_first_row("class_index", "10"), "class_index 10 is outside"),
        (
            _set_first_row("class_index", "x"),
            "invalid column class_index, expected integers",
        ),
        (_set_first_row("label", "cat"), "has label 'cat' but class_index"),
        (_drop_column("sha256"), "is missing the columns ['sha256']"),
        (lambda text: "", "is not a valid manifest"),
    ],
)
def test_evaluate_rejects_broken_manifest(
    evaluated, tmp_path: Path, monkeypatch, edit, message: str
) -> None:
    from stages.cli import InputError

    project, _, _ = evaluated
    monkeypatch.chdir(project)
    split_dir = _broken_split(project, tmp_path / "split", edit)
    outputs = {k: tmp_path / "out" / v.name for k, v in OUTPUTS.items()}
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        evaluate([], split_dir=split_dir, outputs=outputs)
    assert str(split_dir / "test.csv") in str(caught.value)
    assert not outputs["metrics"].exists()
