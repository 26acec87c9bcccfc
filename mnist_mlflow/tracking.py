"""Every MLflow call of the project lives here.

The rest of the library trains, evaluates and plots; this module records. It checks that the
tracking server answers before any expensive work, turns on the one autolog integration the
project uses (``mlflow.tensorflow.autolog``), and logs parameters, data sets, figures,
tables and models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.config import RunFailedError, UserInputError
from mnist_mlflow.redaction import redact_url, url_has_secret, without_credentials

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
KILLED_REASON_TAG = "killed_reason"
FAILED_REASON_TAG = "failed_reason"
# A RUNNING run that carries no process information (say, the run of an `mlflow run`
# launcher still building its environment) is closed by reconciliation only after this long.
UNKNOWN_PROCESS_MAX_AGE_H = 24.0
# MLflow's error codes for a refused login and a refused permission.
AUTH_ERROR_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def _set_tag(client: MlflowClient, run_id: str, name: str, value: str, attempts: int = 4) -> None:
    """Sets a tag, tolerating another worker setting the same tag at the same moment.

    MLflow's SQL store writes a tag by looking for it and then inserting it. Two workers that
    finish a shared study together both tag its runs, and the later insert fails on the unique
    key (``UNIQUE constraint failed`` on SQLite, ``duplicate key`` on PostgreSQL). The tag
    exists by then, so the retry updates it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_tag(run_id, name, value)
            return
        except MlflowException as error:
            message = str(error)
            racing = "UNIQUE constraint" in message or "duplicate key" in message or "IntegrityError" in message
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class TrackingUnavailableError(UserInputError):
    """The tracking server named by the tracking URI does not answer."""


class TrackingAuthError(UserInputError):
    """The tracking server refused this process's credentials or permissions."""


def tracking_uri_shown() -> str:
    """The tracking URI as the project prints and records it: without any password."""
    return redact_url(mlflow.get_tracking_uri())


def auth_error(error: Exception, server: str | None = None) -> TrackingAuthError | None:
    """The one-line error for an MLflow error that is a refused login or permission, else None."""
    code = getattr(error, "error_code", None)
    if code not in AUTH_ERROR_CODES:
        return None
    server = server or tracking_uri_shown()
    if code == "UNAUTHENTICATED":
        return TrackingAuthError(
            f"the MLflow tracking server at {server} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server"
        )
    return TrackingAuthError(
        f"the MLflow tracking server at {server} refused the request (HTTP 403): the account in "
        "MLFLOW_TRACKING_USERNAME lacks the permission; ask the server's admin to grant it"
    )


