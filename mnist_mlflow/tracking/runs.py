"""Runs: starting and ending them, logging into them, and closing those whose process is gone.

A run ends FINISHED, FAILED (with ``failed_reason``) or KILLED (with ``killed_reason``), never
left RUNNING by a process that can still act; :func:`reconcile_runs` closes the runs of
processes that could not.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.retry import retry
from mnist_mlflow.tracking import lease, watch
from mnist_mlflow.tracking.server import (
    check_tracking_server,
    choose_experiment,
    current_experiment_id,
    experiment_name_for,
    launcher_run_id,
    warn_about_secret_params,
)

KILLED_REASON_TAG = "killed_reason"


FAILED_REASON_TAG = "failed_reason"


# A RUNNING run that carries no process information (say, the run of an `mlflow run`
# launcher still building its environment) is closed by reconciliation only after this long.
UNKNOWN_PROCESS_MAX_AGE_H = 24.0


# Tags through which a study's runs find each other.
STUDY_ID_TAG = "study_id"


STUDY_ROLE_TAG = "study_role"


STUDY_KIND_TAG = "study_kind"


STUDY_FINGERPRINT_TAG = "study_fingerprint"


CHILD_KEY_TAG = "study_child_key"
# The study_role tag of every child (the parent's is "parent"), so the MLflow UI's compare view
# and mlflow.search_runs can tell them apart.
CHILD_ROLE = "child"


SEARCH_KIND = "search"


def set_tag(client: MlflowClient, run_id: str, name: str, value: str, attempts: int = 4) -> None:
    """Sets a tag, tolerating another worker setting the same tag at the same moment.

    MLflow's SQL store writes a tag by looking for it and then inserting it. Two workers that
    finish a shared study together both tag its runs, and the later insert fails on the unique
    key (``UNIQUE constraint failed`` on SQLite, ``duplicate key`` on PostgreSQL). The tag
    exists by then, so the retry updates it.
    """
    retry(lambda: client.set_tag(run_id, name, value), racing_insert, attempts=attempts)


def racing_insert(error: Exception) -> bool:
    """Whether MLflow's SQL store refused an insert that another worker made a moment before
    (the row exists by then, so the same call again succeeds)."""
    from mlflow.exceptions import MlflowException

    message = str(error)
    return isinstance(error, MlflowException) and any(
        sign in message for sign in ("UNIQUE constraint", "duplicate key", "IntegrityError")
    )


def set_run_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Sets several tags in one request, tolerating another worker setting them at the same
    moment (as :func:`set_tag`)."""
    client = MlflowClient()
    batch = [RunTag(name, str(value)) for name, value in tags.items()]
    retry(lambda: client.log_batch(run_id, tags=batch), racing_insert, attempts=4)


def mark_run_killed(run_id: str, reason: str) -> None:
    """Ends a run some dead process left RUNNING as KILLED, with the reason as a tag, and lets
    its lease go: whoever resumes it may take it at once."""
    client = MlflowClient()
    client.log_batch(run_id, tags=[RunTag(KILLED_REASON_TAG, reason), RunTag(lease.LEASE_UNTIL_TAG, "0")])
    client.set_terminated(run_id, status="KILLED")


