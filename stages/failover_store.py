"""MLflow store and artifact repository that move runs to the local store.

FailoverStore replaces MLflow's RestStore for http(s) URIs activated by
`stages.offline.activate`, and FailoverArtifactRepository replaces the
repository of `mlflow-artifacts:` URIs (artifacts served by the tracking
server). See stages/offline.py for what moves where and when.

NOTE: both are registered through MLflow's scheme registries
(`_tracking_store_registry`, `_artifact_repository_registry`) and follow the
store method signatures of mlflow 3.17.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from mlflow.entities import LoggedModel, Metric, Run, RunInfo, RunStatus, RunTag
from mlflow.entities.logged_model_output import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds

from stages.offline import (
    PENDING,
    TAG_SERVER_MODEL,
    UPLOAD_HINT,
    Failover,
    LocalCopy,
    RunJournal,
    failover_for,
    is_unavailable,
    local_artifact_root,
    local_store,
    short_reason,
    unavailable_error,
)
from stages.redaction import mask_uri

log = logging.getLogger(__name__)

# Calls that only read: without a journal of the run there is nothing to copy.
READ_METHODS = {"get_run", "get_metric_history"}


def build_store(store_uri: str, **_: Any) -> RestStore:
    """Build the store of an http(s) URI: FailoverStore once it is activated."""
    if failover_for(store_uri) is None:
        return RestStore(partial(get_default_host_creds, store_uri))
    return FailoverStore(store_uri)


def register_failover_classes() -> None:
    """Make MLflow build FailoverStore and FailoverArtifactRepository."""
    from mlflow.store.artifact.artifact_repository_registry import (
        _artifact_repository_registry,
    )
    from mlflow.tracking._tracking_service import utils

    for scheme in ("http", "https"):
        utils._tracking_store_registry.register(scheme, build_store)
    _artifact_repository_registry.register(
        "mlflow-artifacts", FailoverArtifactRepository
    )


def record(journal: RunJournal, method: str, kwargs: dict, result: Any) -> None:
    """Add what a successful server call logged to the run's journal."""
    if method in ("create_run", "get_run"):
        journal.info = result.info
        journal.params.update(result.data.params)
        journal.tags.update(result.data.tags)
    elif method == "update_run_info":
        journal.info = result
    elif method == "log_batch":
        journal.metrics += [plain_metric(m) for m in kwargs["metrics"] or []]
        journal.params.update({p.key: p.value for p in kwargs["params"] or []})
        journal.tags.update({t.key: t.value for t in kwargs["tags"] or []})
    elif method == "log_metric":
        journal.metrics.append(plain_metric(kwargs["metric"]))
    elif method == "log_param":
        journal.params[kwargs["param"].key] = kwargs["param"].value
    elif method == "set_tag":
        journal.tags[kwargs["tag"].key] = kwargs["tag"].value
    elif method == "delete_tag":
        journal.tags.pop(kwargs["key"], None)
    elif method == "log_inputs":
        journal.datasets += kwargs.get("datasets") or []


def plain_metric(metric: Metric, model_id: str | None = None) -> Metric:
    """Return `metric` without run, dataset or (unless given) model links."""
    return Metric(
        metric.key, metric.value, metric.timestamp, metric.step, model_id=model_id
    )