def check_tracking_server(timeout_s: float = 5.0) -> str:
    """Checks, within seconds, that the tracking store answers and accepts this process; returns its URI
    without credentials, for printing.

    MLflow's own client retries an unreachable server for minutes; this check fails at once
    with a message that names the URI. An authenticated call follows, so wrong or missing
    credentials are reported in one line before any data is loaded. A local sqlite store is
    created here, under a file lock, so that scripts started together on a fresh database do
    not race to create its tables.
    """
    import requests

    uri = mlflow.get_tracking_uri()
    shown = redact_url(uri)
    # MLflow prints "View run ... at: <link>" when a run ends: the password and all, and a link
    # that opens the UI's GenAI view. The project prints its own links (runs_view_lines).
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith(("http://", "https://")):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as error:
            reason = type(error).__name__
            raise TrackingUnavailableError(
                f"the MLflow tracking server at {shown} ({TRACKING_URI_ENV}) cannot be reached ({reason}); "
                "start it or point the variable at a running server"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailableError(
                f"the MLflow tracking server at {shown} ({TRACKING_URI_ENV}) answered /health with HTTP {response.status_code}"
            )
        try:
            MlflowClient().search_experiments(max_results=1)
        except mlflow.exceptions.MlflowException as error:
            raise (auth_error(error, shown) or error) from None
    elif uri.startswith("sqlite:///"):
        with _file_lock(os.path.abspath(uri[len("sqlite:///"):])):
            MlflowClient().search_experiments(max_results=1)
    return shown


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes of this machine, named after ``path``, kept in the temp folder."""
    import fcntl

    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"mnist-mlflow-store-{digest}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def launcher_run_id() -> str | None:
    """The run ``mlflow run`` created for this process, if any (without taking it over)."""
    return os.environ.get("MLFLOW_RUN_ID")


DEFAULT_EXPERIMENT_ID = "0"
EXPERIMENT_PREFIX = "mnist-"
# The experiment choose_experiment picked when nothing else chose one (kept in this module,
# not in the environment, so that the processes this one starts are not steered by it).
_chosen_experiment_id: str | None = None


def current_experiment_id() -> str:
    """The experiment MLflow's own rules choose: the launcher's run, ``MLFLOW_EXPERIMENT_ID`` or
    ``MLFLOW_EXPERIMENT_NAME`` (created if missing); else the one ``choose_experiment`` picked,
    else the default experiment."""
    launcher = launcher_run_id()
    if launcher:
        return MlflowClient().get_run(launcher).info.experiment_id
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        return _get_or_create_experiment(name)
    return _chosen_experiment_id or DEFAULT_EXPERIMENT_ID


def _get_or_create_experiment(name: str) -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException as error:
        # Workers started together: another one created it a moment ago.
        if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_name_for(kind: str) -> str:
    """The experiment a kind of work goes to when nothing else chooses: ``mnist-cnn``,
    ``mnist-dense``, ``mnist-search``, ``mnist-exercises``, ``mnist-weight-decay``."""
    return EXPERIMENT_PREFIX + kind.replace("_", "-")


def _explicit_choice() -> bool:
    return bool(launcher_run_id() or os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME"))


def choose_experiment(default_name: str) -> str:
    """Makes this process's runs go to ``default_name`` unless MLflow's own ways choose another.

    Those win, in MLflow's order: the run of an ``mlflow run`` launcher (its
    ``--experiment-name`` or ``--experiment-id``), ``MLFLOW_EXPERIMENT_ID``,
    ``MLFLOW_EXPERIMENT_NAME``. Returns the experiment's id.
    """
    global _chosen_experiment_id
    if _explicit_choice():
        experiment_id = current_experiment_id()
        if launcher_run_id() and experiment_id == DEFAULT_EXPERIMENT_ID:
            print(
                f"note: mlflow run put this run in MLflow's Default experiment; add --experiment-name {default_name} "
                "to keep each kind of work apart",
                flush=True,
            )
        return experiment_id
    _chosen_experiment_id = _get_or_create_experiment(default_name)
    return _chosen_experiment_id


def runs_view_lines(experiment_id: str, run_id: str | None = None) -> list[str]:
    """How to open the UI on this experiment's runs (or on one run), in the model-training view.

    MLflow 3's UI opens on its GenAI view unless the link says ``workflowType=machine_learning``.
    With an http tracking server, the link itself; with a local store, the ``mlflow ui`` command
    to start first, and the link it will serve.
    """
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    what = "this run" if run_id else "the runs"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        # No credentials in a link: the browser asks for them (and a password must not be printed).
        return [f"View {what} in the MLflow UI: {without_credentials(uri).rstrip('/')}/{page}"]
    if uri.startswith("sqlite:///"):
        store = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        return [
            f"View {what} in the MLflow UI: start it with `mlflow ui --backend-store-uri {store}`, "
            f"then open http://127.0.0.1:5000/{page}"
        ]
    return [f"View {what} with `mlflow ui --backend-store-uri {redact_url(uri)}`, at http://127.0.0.1:5000/{page}"]


def print_runs_view(experiment_id: str, run_id: str | None = None) -> None:
    for line in runs_view_lines(experiment_id, run_id):
        print(line, flush=True)


def warn_about_secret_params() -> list[str]:
    """Warns, in one line, when ``mlflow run`` recorded a password that came in a ``-P`` value.

    MLflow logs every ``-P`` value as a parameter of the launcher's run before any project
    code runs, so the project can only say so, and keep the value out of everything it writes.
    Returns the names of such parameters.
    """
    launcher = launcher_run_id()
    if not launcher:
        return []
    names = secret_params(MlflowClient(), launcher)
    if names:
        print(
            f"warning: mlflow run recorded a password given in -P {', '.join(names)} as a parameter of run {launcher}; "
            "pass database passwords with PGPASSWORD or ~/.pgpass instead (this project writes it nowhere else)",
            flush=True,
        )
    return names


def secret_params(client: MlflowClient, run_id: str) -> list[str]:
    """The names of the run's parameters whose values hold a password."""
    return sorted(name for name, value in client.get_run(run_id).data.params.items() if url_has_secret(value))


