"""Study runs: a study's parent run, its children, and the summary the parent holds.

A parent is created once (:func:`create_study_parent`) and attached to by every later session
or worker (:func:`attach_study_parent`). The exercises and the weight-decay sweep find their
parent by its study id (:func:`open_study_parent`); a search finds it in its Optuna study.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.config import UserInputError
from mnist_mlflow.tracking.runs import (
    CHILD_KEY_TAG,
    KILLED_REASON_TAG,
    SEARCH_KIND,
    STUDY_FINGERPRINT_TAG,
    STUDY_ID_TAG,
    STUDY_KIND_TAG,
    STUDY_ROLE_TAG,
    environment_summary,
    mark_run_killed,
    metric_values,
    set_run_tags,
    set_tag,
)
from mnist_mlflow.tracking.server import auth_error, current_experiment_id, secret_params, tracking_uri_shown


@dataclass
class StudyParent:
    """The parent run of a study and what opening it found."""

    run_id: str
    experiment_id: str
    resumed: bool
    launcher_run_id: str | None


@dataclass
class ChildRecord:
    """One child run of a study as MLflow holds it.

    ``val_accuracy_history`` holds the validation accuracy of every epoch, when asked for.
    """

    run_id: str
    key: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str]
    val_accuracy_history: list[float] = field(default_factory=list)


def _find_study_parent(client: MlflowClient, experiment_id: str, study_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{STUDY_ID_TAG} = '{study_id}' and tags.{STUDY_ROLE_TAG} = 'parent'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _experiment_of(client: MlflowClient, launcher_run_id: str | None) -> str:
    return client.get_run(launcher_run_id).info.experiment_id if launcher_run_id else current_experiment_id()


def _holder_tags(kind: str) -> dict[str, str]:
    # A search's parent is shared by workers on many hosts; their heartbeats, not a process, say whether it lives.
    return {} if kind == SEARCH_KIND else lifecycle.process_identity()


def _point_launcher_to(
    client: MlflowClient, launcher_run_id: str | None, parent_run_id: str, kind: str, study_id: str
) -> None:
    """The launcher's run (if it is not the parent) records which run this launch worked for."""
    if launcher_run_id and launcher_run_id != parent_run_id:
        note = f"This launch worked on {kind} study {study_id}; its runs and summary are in run {parent_run_id}."
        client.log_batch(
            launcher_run_id,
            tags=[RunTag("resumed_study_run_id", parent_run_id), RunTag("mlflow.note.content", note)],
        )


def attach_study_parent(kind: str, study_id: str, parent_run_id: str, launcher_run_id: str | None) -> StudyParent:
    """Reopens an existing parent run (RUNNING again); the launcher's run (if any) records which run it worked for.

    A parent this tracking server does not have is refused in one line.
    """
    client = MlflowClient()
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    except mlflow.exceptions.MlflowException as error:
        failure = auth_error(error)
        if failure:
            raise failure from None
        raise UserInputError(
            f"study {study_id!r} records parent run {parent_run_id}, which {tracking_uri_shown()} does not have; "
            "point MLFLOW_TRACKING_URI at the server the study started with, or choose another study name"
        ) from None
    _point_launcher_to(client, launcher_run_id, parent_run_id, kind, study_id)
    holder = _holder_tags(kind)
    if holder:
        client.log_batch(parent_run_id, tags=[RunTag(name, value) for name, value in holder.items()])
    client.update_run(parent_run_id, status="RUNNING")
    return StudyParent(parent_run_id, experiment_id, True, launcher_run_id)


def create_study_parent(
    kind: str,
    study_id: str,
    run_name: str,
    params: Mapping[str, Any],
    fingerprint: str,
    description: str,
    launcher_run_id: str | None,
    texts: Mapping[str, str] | None = None,
) -> StudyParent:
    """Makes the launcher's run (or a new run) the parent of a new study: tags, note, parameters, texts.

    Under ``mlflow run`` the launcher's run becomes the parent, unless ``mlflow run`` recorded
    a password among its parameters: the parent is what the study's children and summary
    point to, so a fresh run is created instead, and the launcher's run only points to it.
    """
    client = MlflowClient()
    experiment_id = _experiment_of(client, launcher_run_id)
    holds_secret = bool(launcher_run_id) and bool(secret_params(client, launcher_run_id))
    if launcher_run_id and not holds_secret:
        run_id = launcher_run_id
    else:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        _point_launcher_to(client, launcher_run_id, run_id, kind, study_id)
    tags = {
        "mlflow.runName": run_name,
        "mlflow.note.content": description,
        STUDY_ID_TAG: study_id,
        STUDY_ROLE_TAG: "parent",
        STUDY_KIND_TAG: kind,
        STUDY_FINGERPRINT_TAG: fingerprint,
        **environment_summary(),
        **_holder_tags(kind),
    }
    client.log_batch(run_id, tags=[RunTag(name, str(value)) for name, value in tags.items()])
    existing_params = client.get_run(run_id).data.params
    missing = {name: value for name, value in params.items() if name not in existing_params}
    if missing:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(name, str(value)[:6000]) for name, value in missing.items()])
    for artifact_file, text in (texts or {}).items():
        client.log_text(run_id, text, artifact_file)
    return StudyParent(run_id, experiment_id, False, launcher_run_id)