def prepare_tracking(kind: str | None = None) -> str:
    """What every entry point does first: check the store and credentials, choose the
    experiment of this kind of work (see ``choose_experiment``), warn about a password given in
    ``-P``, and close the runs of dead processes in the current experiment.

    Returns the tracking URI without credentials, for printing.
    """
    shown = check_tracking_server()
    for line in watch.deliver_spooled_runs():
        print(line, flush=True)
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

    Two kinds of evidence close a run, each conclusive where it comes from:

    - its process is gone (:func:`mnist_mlflow.lifecycle.process_is_gone`): the run names this
      host, boot and PID namespace, and no such process lives;
    - its lease expired, on the tracking server's clock (:mod:`~.lease`): every holder renews
      it while it works, and stops within its server timeout when it cannot, so a lease long
      past says that no process is working on the run, on any host. A study's parent lives as
      long as one of its workers renews it, or one of its children holds a live lease (a worker
      renews the parent only between children).

    Anything else is left alone: a run of another container or machine with a fresh heartbeat,
    or one recorded without a heartbeat. A run without any process information is closed only
    when it started more than ``unknown_max_age_h`` hours ago, unless it is a search's parent.
    """
    client = MlflowClient()
    closed = []
    now_ms = time.time() * 1000
    server_now = lease.CLOCK.now()
    running = _search_all_runs(client, experiment_ids, "attributes.status = 'RUNNING'")
    kept_alive_by_a_child = {
        run.data.tags["mlflow.parentRunId"]
        for run in running
        if "mlflow.parentRunId" in run.data.tags and not lease.lease_expired(run.data.tags, server_now)
    }
    for run in running:
        tags = run.data.tags
        gone = lifecycle.process_is_gone(tags)
        expired = run.info.run_id not in kept_alive_by_a_child and _heartbeat_expired(tags, server_now)
        if gone:
            reason = f"its process {tags[lifecycle.PID_TAG]} on {tags[lifecycle.HOST_TAG]} ended without closing it"
        elif expired:
            reason = f"no process has renewed its heartbeat since {expired} (it would have, had one been working on it)"
        elif lease.LEASE_UNTIL_TAG in tags:
            continue
        elif gone is None and lifecycle.PID_TAG not in tags:
            age_h = (now_ms - run.info.start_time) / 3.6e6
            if (
                age_h <= unknown_max_age_h
                or tags.get(STUDY_KIND_TAG) == SEARCH_KIND
                or run.info.run_id == launcher_run_id()
            ):
                continue
            reason = f"it has no process information and started {age_h:.0f} h ago (more than {unknown_max_age_h:g} h)"
        else:
            continue
        if not dry_run:
            mark_run_killed(run.info.run_id, reason)
        closed.append((run.info.run_id, reason))
    return closed


def _heartbeat_expired(tags: Mapping[str, str], server_now_s: float) -> str | None:
    """When a run's lease expired (on the server's clock), as text, or None while it holds (or
    there is none)."""
    try:
        until = float(tags[lease.LEASE_UNTIL_TAG])
    except (KeyError, ValueError):
        return None
    if not lease.lease_expired(tags, server_now_s):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))


def _search_all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    """Every run matching ``filter_string``, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def steps_held(run_id: str, after_step: int) -> dict[str, set[int]]:
    """The per-epoch steps beyond ``after_step`` that the server already holds for the run, by key.

    A killed run's metrics can be ahead of its last checkpoint (the checkpoint uploads in the
    background): the resumed run trains those epochs again, to the same values, bit for bit, and
    must not log them a second time.
    """
    client = MlflowClient()
    held: dict[str, set[int]] = {}
    for key in client.get_run(run_id).data.metrics:
        steps = {point.step for point in client.get_metric_history(run_id, key) if point.step > after_step}
        if steps:
            held[key] = steps
    return held


def keras_metrics_logger(run_id: str, held: Mapping[str, set[int]] | None = None):
    """MLflow's Keras callback (``mlflow.tensorflow.MlflowCallback``), with one name per quantity.
    A resumed run passes the steps the server already ``held`` (``steps_held``): they are not sent
    again, so that every step is there once.

    It logs the optimizer's settings (``opt_name``, ``opt_learning_rate``, ...) when training
    begins and every epoch's metrics under Keras's own names (``loss``, ``accuracy``,
    ``val_loss``, ``val_accuracy``, and what the project's callbacks add, such as
    ``epoch_time_s``), at step = epoch, in one background batch, as MLflow's autolog does.

    Why not ``mlflow.tensorflow.autolog``: its callback also logs every validation pass a second
    time, as ``validation_loss`` and ``validation_accuracy`` without a step, so each run had two
    series of one quantity, and the UI drew both. Keras's names are kept: they are the names of
    ``History``, ``EarlyStopping`` and the project's ``best_val_accuracy``. The project logs the
    model, the data sets and the checkpoints itself, so autolog added nothing else it uses.
    """
    import logging

    from mlflow.tensorflow import MlflowCallback

    # A batch the server does not take is kept by the epoch ledger, which sends it again or spools
    # it and says so in one line (tracking.watch). MLflow's background queue would print its own
    # error and traceback for it; autolog kept it quiet the same way (its silent=True).
    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)

    class EpochMetrics(MlflowCallback):
        def on_train_begin(self, logs=None):
            # The model's summary is logged by the run itself (model_summary.txt), with more detail.
            settings = self.model.optimizer.get_config()
            log_params({f"opt_{name}": value for name, value in settings.items()})

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            if held:
                logs = {key: value for key, value in logs.items() if epoch not in held.get(key, ())}
            # As MLflow's own callback, in the background; the ledger keeps the batch's outcome,
            # so that the end of the run asks the server only about batches that failed.
            operations = mlflow.log_metrics(logs, step=epoch, synchronous=False) if logs else watch.ALREADY_HELD
            watch.note_sent(run_id, epoch, operations)

        def on_test_end(self, logs=None):
            # Keras's fit already hands the validation pass to on_epoch_end as val_<name>.
            pass

        def on_train_end(self, logs=None):
            mlflow.flush_async_logging()

    return EpochMetrics(log_every_epoch=True)


