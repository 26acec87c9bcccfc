"""The logged model: MLflow's models-from-code pyfunc around the Keras model, loaded for real."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from mnist_mlflow import tracking
from mnist_mlflow.served_model import ImageInputError, check_images


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory, small_splits):
    """A small CNN trained for one epoch, logged by the project into a sqlite store."""
    import keras

    from mnist_mlflow import models

    folder = tmp_path_factory.mktemp("served_model")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        keras.utils.set_random_seed(0)
        model = models.build_cnn_model((8, 8), kernel_size=3, pooling=(True, True), dense_units=(16,), dropout_rate=0.0)
        models.compile_model(
            model, models.make_optimizer("adam", 0.001, "constant", 100), steps_per_execution=1, jit_compile=False
        )
        model.fit(small_splits.train_images, small_splits.train_labels, batch_size=64, epochs=1, verbose=0)
        model = models.prepare_for_inference(model)
        # Artifacts in the test's folder too, not in ./mlruns of the working directory.
        experiment_id = mlflow.create_experiment("served-model", artifact_location=(folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            model_uri = tracking.log_keras_model(model, small_splits.test_images[:5])
        yield model, model_uri
    finally:
        mlflow.set_tracking_uri(None)


def test_the_served_model_gives_the_keras_model_s_answers(logged_model, small_splits):
    model, model_uri = logged_model
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = small_splits.test_images[:1000].astype(np.float32)
    served = np.asarray(pyfunc.predict(images))
    expected = model.predict(images, verbose=0)
    assert served.shape == (1000, 10)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert (served.argmax(axis=1) == expected.argmax(axis=1)).all()
    # Any batch size, one trace: a single image too.
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images[:1])), expected[:1], atol=1e-5)


def _same_images_in_every_form(images_uint8: np.ndarray) -> dict:
    flat = images_uint8.reshape(len(images_uint8), 784)
    return {
        "float32 (n, 28, 28, 1)": images_uint8.astype(np.float32),
        "uint8 (n, 28, 28, 1)": images_uint8,
        "float32 (n, 784)": flat.astype(np.float32),
        "uint8 (n, 784)": flat,
        "DataFrame of 784 pixel columns": pd.DataFrame(flat, columns=[f"pixel_{index}" for index in range(784)]),
        "DataFrame of one image column": pd.DataFrame({"image": list(flat)}),
        "nested lists": images_uint8.astype(np.float32).tolist(),
        "flat lists": flat.tolist(),
    }


def test_predict_takes_what_mlflow_documents_for_a_pyfunc_model(logged_model, small_splits):
    """MLflow's pyfunc contract: NumPy arrays and pandas DataFrames, as well as lists, give the
    Keras model's answers, whatever the shape (images or flat rows) and the pixel type."""
    model, model_uri = logged_model
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = small_splits.test_images[:300]
    expected = model.predict(images.astype(np.float32), verbose=0)
    for form, model_input in _same_images_in_every_form(images).items():
        served = np.asarray(pyfunc.predict(model_input))
        assert served.shape == (300, 10), form
        np.testing.assert_allclose(served, expected, atol=1e-5, err_msg=form)


def test_the_signature_shows_the_image_shape(logged_model):
    _, model_uri = logged_model
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 28, 28, 1)}}
    ]
    assert signature.outputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 10)}}]
    folder = mlflow.artifacts.download_artifacts(model_uri)
    mlmodel = yaml.safe_load(open(f"{folder}/MLmodel"))
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 28, 28, 1]}}
    ]
    example = json.load(open(f"{folder}/serving_input_example.json"))
    assert np.asarray(example["inputs"]).shape == (5, 28, 28, 1)


def test_mlflow_still_honours_the_mark_that_leaves_input_checks_to_the_model(logged_model, small_splits):
    """The one MLflow internal the model's input handling relies on (served_model.py's docstring):
    a signature marked as coming from type hints. If MLflow stopped honouring it, it would enforce
    the float32 (-1, 28, 28, 1) tensor itself, refusing uint8 and flat rows in process, and its
    scoring server would deep-copy and convert every request (refusing flat rows too)."""
    from mlflow.pyfunc import scoring_server

    model, model_uri = logged_model
    folder = mlflow.artifacts.download_artifacts(model_uri)
    assert "is_signature_from_type_hint: true" in open(f"{folder}/MLmodel").read()
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    assert pyfunc.metadata._is_signature_from_type_hint()
    flat = small_splits.test_images[:3].reshape(3, 784)
    expected = model.predict(small_splits.test_images[:3].astype(np.float32), verbose=0)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(flat)), expected, atol=1e-5)
    # The scoring server's own request handling, in process: flat rows reach the model as parsed.
    body = json.dumps({"inputs": flat.tolist()})
    response = scoring_server.invocations(body, "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    assert response.status == 200, response.response
    np.testing.assert_allclose(np.asarray(json.loads(response.response)["predictions"]), expected, atol=1e-5)


def test_mlflow_evaluate_scores_the_model_as_a_classifier(logged_model, small_splits):
    """`mlflow.models.evaluate` with the classifier evaluator, on the loaded pyfunc. The evaluator
    wants one label per example, and the model gives ten probabilities (as a Keras classifier's
    predict does), so the function evaluated is the pyfunc's predict followed by argmax."""
    model, model_uri = logged_model
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images, labels = small_splits.test_images[:400], small_splits.test_labels[:400]
    data = pd.DataFrame(images.reshape(400, 784), columns=[f"pixel_{index}" for index in range(784)])
    data["label"] = labels
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("served-model").experiment_id):
        result = mlflow.models.evaluate(
            lambda features: pyfunc.predict(features).argmax(axis=1),
            data=data,
            targets="label",
            model_type="classifier",
            evaluators=["default"],
        )
    expected = float((model.predict(images.astype(np.float32), verbose=0).argmax(axis=1) == labels).mean())
    assert result.metrics["example_count"] == 400
    assert result.metrics["accuracy_score"] == pytest.approx(expected)