def prepare_tracking(kind: str | None = None) -> str:
    """What every entry point does first: check the store and credentials, choose the
    experiment of this kind of work (see ``choose_experiment``), warn about a password given in
    ``-P``, and close the runs of dead processes in the current experiment.

    Returns the tracking URI without credentials, for printing.
    """
    shown = check_tracking_server()
    if kind is not None:
        choose_experiment(experiment_name_for(kind))
    warn_about_secret_params()
    for run_id, reason in reconcile_runs([current_experiment_id()]):
        print(f"Run {run_id} was left RUNNING ({reason}); marked KILLED", flush=True)
    return shown


def reconcile_runs(
    experiment_ids: list[str], unknown_max_age_h: float = UNKNOWN_PROCESS_MAX_AGE_H, dry_run: bool = False
) -> list[tuple[str, str]]:
    """Closes as KILLED the RUNNING runs whose process is gone; returns (run id, reason) for each.

    A run records its host, pid and process start time (:mod:`mnist_mlflow.lifecycle`). Runs
    started on this host by a process that no longer exists are closed. Runs of other hosts
    are never touched (a search's heartbeat covers those). A run without process information
    is closed only when it started more than ``unknown_max_age_h`` hours ago, unless it is a
    search's parent, which the search's last worker closes.
    """
    client = MlflowClient()
    closed = []
    now_ms = time.time() * 1000
    for run in _search_all_runs(client, experiment_ids, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        gone = lifecycle.process_is_gone(tags)
        if gone:
            reason = f"its process {tags[lifecycle.PID_TAG]} on {tags[lifecycle.HOST_TAG]} ended without closing it"
        elif gone is None and lifecycle.PID_TAG not in tags:
            age_h = (now_ms - run.info.start_time) / 3.6e6
            if age_h <= unknown_max_age_h or tags.get(STUDY_KIND_TAG) == SEARCH_KIND or run.info.run_id == launcher_run_id():
                continue
            reason = f"it has no process information and started {age_h:.0f} h ago (more than {unknown_max_age_h:g} h)"
        else:
            continue
        if not dry_run:
            mark_run_killed(run.info.run_id, reason)
        closed.append((run.info.run_id, reason))
    return closed


def experiment_ids(name_or_id: str = "") -> list[str]:
    """The ids of the experiment named (by name or id), or of every active experiment when empty."""
    client = MlflowClient()
    if not name_or_id:
        return [experiment.experiment_id for experiment in client.search_experiments()]
    experiment = client.get_experiment_by_name(name_or_id)
    if experiment is None and name_or_id.isdigit():
        try:
            experiment = client.get_experiment(name_or_id)
        except mlflow.exceptions.MlflowException:
            experiment = None
    if experiment is None:
        raise UserInputError(f"experiment={name_or_id!r}: no experiment of that name or id at {tracking_uri_shown()}")
    return [experiment.experiment_id]


def _search_all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    """Every run matching ``filter_string``, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def enable_autolog() -> None:
    """Turns on ``mlflow.tensorflow.autolog`` for Keras parameters and per-epoch metrics.

    The project logs the selected model, the data sets and checkpoints itself, so autolog's
    own copies are turned off.
    """
    mlflow.tensorflow.autolog(
        log_models=False,
        log_datasets=False,
        checkpoint=False,
        log_every_epoch=True,
        silent=True,
    )


@contextlib.contextmanager
def start_run(
    run_name: str, tags: Mapping[str, str], description: str | None = None, parent_run_id: str | None = None
) -> Iterator[str]:
    """Starts (or, under ``mlflow run``, resumes) a run, names and tags it, and yields its id.

    With ``parent_run_id`` the run is a new child of that run (a study's parent), which is
    passed explicitly rather than taken from the thread's active run. The run records the
    process that holds it. It ends FINISHED when the block completes; KILLED, tagged
    ``killed_reason``, on Ctrl-C, SIGTERM or the end of the launcher; and FAILED otherwise,
    tagged ``failed_reason`` when the failure has a one-line reason. So no run is ever left
    RUNNING by this process while it can still act.
    """
    if parent_run_id:
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
        run_context = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, description=description
        )
    else:
        # The launcher's run, or a new run in the experiment chosen for this kind of work.
        run_context = mlflow.start_run(experiment_id=current_experiment_id(), description=description)
    with run_context as run:
        try:
            # Inside the try: a signal while the tags are being written still ends the run KILLED.
            mlflow.set_tags({"mlflow.runName": run_name, **tags, **lifecycle.process_identity()})
            yield run.info.run_id
        except KeyboardInterrupt as interruption:
            _end_active_run("KILLED", KILLED_REASON_TAG, lifecycle.interruption_reason(interruption))
            raise
        except RunFailedError as failure:
            _end_active_run("FAILED", FAILED_REASON_TAG, str(failure))
            raise
        except Exception as error:
            stop = lifecycle.termination_from(error)
            if stop is None:
                raise
            _end_active_run("KILLED", KILLED_REASON_TAG, stop.reason)
            raise stop from error


def _end_active_run(status: str, tag: str, reason: str) -> None:
    # A second signal while the run is being closed must not leave it RUNNING.
    with lifecycle.signals_deferred():
        mlflow.set_tag(tag, reason)
        mlflow.end_run(status)


# Tags through which a study's runs find each other.
STUDY_ID_TAG = "study_id"
STUDY_ROLE_TAG = "study_role"
STUDY_KIND_TAG = "study_kind"
STUDY_FINGERPRINT_TAG = "study_fingerprint"
CHILD_KEY_TAG = "study_child_key"


@dataclass
class StudyParent:
    """The parent run of a study and what opening it found."""

    run_id: str
    experiment_id: str
    resumed: bool
    launcher_run_id: str | None


@dataclass
class ChildRecord:
    """One existing child run of a study."""

    run_id: str
    key: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str]


def _find_study_parent(client: MlflowClient, experiment_id: str, study_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{STUDY_ID_TAG} = '{study_id}' and tags.{STUDY_ROLE_TAG} = 'parent'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def take_launcher_run() -> str | None:
    """The run ``mlflow run`` started for this process (if any), taken out of the environment.

    Once a study takes it over, the children's ``mlflow.start_run`` must not resume it again.
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


def _experiment_of(client: MlflowClient, launcher_run_id: str | None) -> str:
    return client.get_run(launcher_run_id).info.experiment_id if launcher_run_id else current_experiment_id()


def _holder_tags(kind: str) -> dict[str, str]:
    # A search's parent is shared by workers on many hosts; their heartbeats, not a process, say whether it lives.
    return {} if kind == SEARCH_KIND else lifecycle.process_identity()


def _point_launcher_to(client: MlflowClient, launcher_run_id: str | None, parent_run_id: str, kind: str, study_id: str) -> None:
    """The launcher's run (if it is not the parent) records which run this launch worked for."""
    if launcher_run_id and launcher_run_id != parent_run_id:
        client.set_tag(launcher_run_id, "resumed_study_run_id", parent_run_id)
        client.set_tag(
            launcher_run_id,
            "mlflow.note.content",
            f"This launch worked on {kind} study {study_id}; its runs and summary are in run {parent_run_id}.",
        )


def _attach_to_parent(client: MlflowClient, parent_run_id: str, experiment_id: str, launcher_run_id: str | None, kind: str, study_id: str) -> StudyParent:
    """Reopens an existing parent; the launcher's run (if any) records which run it worked for."""
    _point_launcher_to(client, launcher_run_id, parent_run_id, kind, study_id)
    for name, value in _holder_tags(kind).items():
        client.set_tag(parent_run_id, name, value)
    client.update_run(parent_run_id, status="RUNNING")
    return StudyParent(parent_run_id, experiment_id, True, launcher_run_id)


def _create_parent(
    client: MlflowClient, experiment_id: str, launcher_run_id: str | None, kind: str, study_id: str, run_name: str,
    params: Mapping[str, Any], fingerprint: str, description: str, use_launcher_run: bool = True,
) -> StudyParent:
    """Makes the launcher's run (or a new run) the parent of a study: tags, note and parameters."""
    if launcher_run_id and use_launcher_run:
        run_id = launcher_run_id
        client.set_tag(run_id, "mlflow.runName", run_name)
    else:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        _point_launcher_to(client, launcher_run_id, run_id, kind, study_id)
    client.set_tag(run_id, "mlflow.note.content", description)
    for name, value in {
        STUDY_ID_TAG: study_id,
        STUDY_ROLE_TAG: "parent",
        STUDY_KIND_TAG: kind,
        STUDY_FINGERPRINT_TAG: fingerprint,
        **environment_summary(),
        **_holder_tags(kind),
    }.items():
        client.set_tag(run_id, name, value)
    existing_params = client.get_run(run_id).data.params
    missing = {name: value for name, value in params.items() if name not in existing_params}
    if missing:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(name, str(value)[:6000]) for name, value in missing.items()])
    return StudyParent(run_id, experiment_id, False, launcher_run_id)


