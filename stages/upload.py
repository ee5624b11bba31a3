"""Copy runs that were logged locally while the tracking server was unreachable.

Usage: `make upload` or `python -m stages.upload [--uri URI] [--run-id ID]`.

Every local copy tagged `offline.state=pending` in the project's mlflow.db
(see stages/offline.py) is replayed to its server: the parameters, tags,
metric values with their steps and timestamps, dataset inputs, artifacts and
logged models, then the run's final status. A run that moved mid-way is
completed under its server run id. A run started in offline mode is created
on the server, and its tag `offline.local_run_id` names the local run.
Values already on the server are not logged twice, so an interrupted upload
can simply be run again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from stages.config import ConfigError
from stages.offline import (
    TAG_REGISTER_MODEL,
    TAG_SERVER,
    TAG_SERVER_MODEL,
    TAG_SERVER_RUN,
    TAG_STATE,
    UPLOADED,
    LocalCopy,
    TrackingUnavailableError,
    local_store,
    log_batch_in_chunks,
    pending_copies,
    unavailable_error,
)
from stages.redaction import mask_uri

log = logging.getLogger("stages.upload")

TAG_UPLOADED_AT = "offline.uploaded_at"
TAG_LOCAL_RUN = "offline.local_run_id"
PARENT_TAG = "mlflow.parentRunId"
CONNECT_TIMEOUT = 5.0


@dataclass
class UploadResult:
    """Counts of the values and files that one run's upload copied."""

    local_run_id: str
    server_run_id: str
    server_uri: str
    created: bool = False
    params: int = 0
    metric_values: int = 0
    tags: int = 0
    datasets: int = 0
    artifact_files: int = 0
    models: int = 0


class Server:
    """Direct access to a tracking server, bypassing the failover routing."""

    def __init__(self, uri: str) -> None:
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.credentials import get_default_host_creds

        self.uri = uri
        self.store = RestStore(partial(get_default_host_creds, uri))

    def artifact_repo(self, artifact_uri: str):
        """Return the repository that writes artifacts under `artifact_uri`."""
        from mlflow.store.artifact.artifact_repository_registry import (
            get_artifact_repository,
        )
        from mlflow.store.artifact.mlflow_artifacts_repo import (
            MlflowArtifactsRepository,
        )

        if artifact_uri.startswith("mlflow-artifacts:"):
            return MlflowArtifactsRepository(artifact_uri, tracking_uri=self.uri)
        return get_artifact_repository(artifact_uri, tracking_uri=self.uri)

    def register_model(self, name: str, model_id: str, run_id: str) -> None:
        """Register logged model `model_id` as a new version of model `name`."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
        from mlflow.store.model_registry.rest_store import RestStore
        from mlflow.utils.credentials import get_default_host_creds

        registry = RestStore(partial(get_default_host_creds, self.uri))
        try:
            registry.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        version = registry.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
        log.info("Registered model %s version %s", name, version.version)

    def find_run(self, run_id: str | None):
        """Return the server run `run_id`, or None when it does not exist."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        if not run_id:
            return None
        try:
            return self.store.get_run(run_id)
        except MlflowException as error:
            if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return None
            raise

    def experiment_id(self, name: str) -> str:
        """Return the id of experiment `name` on the server, creating it if needed."""
        experiment = self.store.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.store.create_experiment(name)