def test_the_logged_model_is_a_pyfunc_that_needs_nothing_from_this_project(logged_model):
    _, model_uri = logged_model
    folder = mlflow.artifacts.download_artifacts(model_uri)
    mlmodel = open(f"{folder}/MLmodel").read()
    assert "python_function" in mlmodel and "served_model.py" in mlmodel
    code = open(f"{folder}/served_model.py").read()
    assert "mnist_mlflow" not in code.replace("MNIST_MLFLOW_", "")
    requirements = sorted(line.split("==")[0] for line in open(f"{folder}/requirements.txt").read().split())
    assert requirements == ["keras", "mlflow", "numpy", "tensorflow"]


def test_the_keras_model_loads_for_further_training(logged_model, small_splits):
    model, model_uri = logged_model
    keras_model = tracking.load_keras_model(model_uri)
    np.testing.assert_allclose(
        keras_model.predict(small_splits.test_images[:50], verbose=0),
        model.predict(small_splits.test_images[:50], verbose=0),
        atol=1e-6,
    )
    # Compiled with its optimizer: one more epoch of fine-tuning runs and changes the weights.
    before = [weight.copy() for weight in keras_model.get_weights()]
    keras_model.fit(
        small_splits.train_images[:256], small_splits.train_labels[:256], batch_size=64, epochs=1, verbose=0
    )
    assert any(not np.array_equal(old, new) for old, new in zip(before, keras_model.get_weights()))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.full((2, 28, 28, 1), np.nan), "image 0 holds a value that is not a finite number"),
        (
            np.concatenate([np.zeros((1, 28, 28, 1)), np.full((1, 28, 28, 1), np.inf)]),
            "image 1 holds a value that is not a finite number",
        ),
        (np.full((1, 28, 28, 1), 1e30), "image 0 holds a pixel outside 0..255"),
        (np.full((1, 28, 28, 1), -1.0), "image 0 holds a pixel outside 0..255"),
        (np.zeros((3, 28, 28, 1)), "a request may hold at most 2 images; got 3"),
        (np.zeros((1, 28, 28)), "inputs must have shape (n, 28, 28, 1), or (n, 784) for flat rows; got (1, 28, 28)"),
        (np.zeros((1, 783)), "inputs must have shape (n, 28, 28, 1), or (n, 784) for flat rows; got (1, 783)"),
        ([[1.0, 2.0], [3.0]], "inputs must be numbers"),
        (np.zeros((0, 28, 28, 1)), "inputs hold no image"),
        ([[["255"]] * 28] * 28, "inputs must be numbers"),
        (np.ones((1, 784), dtype=bool), "inputs must be numbers"),
        ([[None] + [0.0] * 783], "image 0 holds a value that is not a finite number"),
        ([[0.0] * 783 + [1e308]], "image 0 holds a pixel out of range"),
        (
            {"pixels": np.zeros((3, 28, 28, 1)).tolist()},
            "inputs must be a list of images, not a mapping (keys 'pixels')",
        ),
        ([[" 3 "] * 784], "inputs must be numbers"),
        ([[True] + [0.5] * 783], "inputs must be numbers: raw pixel intensities 0-255, not true or false"),
        ([[[[0.0]] * 28] * 28, [[[0.0]] * 27 + [[False]]] * 28], "not true or false"),
        ([[0.0] * 783 + [10**400]], "image 0 holds a pixel out of range"),
        ([[0] * 784, [0] * 783 + [10**400]], "image 1 holds a pixel out of range"),
    ],
    ids=[
        "nan",
        "infinity",
        "1e30",
        "negative",
        "too-many",
        "shape",
        "flat-row-length",
        "ragged",
        "empty",
        "strings",
        "booleans",
        "null",
        "1e308",
        "mapping",
        "numeric-strings",
        "booleans-among-numbers",
        "a-boolean-in-image-1",
        "ten-to-the-400",
        "ten-to-the-400-in-image-1",
    ],
)
def test_what_is_not_an_image_is_refused_with_http_400_and_a_message_without_the_data(images, message):
    with pytest.raises(ImageInputError) as caught:
        check_images(images, max_batch=2)
    error = caught.value
    assert error.get_http_status_code() == 400
    assert message in error.message
    # MLflow's scoring server rewrites the message of a predict error to include the input; not this one.
    own = error.message
    error.message = f"Failed to predict data '{images}'"
    assert json.loads(error.serialize_as_json())["message"] == own