def open_study_parent(
    kind: str,
    study_id: str,
    run_name: str,
    params: Mapping[str, Any],
    fingerprint: str,
    description: str,
) -> StudyParent:
    """Creates the parent run of study ``study_id``, or reopens it if it exists.

    Under ``mlflow run`` the launcher's run becomes the parent. If a parent with this study
    id exists already, the study is resumed there and the launcher's run (if any) only
    records which run it resumed. A study id started with other settings is refused, before
    anything is trained, because its finished children would not be comparable.
    """
    client = MlflowClient()
    launcher_run_id = take_launcher_run()
    experiment_id = _experiment_of(client, launcher_run_id)
    existing = _find_study_parent(client, experiment_id, study_id)
    if existing is not None and existing.info.run_id != launcher_run_id:
        found = existing.data.tags.get(STUDY_FINGERPRINT_TAG)
        if found != fingerprint or existing.data.tags.get(STUDY_KIND_TAG) != kind:
            raise UserInputError(
                f"sweep_id={study_id!r} belongs to run {existing.info.run_id}, a {existing.data.tags.get(STUDY_KIND_TAG)} "
                "study started with other settings; rerun with exactly its parameters to resume it, or pick a new sweep_id"
            )
        return _attach_to_parent(client, existing.info.run_id, experiment_id, launcher_run_id, kind, study_id)
    return _create_parent(client, experiment_id, launcher_run_id, kind, study_id, run_name, params, fingerprint, description)


