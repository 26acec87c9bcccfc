"""Models: logging the servable model, loading the Keras model back, registering and promoting versions."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import UserInputError
from mnist_mlflow.tracking.server import auth_error, tracking_uri_shown
from mnist_mlflow.tracking.session import RunPlacement, start_run

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


# Characters MLflow refuses in a logged model's name (mlflow.utils.validation).
_MODEL_NAME_REFUSED = str.maketrans({character: "_" for character in "/:.%\"'"})


def logged_model_name(run_name: str) -> str:
    """A logged model's name from its run's: what the model is (``trial-007-dense-128-relu-...``),
    so that the Models tab tells fifty models apart. MLflow refuses ``.`` and ``/`` in a model
    name, so ``lr0.001`` becomes ``lr0_001``."""
    return run_name.translate(_MODEL_NAME_REFUSED)[:250] or "model"


def log_keras_model(model, example_images: np.ndarray, name: str = "model", step: int = 0) -> str:
    """Logs a model that takes raw pixels ((n, 28, 28, 1) or (n, 784)) and returns 10 probabilities.

    The logged model is MLflow's models-from-code pyfunc of ``served_model.py``: it serves
    through `mlflow models serve` and loads with `mlflow.pyfunc.load_model`, without calling
    ``keras.Model.predict`` on every request. The Keras model itself is one of its artifacts,
    ``artifacts/model.keras`` (see ``load_keras_model``). Requirements are given explicitly instead of
    being inferred, which would load the model once more in a subprocess. ``name`` is the logged
    model's name (see ``logged_model_name``). MLflow links every metric point of the run at ``step``
    to the model, without a data set: the caller gives a step with no points (one past the last
    epoch) and links the model's figures itself (``runs.link_metrics_to_model``). Returns the model
    URI, ``models:/<model id>``.
    """
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-model-") as folder:
        keras_file = os.path.join(folder, KERAS_MODEL_FILE)
        model.save(keras_file)
        info = mlflow.pyfunc.log_model(
            name=logged_model_name(name),
            step=step,
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
    """The trained Keras model of a logged or registered model (``models:/<model id>``, ``models:/name@alias``),
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
class Candidate:
    """One registered version, scored by its logged model's validation figure."""

    version: str
    value: float | None
    model_id: str | None
    run_id: str | None
    # Where the score came from: the logged model's metric on its validation data set, or, for a
    # version logged before models carried their data sets, the version's tag or its run's metric.
    source: str = "logged model"


@dataclass
class Promotion:
    """What ``promote_best_version`` chose, and the scores it chose among."""

    model_name: str
    alias: str
    metric: str
    version: str
    value: float
    candidates: list[Candidate]
    previous_version: str | None
    # The gate: the chosen model's accuracy, measured again by mlflow.models.evaluate.
    evaluated_accuracy: float
    evaluated_on: str


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


def _validation_metric(logged_model, metric: str) -> float | None:
    """The logged model's ``metric`` on its validation data set (``<data set>-validation``)."""
    for point in logged_model.metrics or []:
        if point.key == metric and (point.dataset_name or "").endswith("-validation"):
            return float(point.value)
    return None


