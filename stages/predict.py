"""Command image-predict: classify image files with a trained model.

Reads: models/model.keras or an MLflow model URI, the preprocess section of
params.yaml (or of the MLflow run that logged the model), and
data/processed/classes.json for the class names. Writes: the top-k classes of
each image as a table to stdout, or as CSV with --output. A file that is not a
readable image gets one row with the reason instead of stopping the command.

    image-predict photos/ scan.png --top-k 5
    image-predict photos/ --model runs:/<run_id>/model --output predictions.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from stages.cli import InputError, setup_logging
from stages.compare import positive_int, require_store
from stages.config import ConfigError, Params, find_root, load_params, validate
from stages.fsutil import atomic_file
from stages.images import DecodeSettings, ImageError, decode_image, is_ignored
from stages.preprocess import decode_settings
from stages.preprocessing import summarise_skipped

log = logging.getLogger("stages.predict")

MODEL_FILE = Path("models/model.keras")
CLASSES_FILE = Path("data/processed/classes.json")
COLUMNS = ["file", "rank", "label", "probability", "status", "error"]
MODEL_URI_PATTERN = re.compile(r"runs:/[^/]+/.+|models:/[^/]+(/[^/]+)?")
MODEL_URI_FORMS = (
    "runs:/<run_id>/model, models:/<name>/<version>, models:/<name>@<alias> "
    "or models:/m-<model_id>"
)


@dataclass(frozen=True)
class Classifier:
    """A loaded model and the facts about it that prediction needs."""

    predict: Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) to (N, classes)
    input_shape: tuple[int | None, ...] | None  # (height, width, channels)
    run_id: str | None  # the MLflow run that logged the model, if any


def is_mlflow_uri(model: str) -> bool:
    """Tell whether `model` names an MLflow model rather than a local file."""
    return model.startswith(("runs:/", "models:/"))


def find_images(paths: list[Path]) -> list[Path]:
    """List the files to classify: each file given, and every file under each folder.

    Folders are searched recursively in sorted order. Hidden and system files
    and folders inside them are left out, but a file named directly is kept.

    Raises:
        InputError: a path does not exist, or no file is left to classify.
    """
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise InputError(
            f"Path not found: {', '.join(missing)}; pass existing image files "
            "or folders"
        )
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            parts = candidate.relative_to(path).parts
            if candidate.is_file() and not any(is_ignored(p) for p in parts):
                files.append(candidate)
    if not files:
        raise InputError(
            f"No images found in {', '.join(map(str, paths))}; hidden and system "
            "files are skipped"
        )
    return list(dict.fromkeys(files))


def check_model_source(model: str) -> None:
    """Raise InputError unless `model` is an existing file or a valid MLflow URI."""
    if is_mlflow_uri(model):
        if not MODEL_URI_PATTERN.fullmatch(model):
            raise InputError(
                f"Invalid MLflow model URI '{model}'; expected {MODEL_URI_FORMS}"
            )
        return
    if not Path(model).is_file():
        raise InputError(
            f"Model file {model} not found; run `dvc repro` to train it, "
            "`dvc pull` to fetch it from the DVC remote, or pass --model "
            f"with a file or an MLflow URI ({MODEL_URI_FORMS})"
        )


def settings_from_run(run_params: dict[str, str], run_id: str) -> DecodeSettings | None:
    """Build the decoder settings from the preprocess.* params of an MLflow run.

    The training run logs each params.yaml value as text ("[16, 16]",
    "grayscale"), which YAML parses back to its type.

    Returns:
        The settings, or None when the run logged no preprocess params.

    Raises:
        ConfigError: a logged preprocess value is missing or invalid.
    """
    section = {
        key.removeprefix("preprocess."): _parse_logged_value(value)
        for key, value in run_params.items()
        if key.startswith("preprocess.")
    }
    if not section:
        return None
    params = validate(
        {"preprocess": section}, ["preprocess"], f"the params of MLflow run {run_id}"
    )
    return decode_settings(params.preprocess)


def _parse_logged_value(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # validation then reports it as an invalid value


def load_keras_file(path: Path) -> Classifier:
    """Load a Keras model file saved by the train stage.

    Raises:
        InputError: the file is not a Keras model that this Keras can read.
    """
    from stages.tfimport import import_keras

    keras = import_keras()
    try:
        model = keras.models.load_model(path)
    except (OSError, ValueError) as error:
        raise InputError(
            f"Cannot load model file {path}: {error}; run `dvc repro` to rebuild "
            "it or `dvc pull` to fetch it"
        ) from None

    def predict(pixels: np.ndarray) -> np.ndarray:
        return model.predict(pixels, batch_size=len(pixels), verbose=0)

    return Classifier(predict, tuple(model.input_shape[1:]), run_id=None)


def load_mlflow_model(uri: str, tracking_uri: str) -> Classifier:
    """Load an MLflow model as a pyfunc model, with its input shape and run id.

    Raises:
        InputError: the run, registered model or logged model is not found,
            or has no model at that path.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as error:
        raise InputError(
            f"Cannot load MLflow model {uri} from {tracking_uri}: {error.message}; "
            "check the URI against `image-compare` or the MLflow UI, or pass "
            "--tracking-uri"
        ) from None

    schema = model.metadata.get_input_schema()
    input_shape = None
    if schema is not None and schema.is_tensor_spec() and len(schema.inputs) == 1:
        input_shape = tuple(schema.inputs[0].shape[1:])

    return Classifier(_pyfunc_predictor(model), input_shape, model.metadata.run_id)