def local_path(uri: str) -> Path:
    """Return the folder of a local artifact URI."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(uri))


def count_files(folder: Path) -> int:
    """Count the files below `folder`."""
    return sum(1 for path in folder.rglob("*") if path.is_file())


def server_run_for(server: Server, local_run, copy: LocalCopy, uploaded: dict):
    """Return (server run, created) for a local copy, creating the run if needed."""
    from mlflow.entities import RunTag

    existing = server.find_run(copy.server_run_id)
    if existing is not None:
        return existing, False
    if copy.server_run_id:
        log.warning(
            "Run %s no longer exists on %s; creating a new run for local run %s",
            copy.server_run_id,
            mask_uri(server.uri),
            local_run.info.run_id,
        )
    store = local_store()
    name = store.get_experiment(local_run.info.experiment_id).name
    run = server.store.create_run(
        experiment_id=server.experiment_id(name),
        user_id=local_run.info.user_id,
        start_time=local_run.info.start_time,
        tags=[],
        run_name=local_run.info.run_name,
    )
    # Recorded at once, so an interrupted upload resumes into the same run.
    store.set_tag(local_run.info.run_id, RunTag(TAG_SERVER_RUN, run.info.run_id))
    uploaded[local_run.info.run_id] = run.info.run_id
    return run, True


def copy_params(server: Server, local_run, server_run, result: UploadResult) -> None:
    """Log the local params that the server run does not have yet."""
    from mlflow.entities import Param

    logged = server_run.data.params
    missing = {}
    for key, value in local_run.data.params.items():
        if key not in logged:
            missing[key] = value
        elif logged[key] != value:
            log.warning(
                "Param %s of run %s is %r on the server and %r locally; kept the "
                "server's value",
                key,
                server_run.info.run_id,
                logged[key],
                value,
            )
    params = [Param(k, v) for k, v in missing.items()]
    log_batch_in_chunks(server.store, server_run.info.run_id, params=params)
    result.params = len(params)


def copy_tags(
    server: Server, local_run, server_run, uploaded: dict, result: UploadResult
) -> None:
    """Log the local tags, without the offline bookkeeping, plus upload tags."""
    from mlflow.entities import RunTag

    tags = {
        key: value
        for key, value in local_run.data.tags.items()
        if not key.startswith("offline.")
    }
    if tags.get(PARENT_TAG) in uploaded:
        tags[PARENT_TAG] = uploaded[tags[PARENT_TAG]]
    tags[TAG_LOCAL_RUN] = local_run.info.run_id
    tags[TAG_UPLOADED_AT] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_tags = [RunTag(k, v) for k, v in tags.items()]
    log_batch_in_chunks(server.store, server_run.info.run_id, tags=run_tags)
    result.tags = len(run_tags)


def copy_metrics(
    server: Server, local_run, server_run, created: bool, result: UploadResult
) -> None:
    """Log every local metric value that the server run lacks, with its step."""
    from mlflow.entities import Metric

    store = local_store()
    missing = []
    for key in local_run.data.metrics:
        known = set()
        if not created:
            known = {
                (m.step, m.timestamp, m.value)
                for m in server.store.get_metric_history(server_run.info.run_id, key)
            }
        for metric in store.get_metric_history(local_run.info.run_id, key):
            point = (metric.step, metric.timestamp, metric.value)
            if point not in known:
                known.add(point)
                missing.append(Metric(key, metric.value, metric.timestamp, metric.step))
    log_batch_in_chunks(server.store, server_run.info.run_id, metrics=missing)
    result.metric_values = len(missing)


def copy_datasets(server: Server, local_run, server_run, result: UploadResult) -> None:
    """Log the dataset inputs of the local run that the server run lacks."""

    def identity(dataset_input) -> tuple:
        contexts = tuple(sorted((t.key, t.value) for t in dataset_input.tags))
        dataset = dataset_input.dataset
        return dataset.name, dataset.digest, contexts

    known = {identity(d) for d in server_run.inputs.dataset_inputs}
    missing = [d for d in local_run.inputs.dataset_inputs if identity(d) not in known]
    if missing:
        server.store.log_inputs(server_run.info.run_id, datasets=missing)
    result.datasets = len(missing)


def copy_artifacts(server: Server, local_run, server_run, result: UploadResult) -> None:
    """Upload the local run's artifact folder into the server run's artifacts."""
    folder = local_path(local_run.info.artifact_uri)
    if folder.is_dir() and any(folder.iterdir()):
        server.artifact_repo(server_run.info.artifact_uri).log_artifacts(str(folder))
        result.artifact_files = count_files(folder)


def copy_models(server: Server, local_run, server_run, result: UploadResult) -> None:
    """Create, fill and finalize a server logged model for each local one."""
    from mlflow.entities import LoggedModelStatus, LoggedModelTag
    from mlflow.entities.logged_model_output import LoggedModelOutput

    store = local_store()
    outputs = local_run.outputs.model_outputs if local_run.outputs else []
    for output in outputs:
        model = store.get_logged_model(output.model_id)
        server_model = find_server_model(server, model.tags.get(TAG_SERVER_MODEL))
        if server_model is None:
            server_model = server.store.create_logged_model(
                experiment_id=server_run.info.experiment_id,
                name=model.name,
                source_run_id=server_run.info.run_id,
                tags=[
                    LoggedModelTag(k, v)
                    for k, v in model.tags.items()
                    if not k.startswith("offline.")
                ],
                params=[model_param(k, v) for k, v in model.params.items()],
                model_type=model.model_type,
            )
            store.set_logged_model_tags(
                model.model_id,
                [LoggedModelTag(TAG_SERVER_MODEL, server_model.model_id)],
            )
        folder = local_path(model.artifact_location)
        if folder.is_dir():
            repo = server.artifact_repo(server_model.artifact_location)
            repo.log_artifacts(str(folder))
        server.store.finalize_logged_model(
            server_model.model_id, LoggedModelStatus.READY
        )
        server.store.log_outputs(
            server_run.info.run_id,
            [LoggedModelOutput(server_model.model_id, output.step)],
        )
        name = local_run.data.tags.get(TAG_REGISTER_MODEL)
        if name:
            server.register_model(name, server_model.model_id, server_run.info.run_id)
        result.models += 1


def model_param(key: str, value: str):
    """Return a LoggedModelParameter."""
    from mlflow.entities import LoggedModelParameter

    return LoggedModelParameter(key, value)


def find_server_model(server: Server, model_id: str | None):
    """Return the server's logged model `model_id`, or None if it does not exist."""
    from mlflow.exceptions import MlflowException

    if not model_id:
        return None
    try:
        return server.store.get_logged_model(model_id)
    except MlflowException:
        return None