SEARCH_KIND = "search"


def create_search_parent(
    study_name: str, run_name: str, params: Mapping[str, Any], fingerprint: str, description: str, space: Mapping[str, Any],
    launcher_run_id: str | None,
) -> StudyParent:
    """The parent run of a new search, with its space as an artifact.

    Under ``mlflow run`` the launcher's run becomes the parent, unless ``mlflow run`` recorded
    a password among its parameters: every worker shares the parent, so a fresh run is
    created instead, and the launcher's run only points to it.
    """
    client = MlflowClient()
    experiment_id = _experiment_of(client, launcher_run_id)
    holds_secret = bool(launcher_run_id) and bool(secret_params(client, launcher_run_id))
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    parent = _create_parent(
        client, experiment_id, launcher_run_id, SEARCH_KIND, study_name, run_name, params, digest, description,
        use_launcher_run=not holds_secret,
    )
    client.log_text(parent.run_id, json.dumps(space, indent=2), "search/space.json")
    return parent


def discard_search_parent(parent: StudyParent) -> None:
    """Undoes :func:`create_search_parent` when another worker created the study first."""
    client = MlflowClient()
    if parent.run_id == parent.launcher_run_id:
        for name in (STUDY_ID_TAG, STUDY_ROLE_TAG, STUDY_KIND_TAG, STUDY_FINGERPRINT_TAG):
            client.delete_tag(parent.run_id, name)
    else:
        client.delete_run(parent.run_id)


def open_search_parent(study_name: str, parent_run_id: str, launcher_run_id: str | None) -> StudyParent:
    """Reopens the parent run a search study recorded; the launcher's run (if any) points to it."""
    client = MlflowClient()
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    except mlflow.exceptions.MlflowException as error:
        failure = auth_error(error)
        if failure:
            raise failure from None
        raise UserInputError(
            f"study_name={study_name!r} records parent run {parent_run_id}, which {tracking_uri_shown()} does not have; "
            "point MLFLOW_TRACKING_URI at the server the study started with, or choose another study_name"
        ) from None
    return _attach_to_parent(client, parent_run_id, experiment_id, launcher_run_id, SEARCH_KIND, study_name)


def set_run_tags(run_id: str, tags: Mapping[str, str]) -> None:
    client = MlflowClient()
    for name, value in tags.items():
        _set_tag(client, run_id, name, value)