def _pyfunc_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    if "keras" in model.metadata.flavors:
        # The pyfunc wrapper calls Keras predict with a progress bar on stdout,
        # where it would mix into the table, so the Keras model is used directly.
        keras_model = model.get_raw_model()

        def predict(pixels: np.ndarray) -> np.ndarray:
            return keras_model.predict(pixels, batch_size=len(pixels), verbose=0)

        return predict

    def predict_quietly(pixels: np.ndarray) -> np.ndarray:
        with contextlib.redirect_stdout(sys.stderr):
            return np.asarray(model.predict(pixels))

    return predict_quietly


def load_classifier(
    model: str, params: Params, tracking_uri: str | None
) -> tuple[Classifier, DecodeSettings]:
    """Load the model and the decoder settings it was trained with.

    A local model file uses params.yaml. An MLflow model uses the preprocess
    params of the run that logged it, or params.yaml when there is no run.
    """
    yaml_settings = decode_settings(params.preprocess)
    if not is_mlflow_uri(model):
        return load_keras_file(Path(model)), yaml_settings

    from mlflow.tracking import MlflowClient

    from stages import tracking

    uri = tracking_uri or tracking.tracking_uri(params.tracking)
    require_store(uri)
    classifier = load_mlflow_model(model, uri)
    settings = None
    if classifier.run_id:
        run_params = MlflowClient(uri).get_run(classifier.run_id).data.params
        settings = settings_from_run(run_params, classifier.run_id)
    if settings is None:
        log.warning(
            "MLflow model %s has no run with preprocess params; decoding images "
            "with the preprocess section of params.yaml",
            model,
        )
        return classifier, yaml_settings
    log.info("Decoding images with the preprocess params of run %s", classifier.run_id)
    return classifier, settings


def check_input_shape(classifier: Classifier, settings: DecodeSettings) -> None:
    """Raise InputError when the decoded images would not fit the model input."""
    if classifier.input_shape is None:
        return
    decoded = (settings.height, settings.width, settings.channels)
    expected = classifier.input_shape
    fits = len(expected) == 3 and all(
        size in (None, -1, actual)
        for size, actual in zip(expected, decoded, strict=True)
    )
    if not fits:
        raise InputError(
            f"The model expects images of shape {expected} (height, width, "
            f"channels), but the preprocess settings decode to {decoded}; set "
            "preprocess.image_size and preprocess.color_mode in params.yaml to "
            "the values the model was trained with"
        )