def upload_copy(server: Server, local_run, copy: LocalCopy, uploaded: dict):
    """Replay one local copy to the server; return what was copied."""
    from mlflow.entities import RunStatus, RunTag

    server_run, created = server_run_for(server, local_run, copy, uploaded)
    run_id = server_run.info.run_id
    result = UploadResult(local_run.info.run_id, run_id, server.uri, created)
    copy_params(server, local_run, server_run, result)
    copy_tags(server, local_run, server_run, uploaded, result)
    copy_metrics(server, local_run, server_run, created, result)
    copy_datasets(server, local_run, server_run, result)
    copy_artifacts(server, local_run, server_run, result)
    copy_models(server, local_run, server_run, result)
    server.store.update_run_info(
        run_id,
        RunStatus.from_string(local_run.info.status),
        local_run.info.end_time,
        local_run.info.run_name,
    )
    store = local_store()
    store.set_tag(local_run.info.run_id, RunTag(TAG_SERVER_RUN, run_id))
    store.set_tag(local_run.info.run_id, RunTag(TAG_STATE, UPLOADED))
    uploaded[local_run.info.run_id] = run_id
    return result


def select(pending: list, run_ids: list[str] | None) -> list:
    """Keep the runs named in `run_ids` (server or local ids); all without it."""
    if not run_ids:
        return pending
    wanted = set(run_ids)
    chosen = [
        (run, copy)
        for run, copy in pending
        if {copy.caller_id, copy.local_id, copy.server_run_id} & wanted
    ]
    if len(chosen) < len(wanted):
        found = {i for _, c in chosen for i in (c.caller_id, c.local_id)}
        raise ConfigError(
            f"No pending local copy for run(s) {', '.join(sorted(wanted - found))}; "
            "run `python -m stages.upload --dry-run` to list them"
        )
    return chosen


def upload(
    server_uri: str | None = None,
    run_ids: list[str] | None = None,
    dry_run: bool = False,
) -> list[UploadResult]:
    """Upload every pending local copy (or those in `run_ids`) to its server.

    `server_uri` replaces the server that each run was meant for. Runs still
    RUNNING locally are skipped, because a stage may still be logging them.

    Raises:
        TrackingUnavailableError: a server to upload to is not reachable.
    """
    from stages.tracking import server_problem

    pending = sorted(
        select(pending_copies(), run_ids), key=lambda item: item[0].info.start_time
    )
    results: list[UploadResult] = []
    uploaded: dict[str, str] = {}
    servers: dict[str, Server] = {}
    for local_run, copy in pending:
        uri = server_uri or local_run.data.tags[TAG_SERVER]
        label = f"local run {local_run.info.run_id} ({copy.caller_id})"
        if local_run.info.status == "RUNNING":
            log.warning("Skipped %s: it is still RUNNING locally", label)
            continue
        if dry_run:
            log.info("Would upload %s to %s", label, mask_uri(uri))
            continue
        if uri not in servers:
            problem = server_problem(uri, CONNECT_TIMEOUT)
            if problem is not None:
                raise unavailable_error(uri, problem)
            servers[uri] = Server(uri)
        result = upload_copy(servers[uri], local_run, copy, uploaded)
        log.info(
            "Uploaded %s to run %s on %s: %d params, %d metric values, %d tags, "
            "%d datasets, %d artifact files, %d models",
            label,
            result.server_run_id,
            mask_uri(uri),
            result.params,
            result.metric_values,
            result.tags,
            result.datasets,
            result.artifact_files,
            result.models,
        )
        results.append(result)
    if not pending:
        log.info("No runs are waiting for upload")
    return results


def main() -> None:
    """Parse the command line and upload the pending runs."""
    from stages.cli import setup_logging
    from stages.redaction import install_log_redaction

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--uri", help="tracking server to upload to, instead of each run's own"
    )
    parser.add_argument(
        "--run-id",
        action="append",
        help="upload only this run (its server or local id); may be repeated",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the pending runs and stop"
    )
    args = parser.parse_args()
    setup_logging()
    install_log_redaction()
    try:
        upload(args.uri, args.run_id, args.dry_run)
    except (ConfigError, TrackingUnavailableError) as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
