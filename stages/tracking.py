"""MLflow helpers: where runs go, what they carry, and how they end.

By default every run lands in mlflow.db and mlartifacts/ at the project root.
DVC runs queued and --temp experiments in a copy under .dvc/tmp/exps/ and sets
DVC_ROOT to the original project there, so the default store is the same for
`dvc repro` and every kind of `dvc exp run`.

With a tracking server (an http or https URI), `use_experiment` checks that
the server responds before any heavy work, and routes the run through
stages.offline, which moves it to the default store if the server goes away.
Secrets in URIs, params, tags and log lines are masked (stages.redaction).
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stages.config import TrackingConfig, find_root
from stages.fsutil import waiting_lock
from stages.redaction import (
    install_log_redaction,
    mask_uri,
    redact,
    redact_config,
    redact_flat,
    redact_value,
    strip_credentials,
)

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
TRUNCATION_MARK = "...[truncated]"


def project_root() -> Path:
    """Return the original project folder, also inside a DVC experiment copy."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and Path(dvc_root, "conf").is_dir():
        return Path(dvc_root).resolve()
    return find_root()


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI for subprocesses.
# A value exported that way by `use_experiment` is not the user's choice, so
# it must not override tracking.uri the next time a stage runs in this process.
_exported_uri: str | None = None


def tracking_uri(cfg: TrackingConfig) -> str:
    """Return MLFLOW_TRACKING_URI, else tracking.uri, else the default store."""
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    if exported and exported != _exported_uri:
        return exported
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{project_root() / DB_NAME}"


def default_artifact_location(uri: str) -> str | None:
    """Return the artifact folder for new experiments of the default store.

    Without one, MLflow would put artifacts under ./mlruns of whatever folder
    the stage runs in, which for DVC experiments is a temporary copy.
    """
    if uri == f"sqlite:///{project_root() / DB_NAME}":
        return (project_root() / ARTIFACTS_DIR).as_uri()
    return None


