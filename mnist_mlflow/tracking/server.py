"""The tracking server: checking it, credentials, the experiment each kind of work goes to, and UI links.

Every entry point talks to the server through here first, so a wrong URI, a refused login or
a missing permission is one line within seconds, before any data is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import UserInputError
from mnist_mlflow.redaction import redact_url, url_has_secret, without_credentials

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

SERVER_TIMEOUT_ENV = "MNIST_MLFLOW_SERVER_TIMEOUT_S"
# How long a run keeps going while its tracking server does not answer, by default.
DEFAULT_SERVER_TIMEOUT_S = 60.0
# MLflow's retry settings, and the bounded values the project uses where the user set none:
# four retries, one, two, four and eight seconds apart, and a bounded wait for each attempt.
BOUNDED_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def server_timeout_s() -> float:
    """How long, in seconds, a run goes on without an answer from its tracking server."""
    text = os.environ.get(SERVER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_SERVER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= 86400.0:
        raise UserInputError(f"{SERVER_TIMEOUT_ENV}={text!r} must be a number of seconds from 1 to 86400")
    return value


def bound_http_requests() -> None:
    """Sets MLflow's HTTP retry settings to bounded values, keeping any the user has set."""
    server_timeout_s()  # A bad setting is refused before any request.
    for name, value in BOUNDED_HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


# MLflow's error codes for a refused login and a refused permission.
AUTH_ERROR_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


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

    bound_http_requests()
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
                f"the MLflow tracking server at {shown} ({TRACKING_URI_ENV}) "
                f"answered /health with HTTP {response.status_code}"
            )
        try:
            MlflowClient().search_experiments(max_results=1)
        except mlflow.exceptions.MlflowException as error:
            raise (auth_error(error, shown) or error) from None
    elif uri.startswith("sqlite:///"):
        with _file_lock(os.path.abspath(uri[len("sqlite:///") :])):
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


def claim_launcher_run() -> str | None:
    """Takes over the run ``mlflow run`` started for this process, if any, and returns its id.

    This removes ``MLFLOW_RUN_ID`` from the process's environment, on purpose: the study makes
    that run its parent (or points it to the parent), and its children's ``mlflow.start_run``
    must not resume it. A study calls this once, when it opens its parent.
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


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
        store = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
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
