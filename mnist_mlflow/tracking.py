"""Every MLflow call of the project lives here.

The rest of the library trains, evaluates and plots; this module records. It checks that the
tracking server answers before any expensive work, turns on the one autolog integration the
project uses (``mlflow.tensorflow.autolog``), and logs parameters, data sets, figures,
tables and models.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import UserInputError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingUnavailableError(UserInputError):
    """The tracking server named by the tracking URI does not answer."""


def check_tracking_server(timeout_s: float = 5.0) -> str:
    """Returns the tracking URI after checking, within ``timeout_s``, that its server answers.

    MLflow's own client retries an unreachable server for minutes; this check fails at once
    with a message that names the URI. Local URIs (sqlite, file) need no server.
    """
    import requests

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as error:
        reason = type(error).__name__
        raise TrackingUnavailableError(
            f"the MLflow tracking server at {uri} ({TRACKING_URI_ENV}) cannot be reached ({reason}); "
            "start it or point the variable at a running server"
        ) from None
    if response.status_code != 200:
        raise TrackingUnavailableError(
            f"the MLflow tracking server at {uri} ({TRACKING_URI_ENV}) answered /health with HTTP {response.status_code}"
        )
    return uri


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
def start_run(run_name: str, tags: Mapping[str, str], description: str | None = None) -> Iterator[str]:
    """Starts (or, under ``mlflow run``, resumes) a run, names and tags it, and yields its id.

    The run ends FINISHED when the block completes and FAILED when it raises, including on
    Ctrl-C, so no run is ever left RUNNING by this process.
    """
    with mlflow.start_run(description=description) as run:
        mlflow.set_tags({"mlflow.runName": run_name, **tags})
        yield run.info.run_id


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


def log_keras_model(model, example_images: np.ndarray, name: str = "model") -> str:
    """Logs a Keras model that takes raw pixels (float32, (-1, 28, 28, 1)) and returns 10 probabilities.

    Requirements are given explicitly instead of being inferred, which would load the model
    once more in a subprocess. Returns the model URI.
    """
    import keras
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    # MLflow checks the input example by predicting on it; keep Keras's progress bar out of the log.
    keras.utils.disable_interactive_logging()
    try:
        info = mlflow.tensorflow.log_model(
            model,
            name=name,
            signature=signature,
            input_example=example_images.astype(np.float32),
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"numpy=={np.__version__}",
            ],
        )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


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
    except mlflow.exceptions.MlflowException:
        raise UserInputError(f"model_name={model_name!r}: no registered model of that name at {mlflow.get_tracking_uri()}") from None
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