def set_system_metrics_node(node_id: str) -> None:
    """Names this machine in the system metrics of the runs it makes (``system/<node>/...``),
    so that a study's runs show which worker did what."""
    mlflow.system_metrics.set_system_metrics_node_id(node_id)


def metric_values(run_id: str, key: str) -> list[float]:
    """A metric's values in step order (for per-epoch metrics, one per epoch)."""
    history = MlflowClient().get_metric_history(run_id, key)
    return [point.value for point in sorted(history, key=lambda point: (point.step, point.timestamp))]


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


def log_run_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> int:
    """Logs ``metrics`` at ``step`` and one timestamp into the run ``run_id`` (not necessarily the
    active one), in one request; returns the timestamp (see ``link_metrics_to_model``)."""
    from mlflow.entities import Metric

    timestamp_ms = int(time.time() * 1000)
    entities = [Metric(name, float(value), timestamp_ms, int(step)) for name, value in metrics.items()]
    MlflowClient().log_batch(run_id, metrics=entities)
    return timestamp_ms


def link_metrics_to_model(
    model_id: str, datasets: Mapping[str, Any], summary: Mapping[str, float], summary_time_ms: int, epoch: int
) -> None:
    """Links the active run's figures to its logged model ``model_id``, each with the data set it
    was measured on (``split_measured_on``): the ``summary`` metrics, and the selected ``epoch``'s
    points of ``val_accuracy`` and ``val_loss``. The Models tab and ``search_logged_models`` then
    show the model's ``val_accuracy`` on the validation split and ``test_accuracy`` on test.

    A run's metric history keeps no data set, so MLflow cannot link one itself. Each point is
    logged again exactly as the run holds it (key, value, step, timestamp), with the model and
    the data set: a database store keeps such a point once in the run (it is the metrics table's
    primary key), so the run's series gain no second point. A local file store (``file:`` or a
    folder) would append a copy, so there nothing is linked.
    """
    uri = mlflow.get_tracking_uri()
    if uri.startswith("file:") or "://" not in uri:
        return
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    # The selected epoch's points must be on the server before they are read back.
    watch.wait_for_sent(run_id)
    points = [(name, float(value), summary_time_ms, 0) for name, value in summary.items()]
    for key in ("val_accuracy", "val_loss"):
        selected = [point for point in client.get_metric_history(run_id, key) if point.step == epoch]
        points += [(key, point.value, point.timestamp, point.step) for point in selected[:1]]
    metrics = []
    for key, value, timestamp, step in points:
        dataset = datasets.get(split_measured_on(key))
        named = (dataset.name, dataset.digest) if dataset is not None else (None, None)
        metrics.append(Metric(key, value, timestamp, step, model_id, *named))
    client.log_batch(run_id, metrics=metrics)


def log_dataset_splits(splits) -> dict[str, Any]:
    """Logs train, validation and test as run inputs with name, size and digest; returns the
    ``mlflow.data`` data sets by context (``training``, ``validation``, ``test``)."""
    datasets = {}
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
        # Workers that start together insert the same data set into the experiment at once.
        retry(
            functools.partial(
                mlflow.log_input,
                dataset,
                context=context,
                tags={"examples": str(len(labels)), "tfds_version": splits.version},
            ),
            racing_insert,
            attempts=4,
        )
        datasets[context] = dataset
    return datasets


def split_measured_on(metric: str) -> str | None:
    """The data split a metric was measured on: ``test_*`` on test; ``val_*``, the selected
    epoch and its validation figures on validation; the rest (loss, accuracy, the fit's time and
    throughput) on training."""
    if metric.startswith("test_"):
        return "test"
    if metric.startswith(("val_", "best_val_")) or metric == "best_epoch":
        return "validation"
    if metric in ("loss", "accuracy", "train_time_s", "examples_per_s", "mean_epoch_time_s"):
        return "training"
    return None


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(dictionary: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_text(json.dumps(dictionary, indent=2, sort_keys=False), artifact_file)


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
