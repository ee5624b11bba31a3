"""Stage evaluate: score the trained model's predictions on the test split.

Reads params: evaluate, tracking. Reads: models/test_predictions.npz (the
class probabilities that the train stage wrote), data/processed/,
data/split/test.csv, metrics/train.json (the MLflow run id) and
metrics/history.csv. It does not import TensorFlow, which saves about 3 s
per run. Writes: metrics/evaluate.json, metrics/per_class.csv,
metrics/confusion.csv (one row per test image, for `dvc plots`),
metrics/confusion_matrix.csv (counts), metrics/confusion_matrix_normalised.csv,
metrics/most_confused.csv, metrics/curves.csv (ROC and precision-recall) and
the pictures plots/confusion_matrix.png, plots/roc_pr_curves.png,
plots/misclassified.png and plots/training_curves.png. Logs the metrics and
files to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError, run_stage
from stages.config import Params, load_params
from stages.fsutil import atomic_file, write_json
from stages.metrics import (
    confusion_counts,
    missing_glyphs_summarised,
    most_confused,
    normalised_confusion,
    one_vs_rest_curves,
    per_class_metrics,
    plot_confusion,
    plot_curves,
    plot_history,
    plot_misclassified,
    summary_metrics,
)
from stages.shards import ShardedImages

log = logging.getLogger("stages.evaluate")

PROCESSED_DIR = Path("data/processed")
SPLIT_DIR = Path("data/split")
PREDICTIONS_FILE = Path("models/test_predictions.npz")
TRAIN_METRICS = Path("metrics/train.json")
HISTORY_FILE = Path("metrics/history.csv")
OUTPUTS = {
    "metrics": Path("metrics/evaluate.json"),
    "per_class": Path("metrics/per_class.csv"),
    "predictions": Path("metrics/confusion.csv"),
    "confusion": Path("metrics/confusion_matrix.csv"),
    "confusion_normalised": Path("metrics/confusion_matrix_normalised.csv"),
    "most_confused": Path("metrics/most_confused.csv"),
    "curves": Path("metrics/curves.csv"),
    "confusion_plot": Path("plots/confusion_matrix.png"),
    "curves_plot": Path("plots/roc_pr_curves.png"),
    "misclassified_plot": Path("plots/misclassified.png"),
    "history_plot": Path("plots/training_curves.png"),
}
# Files logged to MLflow under evaluation/, besides the class key mapping.
LOGGED_OUTPUTS = (
    "confusion_plot",
    "curves_plot",
    "misclassified_plot",
    "history_plot",
    "confusion",
    "confusion_normalised",
    "per_class",
    "most_confused",
    "curves",
)


def write_outputs(
    images: ShardedImages | np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    top_k: int,
    outputs: dict[str, Path],
) -> tuple[dict[str, float], dict[str, float]]:
    """Compute every metric, table and picture, write them, and return the
    summary metrics and the per-class areas under the curves."""
    predicted = probabilities.argmax(axis=1)
    metrics = summary_metrics(labels, probabilities, top_k)
    metrics["num_test_images"] = len(labels)
    counts = confusion_counts(labels, predicted, classes)
    curves, areas = one_vs_rest_curves(labels, probabilities, classes)
    metrics.update({k: v for k, v in areas.items() if k.endswith("_macro")})
    names = np.array(classes)
    tables = {
        "per_class": per_class_metrics(labels, predicted, classes),
        "predictions": pd.DataFrame(
            {"actual": names[labels], "predicted": names[predicted]}
        ),
        "confusion": counts.rename_axis("true").reset_index(),
        "confusion_normalised": normalised_confusion(counts)
        .round(6)
        .rename_axis("true")
        .reset_index(),
        "most_confused": most_confused(counts),
        "curves": curves,
    }
    for key, table in tables.items():
        with atomic_file(outputs[key]) as tmp:
            table.to_csv(tmp, index=False)
    with missing_glyphs_summarised("evaluation pictures"):
        plot_confusion(counts, outputs["confusion_plot"])
        plot_curves(curves, areas, outputs["curves_plot"])
        metrics["num_misclassified_shown"] = plot_misclassified(
            images, labels, probabilities, classes, outputs["misclassified_plot"]
        )
    per_class_areas = {k: v for k, v in areas.items() if not k.endswith("_macro")}
    return metrics, per_class_areas


def class_keys(classes: list[str]) -> dict[str, str]:
    """Map each class name to a unique key made of characters MLflow accepts."""
    from stages.tracking import sanitize_key

    keys: dict[str, str] = {}
    for name in classes:
        key = sanitize_key(name) or "class"
        candidate, suffix = key, 2
        while candidate in keys.values():
            candidate, suffix = f"{key}_{suffix}", suffix + 1
        keys[name] = candidate
    return keys


def _target_run(params: Params, train_run_id: str) -> str:
    """Return the run to log into: the training run, or a child run when the
    evaluate settings differ from the ones the training run recorded."""
    import mlflow

    from stages import tracking

    logged = mlflow.get_run(train_run_id).data.params
    current = tracking.flatten({"evaluate": params.raw["evaluate"]})
    if all(logged.get(k) == v for k, v in current.items()):
        mlflow.start_run(run_id=train_run_id)
        return train_run_id
    run = mlflow.start_run(
        run_name="evaluate", tags={"mlflow.parentRunId": train_run_id}
    )
    mlflow.log_params(tracking.shorten_values(current))
    log.info(
        "evaluate settings changed since training; logging to child run %s",
        run.info.run_id,
    )
    return run.info.run_id


def per_class_values(
    per_class: pd.DataFrame, areas: dict[str, float], keys: dict[str, str]
) -> dict[str, float]:
    """Flatten per-class precision, recall, F1 and areas to `test_<name>.<key>`."""
    values = {}
    for row in per_class.itertuples(index=False):
        key = keys[row[0]]
        for name in ("precision", "recall", "f1"):
            values[f"test_{name}.{key}"] = getattr(row, name)
    for area, value in areas.items():
        kind, name = area.split(".", 1)
        values[f"test_{kind}.{keys[name]}"] = value
    return values


def log_to_mlflow(
    params: Params,
    train_run_id: str,
    metrics: dict[str, float],
    per_class_metrics: dict[str, float],
    keys: dict[str, str],
    outputs: dict[str, Path],
) -> str:
    """Log test metrics, per-class values and the output files; return the run id."""
    import mlflow

    from stages import tracking

    tracking.use_experiment(params.tracking)
    run_id = _target_run(params, train_run_id)
    with tracking.run_status(run_id):
        summary = {f"test_{k}": v for k, v in metrics.items()}
        mlflow.log_metrics(tracking.finite_metrics(summary))
        mlflow.log_metrics(tracking.finite_metrics(per_class_metrics))
        mlflow.log_dict(keys, "evaluation/class_keys.json")
        for key in LOGGED_OUTPUTS:
            if outputs[key].is_file():
                mlflow.log_artifact(str(outputs[key]), artifact_path="evaluation")
    return run_id


def evaluate(
    overrides: list[str],
    processed_dir: Path = PROCESSED_DIR,
    split_dir: Path = SPLIT_DIR,
    predictions_file: Path = PREDICTIONS_FILE,
    train_metrics: Path = TRAIN_METRICS,
    history_file: Path = HISTORY_FILE,
    outputs: dict[str, Path] | None = None,
) -> dict[str, float]:
    """Evaluate the model on the test split and return the summary metrics."""
    outputs = outputs or OUTPUTS
    params = load_params(["evaluate", "tracking"], overrides)
    from stages.predictions import load_predictions
    from stages.training import (
        check_manifest_labels,
        read_classes,
        read_manifest,
        split_arrays,
    )

    if not train_metrics.is_file():
        raise InputError(f"{train_metrics} not found; run the train stage first")
    classes = read_classes(processed_dir)
    manifest = read_manifest(split_dir, "test")
    if manifest.empty:
        raise InputError(f"{split_dir / 'test.csv'} is empty; raise split.test")
    check_manifest_labels(manifest, classes, split_dir / "test.csv")
    probabilities = load_predictions(predictions_file, manifest, len(classes))
    images, labels = split_arrays(processed_dir, manifest)
    log.info("Scoring %s on %d test images", predictions_file, len(images))
    metrics, areas = write_outputs(
        images, labels, probabilities, classes, params.evaluate.top_k, outputs
    )
    if history_file.is_file():
        plot_history(pd.read_csv(history_file), outputs["history_plot"])
    per_class = pd.read_csv(
        outputs["per_class"], dtype={"class": str}, keep_default_na=False
    )
    keys = class_keys(classes)
    train_run_id = json.loads(train_metrics.read_text(encoding="utf-8"))[
        "mlflow_run_id"
    ]
    run_id = log_to_mlflow(
        params,
        train_run_id,
        metrics,
        per_class_values(per_class, areas, keys),
        keys,
        outputs,
    )
    write_json(outputs["metrics"], {**metrics, "mlflow_run_id": run_id})
    log.info(
        "Test accuracy %.4f, macro F1 %.4f, %d misclassified shown; wrote %s",
        metrics["accuracy"],
        metrics["f1_macro"],
        metrics["num_misclassified_shown"],
        outputs["metrics"],
    )
    return metrics


if __name__ == "__main__":
    run_stage(evaluate, __doc__)
