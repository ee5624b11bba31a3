"""Stage evaluate: score the trained model on the test split.

Reads params: evaluate, tracking. Reads: models/model.keras, data/processed/,
data/split/test.csv, metrics/train.json (the MLflow run id). Writes:
metrics/evaluate.json, metrics/per_class.csv, metrics/confusion.csv (one row
per test image, for `dvc plots`), metrics/confusion_matrix.csv,
metrics/most_confused.csv and plots/confusion_matrix.png. Logs the same
metrics and files to the training run in MLflow.
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
    most_confused,
    per_class_metrics,
    plot_confusion,
    summary_metrics,
)

log = logging.getLogger("stages.evaluate")

PROCESSED_DIR = Path("data/processed")
SPLIT_DIR = Path("data/split")
MODEL_FILE = Path("models/model.keras")
TRAIN_METRICS = Path("metrics/train.json")
OUTPUTS = {
    "metrics": Path("metrics/evaluate.json"),
    "per_class": Path("metrics/per_class.csv"),
    "predictions": Path("metrics/confusion.csv"),
    "confusion": Path("metrics/confusion_matrix.csv"),
    "most_confused": Path("metrics/most_confused.csv"),
    "confusion_plot": Path("plots/confusion_matrix.png"),
}


def predict(model_file: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Return class probabilities for `images` in their order, in one pass."""
    import keras

    model = keras.models.load_model(model_file)
    return model.predict(images, batch_size=batch_size, verbose=0)


def write_outputs(labels, probabilities, classes, top_k, outputs) -> dict[str, float]:
    """Compute every metric and table, write them, and return the summary."""
    predicted = probabilities.argmax(axis=1)
    metrics = summary_metrics(labels, probabilities, top_k)
    metrics["num_test_images"] = len(labels)
    per_class = per_class_metrics(labels, predicted, classes)
    counts = confusion_counts(labels, predicted, classes)
    names = np.array(classes)
    tables = {
        "per_class": per_class,
        "predictions": pd.DataFrame(
            {"actual": names[labels], "predicted": names[predicted]}
        ),
        "confusion": counts.rename_axis("true").reset_index(),
        "most_confused": most_confused(counts),
    }
    for key, table in tables.items():
        with atomic_file(outputs[key]) as tmp:
            table.to_csv(tmp, index=False)
    plot_confusion(counts, outputs["confusion_plot"])
    return metrics


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


def log_to_mlflow(params: Params, train_run_id: str, metrics: dict, per_class, outputs):
    """Log test metrics, per-class values and the output files; return the run id."""
    import mlflow

    from stages import tracking

    tracking.use_experiment(params.tracking)
    run_id = _target_run(params, train_run_id)
    with tracking.run_status(run_id):
        mlflow.log_metrics(
            tracking.finite_metrics({f"test_{k}": v for k, v in metrics.items()})
        )
        for row in per_class.itertuples(index=False):
            mlflow.log_metrics(
                tracking.finite_metrics(
                    {
                        f"test_{name}.{row[0]}": getattr(row, name)
                        for name in ("precision", "recall", "f1")
                    }
                )
            )
        for key in ("confusion_plot", "confusion", "per_class", "most_confused"):
            mlflow.log_artifact(str(outputs[key]), artifact_path="evaluation")
    return run_id


def evaluate(
    overrides: list[str],
    processed_dir: Path = PROCESSED_DIR,
    split_dir: Path = SPLIT_DIR,
    model_file: Path = MODEL_FILE,
    train_metrics: Path = TRAIN_METRICS,
    outputs: dict[str, Path] | None = None,
) -> dict[str, float]:
    """Evaluate the model on the test split and return the summary metrics."""
    outputs = outputs or OUTPUTS
    params = load_params(["evaluate", "tracking"], overrides)
    from stages.training import load_split, read_classes

    for path in (model_file, train_metrics):
        if not path.is_file():
            raise InputError(f"{path} not found; run the train stage first")
    classes = read_classes(processed_dir)
    images, labels = load_split(processed_dir, split_dir, "test")
    if len(images) == 0:
        raise InputError(f"{split_dir / 'test.csv'} is empty; raise split.test")
    log.info("Evaluating %s on %d test images", model_file, len(images))

    probabilities = predict(model_file, images, params.evaluate.batch_size)
    metrics = write_outputs(
        labels, probabilities, classes, params.evaluate.top_k, outputs
    )
    per_class = pd.read_csv(
        outputs["per_class"], dtype={"class": str}, keep_default_na=False
    )
    train_run_id = json.loads(train_metrics.read_text(encoding="utf-8"))[
        "mlflow_run_id"
    ]
    run_id = log_to_mlflow(params, train_run_id, metrics, per_class, outputs)
    write_json(outputs["metrics"], {**metrics, "mlflow_run_id": run_id})
    log.info(
        "Test accuracy %.4f, macro F1 %.4f; wrote %s",
        metrics["accuracy"],
        metrics["f1_macro"],
        outputs["metrics"],
    )
    return metrics


if __name__ == "__main__":
    run_stage(evaluate, __doc__)