class FailoverStore(RestStore):
    """A RestStore whose run and logged-model calls fall back to the local store."""

    def __init__(self, store_uri: str) -> None:
        super().__init__(partial(get_default_host_creds, store_uri))
        self.store_uri = store_uri

    @property
    def failover(self) -> Failover | None:
        return failover_for(self.store_uri)

    def _remote(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(RestStore, method)(self, *args, **kwargs)

    # Experiments: on the server, or in the local store in offline mode.
    def get_experiment_by_name(self, experiment_name):
        return self._experiment_call("get_experiment_by_name", experiment_name)

    def get_experiment(self, experiment_id):
        return self._experiment_call("get_experiment", experiment_id)

    def create_experiment(self, name, artifact_location=None, tags=None):
        failover = self.failover
        if failover is not None and failover.offline:
            location = artifact_location or local_artifact_root()
            return local_store().create_experiment(name, location, tags)
        experiment_id = self._remote("create_experiment", name, artifact_location, tags)
        if failover is not None:
            failover.experiment_names[experiment_id] = name
        return experiment_id

    def _experiment_call(self, method: str, key: str):
        failover = self.failover
        if failover is not None and failover.offline:
            return getattr(local_store(), method)(key)
        experiment = self._remote(method, key)
        if failover is not None and experiment is not None:
            failover.experiment_names[experiment.experiment_id] = experiment.name
        return experiment

    # Runs.
    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        failover = self.failover
        if failover is None or not failover.offline:
            try:
                run = self._remote(
                    "create_run", experiment_id, user_id, start_time, tags, run_name
                )
            except MlflowException as error:
                if failover is None or not is_unavailable(error):
                    raise
                if not failover.allow_fallback:
                    raise unavailable_error(self.store_uri, error) from error
                self._go_offline(failover, error)
                experiment_id = failover.local_experiment(experiment_id)
            else:
                if failover is not None:
                    journal = failover.journal.setdefault(run.info.run_id, RunJournal())
                    record(journal, "create_run", {}, run)
                return run
        return self._create_local_run(
            failover, experiment_id, user_id, start_time, tags, run_name
        )

    def _go_offline(self, failover: Failover, error: BaseException) -> None:
        log.warning(
            "MLflow tracking server %s became unreachable (%s); new runs go to the "
            "local store instead",
            mask_uri(self.store_uri),
            short_reason(error),
        )
        failover.go_offline(short_reason(error))

    def _create_local_run(
        self, failover, experiment_id, user_id, start_time, tags, name
    ):
        extra = failover.offline_tags(failover.offline_reason or "", fallback=True)
        run = local_store().create_run(
            experiment_id,
            user_id,
            start_time,
            [*tags, *(RunTag(k, v) for k, v in extra.items())],
            name,
        )
        failover.register_local_run(run)
        return run

    def get_run(self, run_id):
        return self._run_call("get_run", run_id)

    def update_run_info(self, run_id, run_status, end_time, run_name):
        info = self._run_call(
            "update_run_info",
            run_id,
            run_status=run_status,
            end_time=end_time,
            run_name=run_name,
        )
        copy = self.failover.copy_for(run_id) if self.failover else None
        if (
            copy is not None
            and copy.state == PENDING
            and RunStatus.is_terminated(run_status)
        ):
            log.warning(
                "MLflow run %s ended; it is complete only in the local store (as run "
                "%s) and incomplete or missing on the server %s until %s copies it.",
                run_id,
                copy.local_id,
                mask_uri(self.store_uri),
                UPLOAD_HINT,
            )
        return info

    def log_batch(self, run_id, metrics, params, tags):
        return self._run_call(
            "log_batch", run_id, metrics=metrics, params=params, tags=tags
        )

    def log_metric(self, run_id, metric):
        return self._run_call("log_metric", run_id, metric=metric)

    def log_param(self, run_id, param):
        return self._run_call("log_param", run_id, param=param)

    def set_tag(self, run_id, tag):
        return self._run_call("set_tag", run_id, tag=tag)

    def delete_tag(self, run_id, key):
        return self._run_call("delete_tag", run_id, key=key)

    def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
        return self._run_call(
            "get_metric_history",
            run_id,
            metric_key=metric_key,
            max_results=max_results,
            page_token=page_token,
        )

    def log_inputs(self, run_id, datasets=None, models=None):
        return self._run_call("log_inputs", run_id, datasets=datasets, models=models)

    def log_outputs(self, run_id, models):
        return self._run_call("log_outputs", run_id, models=models)

    def record_logged_model(self, run_id, mlflow_model):
        return self._run_call("record_logged_model", run_id, mlflow_model=mlflow_model)

    def _run_call(self, method: str, run_id: str, **kwargs: Any) -> Any:
        failover = self.failover
        if failover is None:
            return self._remote(method, run_id, **kwargs)
        copy = failover.copy_for(run_id)
        if copy is not None and copy.state == PENDING:
            return self._local_run_call(failover, copy, method, kwargs)
        if failover.offline and copy is None:
            raise failover.no_copy_error(run_id)
        server_run_id = copy.server_run_id if copy else run_id
        try:
            result = self._remote(method, server_run_id, **kwargs)
        except MlflowException as error:
            if not is_unavailable(error):
                raise
            if method in READ_METHODS and run_id not in failover.journal:
                raise failover.no_copy_error(run_id, error) from error
            copy = failover.switch(run_id, error, server_run_id)
            return self._local_run_call(failover, copy, method, kwargs)
        journal = failover.journal.setdefault(run_id, RunJournal())
        record(journal, method, kwargs, result)
        return result

    def _local_run_call(self, failover, copy: LocalCopy, method: str, kwargs: dict):
        kwargs = translate_model_ids(failover, method, kwargs)
        result = getattr(local_store(), method)(copy.local_id, **kwargs)
        if isinstance(result, Run):
            info = self._present_info(failover, copy, result.info)
            return Run(info, result.data, result.inputs, result.outputs)
        if isinstance(result, RunInfo):
            return self._present_info(failover, copy, result)
        return result

    def _present_info(self, failover, copy: LocalCopy, info: RunInfo) -> RunInfo:
        """Show a local run under the run and experiment ids that the caller uses."""
        return RunInfo(
            run_id=copy.caller_id,
            experiment_id=self._caller_experiment(failover, copy, info.experiment_id),
            user_id=info.user_id,
            status=info.status,
            start_time=info.start_time,
            end_time=info.end_time,
            lifecycle_stage=info.lifecycle_stage,
            artifact_uri=info.artifact_uri,
            run_name=info.run_name,
        )

    def _caller_experiment(self, failover, copy: LocalCopy, local_id: str) -> str:
        """Return the server experiment of a local copy, or its local one offline."""
        if failover.offline:
            return local_id
        if copy.server_experiment_id is None:
            name = local_store().get_experiment(local_id).name
            experiment = self._remote("get_experiment_by_name", name)
            if experiment is None:
                return local_id
            copy.server_experiment_id = experiment.experiment_id
        return copy.server_experiment_id

    # Logged models.
    def create_logged_model(
        self,
        experiment_id,
        name=None,
        source_run_id=None,
        tags=None,
        params=None,
        model_type=None,
    ):
        failover = self.failover
        values = {
            "name": name,
            "tags": tags,
            "params": params,
            "model_type": model_type,
        }
        if failover is None:
            return self._remote(
                "create_logged_model",
                experiment_id,
                source_run_id=source_run_id,
                **values,
            )
        copy = failover.copy_for(source_run_id) if source_run_id else None
        if not failover.offline and (copy is None or copy.state != PENDING):
            try:
                model = self._remote(
                    "create_logged_model",
                    experiment_id,
                    source_run_id=copy.server_run_id if copy else source_run_id,
                    **values,
                )
            except MlflowException as error:
                if not is_unavailable(error) or not source_run_id:
                    raise
                copy = failover.switch(source_run_id, error)
            else:
                failover.model_journal[model.model_id] = model
                return model
        if copy is not None:
            experiment_id = local_store().get_run(copy.local_id).info.experiment_id
        model = local_store().create_logged_model(
            experiment_id,
            source_run_id=copy.local_id if copy else None,
            **values,
        )
        failover.models[model.model_id] = model.model_id
        return self._present_model(failover, model, model.model_id, copy)

    def get_logged_model(self, model_id, allow_deleted=False):
        return self._model_call(
            "get_logged_model", model_id, allow_deleted=allow_deleted
        )

    def finalize_logged_model(self, model_id, status):
        return self._model_call("finalize_logged_model", model_id, status=status)

    def set_logged_model_tags(self, model_id, tags):
        return self._model_call("set_logged_model_tags", model_id, tags=tags)

    def delete_logged_model_tag(self, model_id, key):
        return self._model_call("delete_logged_model_tag", model_id, key=key)

    def log_logged_model_params(self, model_id, params):
        return self._model_call("log_logged_model_params", model_id, params=params)

    def _model_call(self, method: str, model_id: str, **kwargs: Any) -> Any:
        failover = self.failover
        if failover is None:
            return self._remote(method, model_id, **kwargs)
        local_id = failover.models.get(model_id)
        if local_id is None:
            try:
                result = self._remote(method, model_id, **kwargs)
            except MlflowException as error:
                if not is_unavailable(error):
                    raise
                local_id = failover.switch_model(model_id, error)
            else:
                if isinstance(result, LoggedModel):
                    failover.model_journal[model_id] = result
                return result
        result = getattr(local_store(), method)(local_id, **kwargs)
        if isinstance(result, LoggedModel):
            copy = self._copy_of_local_run(failover, result.source_run_id)
            return self._present_model(failover, result, model_id, copy)
        return result

    @staticmethod
    def _copy_of_local_run(failover, local_run_id: str | None) -> LocalCopy | None:
        for copy in failover.copies.values():
            if copy.local_id == local_run_id:
                return copy
        return None

    def _present_model(self, failover, model: LoggedModel, model_id: str, copy):
        """Show a local logged model under the ids that the caller uses."""
        experiment_id = model.experiment_id
        if copy is not None:
            experiment_id = self._caller_experiment(failover, copy, experiment_id)
        tags = {k: v for k, v in model.tags.items() if k != TAG_SERVER_MODEL}
        return LoggedModel(
            experiment_id=experiment_id,
            model_id=model_id,
            name=model.name,
            artifact_location=model.artifact_location,
            creation_timestamp=model.creation_timestamp,
            last_updated_timestamp=model.last_updated_timestamp,
            model_type=model.model_type,
            source_run_id=copy.caller_id if copy else model.source_run_id,
            status=model.status,
            status_message=model.status_message,
            tags=tags,
            params=model.params,
            metrics=model.metrics,
        )


def translate_model_ids(failover: Failover, method: str, kwargs: dict) -> dict:
    """Replace server model ids with the ids of their local copies."""
    if method == "log_outputs":
        models = [
            LoggedModelOutput(failover.models.get(m.model_id, m.model_id), m.step)
            for m in kwargs["models"]
        ]
        return {**kwargs, "models": models}
    if method == "log_batch" and kwargs.get("metrics"):
        metrics = [
            plain_metric(m, failover.models.get(m.model_id, m.model_id))
            for m in kwargs["metrics"]
        ]
        return {**kwargs, "metrics": metrics}
    return kwargs


class FailoverArtifactRepository(MlflowArtifactsRepository):
    """Artifacts served by the tracking server, written locally once their run
    or logged model has moved to the local store."""

    def __init__(self, artifact_uri, tracking_uri=None, registry_uri=None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        self._source_uri = artifact_uri
        self._in_directory_upload = False

    def _local_repo(self, error: BaseException | None = None):
        failover = failover_for(self.tracking_uri)
        if failover is None:
            return None
        return local_artifact_repo(failover, self._source_uri, error)

    def log_artifact(self, local_file, artifact_path=None):
        local = self._local_repo()
        if local is not None:
            return local.log_artifact(local_file, artifact_path)
        try:
            return super().log_artifact(local_file, artifact_path)
        except MlflowException as error:
            if self._in_directory_upload or not self._can_move(error):
                raise
            return self._local_repo(error).log_artifact(local_file, artifact_path)

    def log_artifacts(self, local_dir, artifact_path=None):
        local = self._local_repo()
        if local is not None:
            return local.log_artifacts(local_dir, artifact_path)
        # A folder moves whole, so the local copy never contains half a model.
        self._in_directory_upload = True
        try:
            return super().log_artifacts(local_dir, artifact_path)
        except MlflowException as error:
            if not self._can_move(error):
                raise
            return self._local_repo(error).log_artifacts(local_dir, artifact_path)
        finally:
            self._in_directory_upload = False

    def list_artifacts(self, path=None):
        local = self._local_repo()
        if local is not None:
            return local.list_artifacts(path)
        return super().list_artifacts(path)

    def _download_file(self, remote_file_path, local_path):
        local = self._local_repo()
        if local is not None:
            return local._download_file(remote_file_path, local_path)
        return super()._download_file(remote_file_path, local_path)

    def _can_move(self, error: BaseException) -> bool:
        return failover_for(self.tracking_uri) is not None and is_unavailable(error)


def local_artifact_repo(failover: Failover, uri: str, error: BaseException | None):
    """Return a local repository for artifact `uri` of a moved run or model.

    With `error`, a run or model that has not moved yet is moved now. Returns
    None when nothing has moved and no error is given.
    """
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    owner = artifact_owner(failover, uri)
    if owner is None:
        if error is None:
            return None
        raise unavailable_error(failover.server_uri, error) from error
    kind, owner_id, root = owner
    if kind == "run":
        copy = failover.copies.get(owner_id)
        if copy is None or copy.state != PENDING:
            if error is None:
                return None
            copy = failover.switch(owner_id, error)
        local_root = local_store().get_run(copy.local_id).info.artifact_uri
    else:
        local_id = failover.models.get(owner_id)
        if local_id is None:
            if error is None:
                return None
            local_id = failover.switch_model(owner_id, error)
        local_root = local_store().get_logged_model(local_id).artifact_location
    return get_artifact_repository(local_root + uri[len(root) :])


def artifact_owner(failover: Failover, uri: str) -> tuple[str, str, str] | None:
    """Return (kind, id, artifact root) of the run or model that owns `uri`."""
    roots = [
        ("run", run_id, journal.info.artifact_uri)
        for run_id, journal in failover.journal.items()
        if journal.info is not None and journal.info.artifact_uri
    ]
    roots += [
        ("model", model_id, model.artifact_location)
        for model_id, model in failover.model_journal.items()
    ]
    matches = [
        (kind, owner, root.rstrip("/"))
        for kind, owner, root in roots
        if uri.rstrip("/") == root.rstrip("/") or uri.startswith(root.rstrip("/") + "/")
    ]
    return max(matches, key=lambda match: len(match[2])) if matches else None