def close_orphan_children(parent: StudyParent, running_keys: set[str]) -> None:
    """Marks KILLED every child left RUNNING whose key is not among those really running."""
    for record in study_children(parent):
        if record.status == "RUNNING" and record.key not in running_keys:
            mark_run_killed(record.run_id, "its process ended before the run did")


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[int]:
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return []
    return sorted(int(version.version) for version in versions if version.tags.get("run_id") == run_id)


def register_once(model_uri: str, name: str, run_id: str, val_accuracy: float, test_accuracy: float) -> str:
    """Registers ``model_uri`` under ``name`` unless a version from ``run_id`` exists; returns the version.

    Two workers that finish a search at the same moment may both register; each then keeps
    only the lowest version made from ``run_id`` and deletes its own if it is a higher one.
    """
    client = MlflowClient()
    existing = _versions_of_run(client, name, run_id)
    if existing:
        return str(existing[0])
    mine = int(register_model_version(model_uri, name, run_id, val_accuracy, test_accuracy))
    lowest = _versions_of_run(client, name, run_id)[0]
    if lowest < mine:
        client.delete_model_version(name, str(mine))
    return str(lowest)


def study_children(parent: StudyParent) -> list[ChildRecord]:
    """The study's existing child runs, oldest first."""
    return study_children_of(parent.run_id, parent.experiment_id)


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
        ChildRecord(run.info.run_id, run.data.tags.get(CHILD_KEY_TAG, ""), run.info.status, dict(run.data.metrics), dict(run.data.params))
        for run in runs
    ]


def metric_values(run_id: str, key: str) -> list[float]:
    """A metric's values in step order (for per-epoch metrics, one per epoch)."""
    history = MlflowClient().get_metric_history(run_id, key)
    return [point.value for point in sorted(history, key=lambda point: (point.step, point.timestamp))]


def mark_run_killed(run_id: str, reason: str) -> None:
    """Ends a run some dead process left RUNNING as KILLED, with the reason as a tag."""
    client = MlflowClient()
    client.set_tag(run_id, KILLED_REASON_TAG, reason)
    client.set_terminated(run_id, status="KILLED")


def close_study_parent(parent: StudyParent, status: str, parent_too: bool = True, reason: str | None = None) -> None:
    """Ends the parent run (FINISHED, FAILED or KILLED) and the launcher's run if it is another one.

    ``parent_too=False`` ends only the launcher's run: another worker still uses the parent.
    ``reason`` (why a study was KILLED) is recorded as the ``killed_reason`` tag.
    """
    client = MlflowClient()
    closing = []
    if parent_too:
        closing.append(parent.run_id)
    if parent.launcher_run_id and parent.launcher_run_id != parent.run_id:
        closing.append(parent.launcher_run_id)
    with lifecycle.signals_deferred():
        for run_id in closing:
            if reason and status == "KILLED":
                client.set_tag(run_id, KILLED_REASON_TAG, reason)
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
    # Workers sharing a study may write this summary at the same moment; see _set_tag.
    for name, value in (tags or {}).items():
        _set_tag(client, parent.run_id, name, value)
    if winner_run_id:
        for record in study_children(parent):
            if record.status == "FINISHED":
                _set_tag(client, record.run_id, "study_winner", str(record.run_id == winner_run_id).lower())