def _model_id_of(version) -> str | None:
    """The logged model a registered version was made from: its ``model_id``, or, where the
    registry does not return one, its source ``models:/<model id>``."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = version.source or ""
    if source.startswith("models:/m-") and source.count("/") == 1:
        return source.removeprefix("models:/")
    return None


def rank_versions(client: MlflowClient, model_name: str, metric: str) -> list[Candidate]:
    """Every version of ``model_name`` with its score, best first (ties: the newer first).

    The scores come from ``mlflow.search_logged_models``: each version's logged model and the
    ``metric`` linked to its validation data set. A version logged before models carried their
    data sets falls back to the version's tag or its run's metric, and says so.
    """
    versions = client.search_model_versions(f"name='{model_name}'")
    model_ids = sorted({_model_id_of(version) for version in versions} - {None})
    logged = {}
    if model_ids:
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        quoted = ", ".join(f"'{model_id}'" for model_id in model_ids)
        for model in mlflow.search_logged_models(
            experiment_ids=experiments, filter_string=f"model_id IN ({quoted})", output_format="list"
        ):
            logged[model.model_id] = model
    candidates = []
    for version in versions:
        model_id = _model_id_of(version)
        value = _validation_metric(logged[model_id], metric) if model_id in logged else None
        candidate = Candidate(str(version.version), value, model_id, version.run_id)
        if value is None:
            candidate.value, candidate.source = _version_score(client, version, metric), "version tag or run"
        candidates.append(candidate)
    return sorted(
        candidates, key=lambda item: (item.value is not None, item.value or 0.0, int(item.version)), reverse=True
    )


def evaluate_classifier(
    model_uri: str, model_id: str | None, images: np.ndarray, labels: np.ndarray, dataset_name: str
):
    """``mlflow.models.evaluate`` of the served model as a classifier on ``images``, in the active
    run, its metrics linked to the logged model ``model_id`` and to the data set ``dataset_name``.
    Returns its accuracy. The classifier evaluator wants one label per image, and the model
    answers ten probabilities (as a Keras classifier's predict does), so the function evaluated is
    the model's predict followed by argmax."""
    import pandas as pd
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    # Loading the model draws a progress bar per file and says it became the "active model" of
    # this process; the gate prints what counts in one line instead.
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    logging.getLogger("mlflow.tracking.fluent").setLevel(logging.WARNING)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    table = pd.DataFrame(images.reshape(len(images), -1), columns=[f"pixel_{index}" for index in range(784)])
    table["label"] = labels
    with warnings.catch_warnings():
        # MLflow warns that a pandas data set has no explicit source.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(table, targets="label", name=dataset_name)

    def predicted_labels(features):
        # In chunks: the served model takes at most its batch limit per call, as a server would.
        chunks = [features.iloc[start : start + 1000] for start in range(0, len(features), 1000)]
        return np.concatenate([pyfunc.predict(chunk).argmax(axis=1) for chunk in chunks])

    evaluation_log = logging.getLogger("mlflow.models.evaluation")
    level = evaluation_log.level
    # MLflow's evaluator guesses the model type from the labels and warns that it "looks like None"
    # although it is told; scikit-learn warns of a class a weak model never predicts. The figures
    # are right; the promote entry point prints what counts in one line.
    evaluation_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mlflow.models.evaluate(
            predicted_labels,
            data=dataset,
            model_type="classifier",
            evaluators=["default"],
            # The ten classes, stated: a small split might miss one. No SHAP: it is not installed.
            evaluator_config={"default": {"label_list": list(range(10)), "log_model_explainability": False}},
            model_id=model_id,
        )
    evaluation_log.setLevel(level)
    return float(result.metrics["accuracy_score"])


def check_promotable(model_name: str, metric: str) -> MlflowClient:
    """Refuses a test metric, and a model name that is not registered, in one line."""
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
    return client


def current_alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def promote_best_version(
    model_name: str,
    validation_split,
    metric: str = "val_accuracy",
    alias: str = "champion",
    min_val_accuracy: float = 0.0,
) -> Promotion:
    """Points ``alias`` at the version of ``model_name`` with the highest validation ``metric``,
    once an evaluation gate has passed.

    Selection never uses test scores: the test split is kept for reporting. Ties go to the newer
    version. The gate: ``mlflow.models.evaluate`` scores the chosen model as a classifier on its
    validation split, in a run of its own, linked to the model; below ``min_val_accuracy`` the
    alias stays where it was and the refusal is one line. ``validation_split(params)`` gives the
    (images, labels, data set name) of the validation split that a run with these parameters used.
    """
    client = check_promotable(model_name, metric)
    candidates = rank_versions(client, model_name, metric)
    scored = [candidate for candidate in candidates if candidate.value is not None]
    if not scored:
        raise UserInputError(
            f"model_name={model_name!r}: none of its {len(candidates)} versions has a {metric!r} score"
        )
    best = scored[0]
    previous = current_alias_version(client, model_name, alias)
    images, labels, dataset_name = validation_split(client.get_run(best.run_id).data.params)
    model_uri = f"models:/{best.model_id}" if best.model_id else f"models:/{model_name}/{best.version}"
    placement = RunPlacement(f"evaluate-{logged_model_name(model_name)}-v{best.version}", {"entry_point": "promote"})
    with start_run(placement):
        accuracy = evaluate_classifier(model_uri, best.model_id, images, labels, dataset_name)
    if accuracy < min_val_accuracy:
        stays = f"'{alias}' stays at version {previous}" if previous else f"no version gets '{alias}'"
        raise UserInputError(
            f"model_name={model_name!r}: version {best.version}, the best by {metric}, scored accuracy "
            f"{accuracy:.4f} on {dataset_name} ({len(labels):,} images), below min_val_accuracy={min_val_accuracy:g}; "
            f"{stays}"
        )
    client.set_registered_model_alias(model_name, alias, best.version)
    return Promotion(model_name, alias, metric, best.version, best.value, candidates, previous, accuracy, dataset_name)