def is_remote(uri: str) -> bool:
    """Tell whether `uri` names a tracking server rather than a local store."""
    return uri.lower().startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float) -> str | None:
    """Return why the tracking server at `uri` is unreachable, or None.

    Any HTTP response from `<uri>/health`, even an error status, means that
    the server is up. Only a failed connection or a timeout is a problem.
    """
    import urllib.error
    import urllib.request

    url = strip_credentials(uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as error:
        return str(error.reason)
    except OSError as error:  # a timeout while reading the response
        return str(error) or type(error).__name__


def connect(uri: str, cfg: TrackingConfig) -> str:
    """Check the tracking server before any heavy work; return the store in use.

    Raises:
        TrackingUnavailableError: the server does not respond within
            tracking.connect_timeout seconds and tracking.offline_fallback
            is false.
    """
    from stages import offline

    failover = offline.activate(uri, cfg.experiment_name, cfg.offline_fallback)
    problem = server_problem(uri, cfg.connect_timeout)
    if problem is None:
        failover.offline_reason = None
        return uri
    if not cfg.offline_fallback:
        raise offline.unavailable_error(uri, problem)
    local = offline.local_store_uri()
    log.warning(
        "MLflow tracking server %s is not reachable (%s). tracking.offline_fallback "
        "is true, so this stage logs to the local store %s; its runs get the tag "
        "%s=true. Copy them to the server with %s once it is back.",
        mask_uri(uri),
        redact(problem),
        local,
        offline.TAG_FALLBACK,
        offline.UPLOAD_HINT,
    )
    failover.go_offline(problem)
    return f"{local} (offline fallback for {uri})"


def use_experiment(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    A tracking server that does not respond stops the stage here, within
    tracking.connect_timeout seconds, unless tracking.offline_fallback is set.
    """
    import mlflow

    global _exported_uri
    install_log_redaction()
    uri = tracking_uri(cfg)
    store = connect(uri, cfg) if is_remote(uri) else uri
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        _exported_uri = uri
    with store_setup_lock(uri):
        experiment_id = _experiment_id(cfg.experiment_name, uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    log.info("MLflow store %s, experiment '%s'", redact(store), cfg.experiment_name)
    return experiment_id


def store_setup_lock(uri: str):
    """Return a lock that serialises the first use of a SQLite store.

    MLflow creates the tables of a new SQLite database on first use. Two
    stages doing so at once (experiments run by `dvc queue start -j 2`, for
    instance) fail with "table ... already exists". Other stores need no lock.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return nullcontext()
    database = Path(uri[len(prefix) :].split("?", 1)[0])
    return waiting_lock(database.with_name(f".{database.name}.lock"))


def _experiment_id(name: str, uri: str) -> str:
    """Return the id of experiment `name`, creating it if it does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(
            name, artifact_location=default_artifact_location(uri)
        )
    except MlflowException:
        # Another process created it between the lookup and the create.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested sections to dotted keys with string values."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def shorten_values(params: dict[str, str]) -> dict[str, str]:
    """Cut values over MLflow's length limit, ending them with a marker."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    room = MAX_PARAM_VAL_LENGTH - len(TRUNCATION_MARK)
    return {
        k: v if len(v) <= MAX_PARAM_VAL_LENGTH else v[:room] + TRUNCATION_MARK
        for k, v in params.items()
    }


def sanitize_key(name: str) -> str:
    """Replace characters MLflow rejects in metric and param keys with '_'."""
    return re.sub(r"[^\w\-. /]", "_", name, flags=re.ASCII)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN and infinite values, because MLflow rejects or alters them.

    Each dropped value is logged as a warning and, when a run is active,
    recorded in a `nonfinite.<metric>` tag.
    """
    import mlflow

    kept = {}
    for key, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            log.warning("Metric %s is %s; not logged", key, value)
            if mlflow.active_run():
                mlflow.set_tag(f"nonfinite.{sanitize_key(key)}", str(value))
            continue
        kept[sanitize_key(key)] = float(value)
    return kept


def git_tags(root: Path) -> dict[str, str]:
    """Return the git commit and whether the work tree has uncommitted changes."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def sweep_tags() -> dict[str, str]:
    """Return the parent run and trial key that a sweep passes to its trials."""
    from stages import sweeping

    tags = {}
    if os.environ.get(sweeping.PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[sweeping.PARENT_ENV]
    if os.environ.get(sweeping.TRIAL_KEY_ENV):
        tags[sweeping.TRIAL_TAG] = os.environ[sweeping.TRIAL_KEY_ENV]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        tags["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def dvc_tags() -> dict[str, str]:
    """Return the DVC experiment name and baseline revision when DVC runs the stage."""
    names = {
        "DVC_EXP_NAME": "dvc_exp_name",
        "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev",
    }
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def _log_config(params: Mapping[str, Any]) -> None:
    """Save the resolved config and the overrides of conf/ that produced it."""
    import mlflow
    import yaml

    from stages.provenance import describe_overrides

    mlflow.log_dict(redact_config(dict(params)), "config/params.yaml")
    try:
        overrides = describe_overrides(dict(params), project_root())
    except Exception as error:  # the config is logged; the overrides are a bonus
        log.warning("Could not derive the overrides from conf/: %s", error)
        return
    overrides = [redact_override(item) for item in overrides]
    mlflow.log_text(
        yaml.safe_dump(overrides, allow_unicode=True), "config/overrides.yaml"
    )
    mlflow.set_tag("overrides", " ".join(overrides)[:5000] or "(defaults)")


def redact_override(override: str) -> str:
    """Mask the value of a `key=value` override when it is secret."""
    key, equals, value = override.partition("=")
    if not equals:
        return redact(override)
    return f"{key}={redact_value(key.lstrip('+~'), value)}"


def _log_data(split_dir: Path, processed_dir: Path, dataset: str) -> None:
    """Record the split manifests as MLflow inputs and tag their content hashes."""
    import mlflow
    import pandas as pd

    from stages.provenance import hash_files, hash_folder

    tags = {}
    for split in ("train", "val", "test"):
        manifest = split_dir / f"{split}.csv"
        if not manifest.is_file():
            continue
        table = pd.read_csv(manifest, dtype={"label": str}, keep_default_na=False)
        tags[f"data_sha256.{split}"] = hash_files([manifest])
        if table.empty:  # mlflow.data cannot describe an empty table
            continue
        data = mlflow.data.from_pandas(
            table,
            source=str(manifest.resolve()),
            name=f"{dataset}-{split}",
            targets="label",
        )
        mlflow.log_input(data, context=split)
    if processed_dir.is_dir():
        tags["data_sha256.processed"] = hash_folder(processed_dir)
    mlflow.set_tags(tags)


def default_run_name(params: Mapping[str, Any]) -> str:
    """Name a run after its model, with a random suffix.

    MLflow's own names come from Python's `random`, which training seeds, so
    every run with the same seed would get the same name.
    """
    import secrets

    model = str((params.get("model") or {}).get("name", "run"))
    return f"{model}-{secrets.token_hex(3)}"


def start_training_run(
    params: Mapping[str, Any],
    cfg: TrackingConfig,
    tags: Mapping[str, str],
    split_dir: Path = Path("data/split"),
    processed_dir: Path = Path("data/processed"),
):
    """Start a run in the configured experiment and log everything it depends on.

    The run gets every parameter, the config as YAML with its overrides, the
    split manifests as inputs, content hashes of the data, `tags`, the
    dataset name, the git commit and, under `dvc exp run`, the DVC
    experiment name and baseline revision. Secret values are masked.
    """
    import mlflow

    use_experiment(cfg)
    run = mlflow.start_run(
        run_name=redact(cfg.run_name) if cfg.run_name else default_run_name(params),
        log_system_metrics=cfg.system_metrics or None,
    )
    mlflow.log_params(shorten_values(redact_flat(flatten(params))))
    dataset = str((params.get("dataset") or {}).get("name", ""))
    mlflow.set_tags(
        redact_flat(
            {
                "dataset": dataset,
                **tags,
                **git_tags(project_root()),
                **dvc_tags(),
                **sweep_tags(),
            }
        )
    )
    _log_config(params)
    _log_data(split_dir, processed_dir, dataset)
    return run


def model_requirements() -> list[str]:
    """Pin the packages a served model needs to the versions installed here.

    Given explicitly, because MLflow's own inference of the requirements
    loads the model again in a subprocess and takes about 18 s per run.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow", "keras", "numpy")]


def _save_keras_model(path: str, **kwargs: Any) -> None:
    """Save an MLflow Keras model into `path`, creating the folder first.

    NOTE: mlflow 3.17.2's mlflow.keras.save_model writes input_example.json
    into `path` before anything creates that folder (mlflow/keras/save.py
    calls `_save_example` before `os.makedirs(data_path)`), so
    mlflow.keras.log_model fails with FileNotFoundError when given an input
    example. Should a later mlflow create the folder itself, `exist_ok`
    keeps this step harmless.
    """
    import mlflow

    # Model.log also passes validate_serving_input to the flavour's
    # save_model, which does not accept it.
    kwargs.pop("validate_serving_input", None)
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


def log_keras_model(model, example, registered_name: str | None = None) -> None:
    """Log a Keras model named `model` with its signature and input example.

    The example is stored in the model folder (input_example.json, named in
    the MLmodel file), so `mlflow.models.Model.load_input_example` reads it.
    With `registered_name`, the model is also registered in the Model Registry;
    for a run kept in the local store (stages.offline), at its upload.
    """
    import mlflow
    from mlflow.models import Model, infer_signature

    from stages import offline

    run = mlflow.active_run()
    if registered_name and run and offline.run_is_local(run.info.run_id):
        log.warning(
            "The MLflow tracking server is unreachable, so the model is registered "
            "as '%s' only when %s copies the run there",
            registered_name,
            offline.UPLOAD_HINT,
        )
        mlflow.set_tag(offline.TAG_REGISTER_MODEL, registered_name)
        registered_name = None
    signature = infer_signature(example, model.predict(example, verbose=0))
    # mlflow.keras.log_model is this call with flavor=mlflow.keras. Model.log
    # only calls `flavor.save_model`, so a flavour object whose save_model
    # creates the model folder first can take the input example.
    Model.log(
        artifact_path=None,  # required by the signature, deprecated for `name`
        name="model",
        flavor=SimpleNamespace(save_model=_save_keras_model),
        flavor_name=mlflow.keras.__name__,
        model=model,
        signature=signature,
        input_example=example,
        registered_model_name=registered_name,
        pip_requirements=model_requirements(),
        # MLflow would load the saved model again and predict the example
        # (about 1 s per run). tests/test_train.py runs that check instead.
        validate_serving_input=False,
    )


@contextmanager
def run_status(run_id: str) -> Iterator[None]:
    """End run `run_id` FINISHED on success, KILLED on Ctrl-C, FAILED on error.

    The error is stored in the `error` tag, and the exception is re-raised.
    """
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted (KeyboardInterrupt)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as error:
        message = redact(f"{type(error).__name__}: {error}")
        mlflow.set_tag("error", message[:5000])
        mlflow.end_run("FAILED")
        log.error("MLflow run %s marked FAILED: %s", run_id, message)
        raise
    mlflow.end_run("FINISHED")


def close_abandoned_run(run_id: str, reason: str) -> None:
    """Mark run `run_id` KILLED if it is still RUNNING, with `reason` in its tags.

    A process killed mid-training leaves its run RUNNING. When the next run
    cannot resume its checkpoint (other settings or data), nothing will ever
    end that run, so it is ended here.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_tag(run_id, "error", f"killed; {reason}")
        client.set_terminated(run_id, "KILLED")
    except MlflowException as error:
        log.warning("Could not end the abandoned MLflow run %s: %s", run_id, error)
        return
    log.info("Marked the abandoned MLflow run %s KILLED: %s", run_id, reason)
