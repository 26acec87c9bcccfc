"""Models: logging the servable model, loading the Keras model back, registering and promoting versions."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import UserInputError
from mnist_mlflow.tracking.server import auth_error, tracking_uri_shown

# The models-from-code file, which imports nothing from this package.
SERVED_MODEL_CODE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "served_model.py")


# Where the Keras model itself lies inside a logged model: MLflow copies each artifact to
# artifacts/<file name> (see load_keras_model).
KERAS_MODEL_FILE = "model.keras"


def image_signature():
    """The logged model's signature: batches of 28x28x1 raw-pixel images in, ten probabilities out.

    It is marked as coming from the ``predict`` type hint, MLflow's private
    ``ModelSignature._is_signature_from_type_hint``. For such a model, MLflow's scoring server hands
    the request's ``inputs`` over as parsed, instead of deep-copying and converting every nested list,
    and ``PyFuncModel.predict`` leaves checking the input to the model, whose ``check_images`` takes
    NumPy arrays, DataFrames and lists (see served_model.py). ``tests/test_served_model.py``
    checks that MLflow still honours the mark.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    signature._is_signature_from_type_hint = True
    return signature


def log_keras_model(model, example_images: np.ndarray, name: str = "model") -> str:
    """Logs a model that takes raw pixels ((n, 28, 28, 1) or (n, 784)) and returns 10 probabilities.

    The logged model is MLflow's models-from-code pyfunc of ``served_model.py``: it serves
    through `mlflow models serve` and loads with `mlflow.pyfunc.load_model`, without calling
    ``keras.Model.predict`` on every request. The Keras model itself is one of its artifacts,
    ``artifacts/model.keras`` (see ``load_keras_model``). Requirements are given explicitly instead of
    being inferred, which would load the model once more in a subprocess. Returns the model URI.
    """
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-model-") as folder:
        keras_file = os.path.join(folder, KERAS_MODEL_FILE)
        model.save(keras_file)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=SERVED_MODEL_CODE,
            # The key served_model.py reads (its KERAS_MODEL_ARTIFACT).
            artifacts={"keras_model": keras_file},
            signature=image_signature(),
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
        raise UserInputError(
            f"model_name={model_name!r}: no registered model of that name at {tracking_uri_shown()}"
        ) from None
    versions = client.search_model_versions(f"name='{model_name}'")
    candidates = sorted(
        ((str(version.version), _version_score(client, version, metric)) for version in versions),
        key=lambda item: int(item[0]),
    )
    scored = [(number, value) for number, value in candidates if value is not None]
    if not scored:
        raise UserInputError(
            f"model_name={model_name!r}: none of its {len(candidates)} versions has a {metric!r} score"
        )
    best_version, best_value = max(scored, key=lambda item: (item[1], int(item[0])))
    try:
        previous = str(client.get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        previous = None
    client.set_registered_model_alias(model_name, alias, best_version)
    return Promotion(model_name, alias, metric, best_version, best_value, candidates, previous)