def read_class_names(path: Path) -> list[str]:
    """Read a JSON list of class names in class-index order."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(names, list):
        raise InputError(
            f"{path}: expected a JSON list of class names, got {type(names).__name__}"
        )
    return [str(name) for name in names]


def missing_classes_message(path: Path) -> str:
    """Describe a missing class names file and how to create it."""
    return (
        f"Class names file {path} not found; create it with `dvc repro` or "
        "`dvc pull`, or pass --classes FILE.json"
    )


def class_names(path: Path, num_classes: int, required: bool) -> list[str]:
    """Return the label of each class index, read from `path`.

    Args:
        path: JSON list of class names, as the preprocess stage writes it.
        num_classes: number of probabilities the model outputs.
        required: raise instead of falling back to class indices when the
            file is missing or lists another number of classes.

    Raises:
        InputError: `required` and the file is missing or does not match.
    """
    indices = [str(i) for i in range(num_classes)]
    if not path.is_file():
        if required:
            raise InputError(missing_classes_message(path))
        log.warning(
            "%s not found and the MLflow model has no class names; labels are "
            "class indices (pass --classes FILE.json to name them)",
            path,
        )
        return indices
    names = read_class_names(path)
    if len(names) != num_classes:
        message = (
            f"{path} lists {len(names)} class names but the model outputs "
            f"{num_classes} probabilities"
        )
        if required:
            raise InputError(
                f"{message}; run `dvc repro` so that the model and the class "
                "names come from the same data, or pass --classes FILE.json"
            )
        log.warning("%s; labels are class indices", message)
        return indices
    if not required:
        log.warning(
            "The MLflow model has no class names; labels come from %s, which may "
            "belong to other data",
            path,
        )
    return names


def decode_files(
    files: list[Path], settings: DecodeSettings
) -> tuple[dict[Path, np.ndarray], dict[Path, str]]:
    """Decode each file; return the pixels of the images and the reason for the rest."""
    pixels, errors = {}, {}
    for path in files:
        try:
            pixels[path] = decode_image(path, settings).pixels
        except ImageError as error:
            errors[path] = str(error)
        except OSError as error:
            errors[path] = f"cannot read file ({error.strerror or error})"
    return pixels, errors


def classify_batch(
    files: list[Path], classifier: Classifier, settings: DecodeSettings, top_k: int
) -> tuple[list[dict], int | None]:
    """Decode and classify one batch.

    Returns:
        The rows in file order: `top_k` rows with a class index per image, and
        one row with the reason per unreadable file. Also the number of
        classes the model outputs, or None when no file was a readable image.
    """
    pixels, errors = decode_files(files, settings)
    probabilities, num_classes = {}, None
    if pixels:
        predicted = classifier.predict(np.stack(list(pixels.values())))
        probabilities = dict(zip(pixels, predicted, strict=True))
        num_classes = predicted.shape[1]

    rows = []
    for path in files:
        if path in errors:
            rows.append({"file": str(path), "status": "skipped", "error": errors[path]})
            continue
        values = probabilities[path]
        ranked = np.argsort(-values, kind="stable")[: min(top_k, len(values))]
        for rank, index in enumerate(ranked, start=1):
            rows.append(
                {
                    "file": str(path),
                    "rank": rank,
                    "class_index": int(index),
                    "probability": float(values[index]),
                    "status": "ok",
                    "error": "",
                }
            )
    return rows, num_classes


def classify_files(
    files: list[Path],
    classifier: Classifier,
    settings: DecodeSettings,
    top_k: int,
    batch_size: int,
) -> tuple[list[dict], int | None]:
    """Classify `files` in batches of `batch_size`; see `classify_batch`."""
    rows: list[dict] = []
    num_classes = None
    progress = tqdm(total=len(files), desc="predict", unit="img", mininterval=1.0)
    with progress:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            batch_rows, batch_classes = classify_batch(
                batch, classifier, settings, top_k
            )
            rows += batch_rows
            num_classes = num_classes or batch_classes
            progress.update(len(batch))
    return rows, num_classes


def build_table(rows: list[dict], labels: list[str]) -> pd.DataFrame:
    """Turn the rows into the output table, with `labels[class_index]` as label."""
    table = pd.DataFrame(rows).reindex(columns=[*COLUMNS, "class_index"])
    table["label"] = [
        None if pd.isna(index) else labels[int(index)] for index in table["class_index"]
    ]
    table["rank"] = table["rank"].astype("Int64")
    table["probability"] = table["probability"].astype(float)
    return table[COLUMNS]


def format_table(table: pd.DataFrame) -> str:
    """Render the prediction table as aligned text, with 4-decimal probabilities."""
    printable = table.astype(object).where(table.notna(), "")
    printable["probability"] = [
        f"{p:.4f}" if p != "" else "" for p in printable["probability"]
    ]
    return printable.to_string(index=False)


def predict_images(
    paths: list[Path],
    model: str | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    output: Path | None = None,
    classes_file: Path | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """Classify image files and return the table of top-k predictions.

    Args:
        paths: image files and folders, searched recursively.
        model: model file or MLflow URI (default: models/model.keras in the
            project folder).
        top_k: rows per image, best class first.
        batch_size: number of images decoded and predicted together.
        output: CSV file to write the table to.
        classes_file: JSON list of class names (default:
            data/processed/classes.json in the project folder).
        tracking_uri: MLflow store of an MLflow model (default: the store of
            params.yaml's tracking section, as `stages.tracking.tracking_uri`
            resolves it).

    Returns:
        One row per image and rank, and one row per unreadable file, with the
        columns file, rank, label, probability, status ("ok" or "skipped")
        and error.
    """
    root = find_root()
    params = load_params(["preprocess", "tracking"])
    files = find_images(paths)
    model = model or str(root / MODEL_FILE)
    check_model_source(model)
    # NOTE: MLflow runs log no class names, so unless --classes is given, an
    # MLflow model is labelled from the project's classes.json, which may come
    # from other data, or with class indices when that file does not fit.
    names_file = classes_file or root / CLASSES_FILE
    names_required = classes_file is not None or not is_mlflow_uri(model)
    if names_required and not names_file.is_file():
        raise InputError(missing_classes_message(names_file))
    log.info("Classifying %d files with %s", len(files), model)

    classifier, settings = load_classifier(model, params, tracking_uri)
    check_input_shape(classifier, settings)
    rows, num_classes = classify_files(files, classifier, settings, top_k, batch_size)
    names = []
    if num_classes is not None:
        names = class_names(names_file, num_classes, names_required)
    table = build_table(rows, names)
    _report(table, output)
    return table


def _report(table: pd.DataFrame, output: Path | None) -> None:
    skipped = table[table["status"] == "skipped"]
    num_images = table.loc[table["status"] == "ok", "file"].nunique()
    log.info("Classified %d images", num_images)
    if len(skipped):
        reasons = skipped.rename(columns={"error": "reason"})
        log.warning("%s", summarise_skipped(reasons))
    if output is not None:
        with atomic_file(output) as tmp:
            table.to_csv(tmp, index=False)
        log.info("Wrote %d rows to %s", len(table), output)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of image-predict."""
    parser = argparse.ArgumentParser(
        prog="image-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files or folders"
    )

    parser.add_argument(
        "--model",
        metavar="FILE_OR_URI",
        help=f"Keras model file or MLflow model URI ({MODEL_URI_FORMS}); "
        f"default: {MODEL_FILE} in the project folder",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        metavar="K",
        default=3,
        help="number of classes listed per image, best first (default: 3)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        default=64,
        help="number of images decoded and predicted together (default: 64)",
    )

    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.csv",
        help="write the table as CSV to this file instead of printing it",
    )
    parser.add_argument(
        "--classes",
        type=Path,
        metavar="FILE.json",
        help=f"JSON list of class names in class-index order (default: {CLASSES_FILE})",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI for an MLflow model (default: MLFLOW_TRACKING_URI, "
        "else tracking.uri in params.yaml, else mlflow.db in the project folder)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run image-predict; configuration and input errors exit with status 2."""
    args = parse_args(argv)
    setup_logging()
    try:
        table = predict_images(
            args.paths,
            model=args.model,
            top_k=args.top_k,
            batch_size=args.batch_size,
            output=args.output,
            classes_file=args.classes,
            tracking_uri=args.tracking_uri,
        )
    except (ConfigError, InputError) as error:
        log.error("%s", error)
        sys.exit(2)
    if args.output is None:
        print(format_table(table))


if __name__ == "__main__":
    main()