def open_study_parent(
    kind: str,
    study_id: str,
    run_name: str,
    params: Mapping[str, Any],
    fingerprint: str,
    description: str,
    launcher_run_id: str | None,
) -> StudyParent:
    """The parent run of study ``study_id``, found by its tags: attached to if it exists, else created.

    A study id started with other settings is refused, before anything is trained, because its
    finished children would not be comparable.
    """
    client = MlflowClient()
    experiment_id = _experiment_of(client, launcher_run_id)
    existing = _find_study_parent(client, experiment_id, study_id)
    if existing is None or existing.info.run_id == launcher_run_id:
        return create_study_parent(kind, study_id, run_name, params, fingerprint, description, launcher_run_id)
    found = existing.data.tags.get(STUDY_FINGERPRINT_TAG)
    if found != fingerprint or existing.data.tags.get(STUDY_KIND_TAG) != kind:
        raise UserInputError(
            f"sweep_id={study_id!r} belongs to run {existing.info.run_id}, a {existing.data.tags.get(STUDY_KIND_TAG)} "
            "study started with other settings; rerun with exactly its parameters to resume it, or pick a new sweep_id"
        )
    return attach_study_parent(kind, study_id, existing.info.run_id, launcher_run_id)


def discard_study_parent(parent: StudyParent) -> None:
    """Undoes :func:`create_study_parent` when another worker created the same study first."""
    client = MlflowClient()
    if parent.run_id == parent.launcher_run_id:
        for name in (STUDY_ID_TAG, STUDY_ROLE_TAG, STUDY_KIND_TAG, STUDY_FINGERPRINT_TAG):
            client.delete_tag(parent.run_id, name)
    else:
        client.delete_run(parent.run_id)


def close_orphan_children(parent: StudyParent, running_keys: set[str]) -> None:
    """Marks KILLED every child left RUNNING whose key is not among those really running."""
    for record in study_children(parent):
        if record.status == "RUNNING" and record.key not in running_keys:
            mark_run_killed(record.run_id, "its process ended before the run did")


def study_children(parent: StudyParent, with_history: bool = False) -> list[ChildRecord]:
    """The study's existing child runs, oldest first; ``with_history`` reads their per-epoch validation accuracy too."""
    records = study_children_of(parent.run_id, parent.experiment_id)
    if with_history:
        for record in records:
            record.val_accuracy_history = metric_values(record.run_id, "val_accuracy")
    return records


def study_children_of(parent_run_id: str, experiment_id: str | None = None) -> list[ChildRecord]:
    """The child runs of ``parent_run_id``, oldest first."""
    client = MlflowClient()
    experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return [
        ChildRecord(
            run.info.run_id,
            run.data.tags.get(CHILD_KEY_TAG, ""),
            run.info.status,
            dict(run.data.metrics),
            dict(run.data.params),
        )
        for run in runs
    ]


def close_study_parent(parent: StudyParent, status: str, parent_too: bool = True, reason: str | None = None) -> None:
    """Ends the parent run (FINISHED, FAILED or KILLED) and the launcher's run if it is another one.

    ``parent_too=False`` ends only the launcher's run: another worker still uses the parent.
    ``reason`` (why a study was KILLED or FAILED) is recorded as ``killed_reason`` or ``failed_reason``.
    """
    client = MlflowClient()
    closing = []
    if parent_too:
        closing.append(parent.run_id)
    if parent.launcher_run_id and parent.launcher_run_id != parent.run_id:
        closing.append(parent.launcher_run_id)
    with lifecycle.signals_deferred():
        for run_id in closing:
            if reason and status in ("KILLED", "FAILED"):
                client.set_tag(run_id, KILLED_REASON_TAG if status == "KILLED" else "failed_reason", reason)
            client.set_terminated(run_id, status=status)


def log_study_summary(
    parent: StudyParent,
    tables: Mapping[str, Any] | None = None,
    texts: Mapping[str, str] | None = None,
    figures: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    stepped_metrics: Mapping[str, list[float]] | None = None,
    tags: Mapping[str, str] | None = None,
    winner_run_id: str | None = None,
) -> None:
    """Logs a study's summary on its parent run, replacing any earlier summary.

    ``tables`` are pandas DataFrames, logged with ``log_table`` (shown by the MLflow UI);
    ``stepped_metrics`` hold one value per step (say, per weight-decay factor). The child
    ``winner_run_id`` is tagged ``study_winner=true``.
    """
    from mlflow.entities import Metric

    client = MlflowClient()
    for artifact_file, frame in (tables or {}).items():
        directory = artifact_file.rpartition("/")[0] or None
        if any(item.path == artifact_file for item in client.list_artifacts(parent.run_id, directory)):
            # log_table would append to the earlier table of a resumed study; write it whole instead.
            client.log_text(parent.run_id, frame.to_json(orient="split", index=False), artifact_file)
        else:
            client.log_table(parent.run_id, data=frame, artifact_file=artifact_file)
    for artifact_file, text in (texts or {}).items():
        client.log_text(parent.run_id, text, artifact_file)
    for artifact_file, figure in (figures or {}).items():
        client.log_figure(parent.run_id, figure, artifact_file)
    timestamp = int(time.time() * 1000)
    batch = [Metric(name, float(value), timestamp, 0) for name, value in (metrics or {}).items()]
    for name, values in (stepped_metrics or {}).items():
        batch.extend(Metric(name, float(value), timestamp, step) for step, value in enumerate(values))
    # The tracking server takes at most 1,000 metrics per call.
    for start in range(0, len(batch), 1000):
        client.log_batch(parent.run_id, metrics=batch[start : start + 1000])
    # Workers sharing a study may write this summary at the same moment; see set_tag.
    if tags:
        set_run_tags(parent.run_id, tags)
    if winner_run_id:
        for record in study_children(parent):
            if record.status == "FINISHED":
                set_tag(client, record.run_id, "study_winner", str(record.run_id == winner_run_id).lower())