def log_params(params: Mapping[str, Any]) -> None:
    """Logs parameters, skipping any the run already has.

    ``mlflow run`` logs the entry-point parameters exactly as typed (say ``1e-3``); the same
    parameter written again in another spelling (``0.001``) would be refused by MLflow.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    missing = {name: value for name, value in params.items() if name not in existing}
    if missing:
        mlflow.log_params(missing)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)


def log_dataset_splits(splits) -> None:
    """Logs train, validation and test as run inputs with name, size and digest."""
    for context, images, labels in (
        ("training", splits.train_images, splits.train_labels),
        ("validation", splits.validation_images, splits.validation_labels),
        ("test", splits.test_images, splits.test_labels),
    ):
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path is ambiguous.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                images, targets=labels, source=splits.source, name=f"{splits.dataset}-{context}"
            )
        mlflow.log_input(
            dataset,
            context=context,
            tags={"examples": str(len(labels)), "tfds_version": splits.version},
        )


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(dictionary: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_text(json.dumps(dictionary, indent=2, sort_keys=False), artifact_file)


SERVED_MODEL_CODE = os.path.join(os.path.dirname(__file__), "served_model.py")
# Where the Keras model itself lies inside a logged model: MLflow copies each artifact to
# artifacts/<file name> (see load_keras_model).
KERAS_MODEL_FILE = "model.keras"


def log_keras_model(model, example_images: np.ndarray, name: str = "model") -> str:
    """Logs a model that takes raw pixels (float32, (-1, 28, 28, 1)) and returns 10 probabilities.

    The logged model is MLflow's models-from-code pyfunc of ``served_model.py``: it serves
    through `mlflow models serve` and loads with `mlflow.pyfunc.load_model`, without calling
    ``keras.Model.predict`` on every request. The Keras model itself is one of its artifacts,
    ``artifacts/model.keras`` (see ``load_keras_model``). Requirements are given explicitly instead of
    being inferred, which would load the model once more in a subprocess. Returns the model URI.
    """
    import keras
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-model-") as folder:
        keras_file = os.path.join(folder, KERAS_MODEL_FILE)
        model.save(keras_file)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=SERVED_MODEL_CODE,
            # The key served_model.py reads (its KERAS_MODEL_ARTIFACT).
            artifacts={"keras_model": keras_file},
            signature=signature,
            input_example=example_images.astype(np.float32),
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"numpy=={np.__version__}",
            ],
        )
    return info.model_uri


def load_keras_model(model_uri: str):
    """The trained Keras model of a logged or registered model (``runs:/...``, ``models:/name@alias``),
    compiled with its optimizer and state, ready to train further or fine-tune."""
    import keras

    folder = mlflow.artifacts.download_artifacts(model_uri)
    return keras.saving.load_model(os.path.join(folder, "artifacts", KERAS_MODEL_FILE))


def environment_summary() -> dict[str, str]:
    """Versions and settings worth recording with every run, as tags."""
    import keras
    import tensorflow as tf

    return {
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "mlflow_version": mlflow.__version__,
        "cpu_count": str(os.cpu_count()),
    }


def register_model_version(model_uri: str, name: str, run_id: str, val_accuracy: float, test_accuracy: float) -> str:
    """Registers ``model_uri`` as a new version of ``name``, tagged with its run and scores."""
    version = mlflow.register_model(
        model_uri,
        name,
        tags={
            "run_id": run_id,
            "val_accuracy": f"{val_accuracy:.6f}",
            "test_accuracy": f"{test_accuracy:.6f}",
        },
    )
    return str(version.version)


@dataclass
class Promotion:
    """What ``promote_best_version`` chose, and the scores it chose among."""

    model_name: str
    alias: str
    metric: str
    version: str
    value: float
    candidates: list[tuple[str, float | None]]
    previous_version: str | None


def _version_score(client: MlflowClient, version, metric: str) -> float | None:
    """A version's score: its own tag if it has one, else the metric of the run that made it."""
    if metric in version.tags:
        try:
            return float(version.tags[metric])
        except ValueError:
            return None
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote_best_version(model_name: str, metric: str = "val_accuracy", alias: str = "champion") -> Promotion:
    """Points ``alias`` at the version of ``model_name`` with the highest ``metric``.

    Selection never uses test scores: the test split is kept for reporting. Ties go to the
    newer version. Versions without the metric are skipped.
    """
    if metric.startswith("test_"):
        raise UserInputError(
            f"metric={metric!r}: choosing a model by a test-split score leaks the test set; use a validation metric"
        )
    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException as error:
        if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise (auth_error(error) or error) from None
        raise UserInputError(f"model_name={model_name!r}: no registered model of that name at {tracking_uri_shown()}") from None
    versions = client.search_model_versions(f"name='{model_name}'")
    candidates = sorted(
        ((str(version.version), _version_score(client, version, metric)) for version in versions),
        key=lambda item: int(item[0]),
    )
    scored = [(number, value) for number, value in candidates if value is not None]
    if not scored:
        raise UserInputError(f"model_name={model_name!r}: none of its {len(candidates)} versions has a {metric!r} score")
    best_version, best_value = max(scored, key=lambda item: (item[1], int(item[0])))
    try:
        previous = str(client.get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        previous = None
    client.set_registered_model_alias(model_name, alias, best_version)
    return Promotion(model_name, alias, metric, best_version, best_value, candidates, previous)
