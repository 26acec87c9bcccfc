"""The logged model: MLflow's models-from-code pyfunc around the Keras model, loaded for real."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

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
        models.compile_model(model, models.make_optimizer("adam", 0.001, "constant", 100), steps_per_execution=1, jit_compile=False)
        model.fit(small_splits.train_images, small_splits.train_labels, batch_size=64, epochs=1, verbose=0)
        model = models.prepare_for_inference(model)
        with mlflow.start_run():
            model_uri = tracking.log_keras_model(model, small_splits.test_images[:5])
        yield model, model_uri
    finally:
        mlflow.set_tracking_uri(None)


def test_the_served_model_gives_the_keras_model_s_answers(logged_model, small_splits):
    model, model_uri = logged_model
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = small_splits.test_images[:1000].astype(np.float32)
    # In process, as over HTTP, the model takes lists: MLflow checks the type hint.
    served = np.asarray(pyfunc.predict(images.tolist()))
    expected = model.predict(images, verbose=0)
    assert served.shape == (1000, 10)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert (served.argmax(axis=1) == expected.argmax(axis=1)).all()
    # Any batch size, one trace: a single image too.
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images[:1].tolist())), expected[:1], atol=1e-5)
    # The compact form, rows of 784 pixels, gives the same answers.
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images[:100].reshape(100, 784).tolist())), expected[:100], atol=1e-5)
    # A NumPy array is refused by MLflow's type check, with a message that says what to pass.
    with pytest.raises(mlflow.exceptions.MlflowException, match="Expected list, but got ndarray"):
        pyfunc.predict(images[:2])


def test_the_signature_comes_from_the_type_hint_so_mlflow_skips_converting_requests(logged_model):
    """What makes batches fast: MLflow's scoring server hands ``inputs`` over as parsed only to a
    model whose signature comes from type hints."""
    _, model_uri = logged_model
    folder = mlflow.artifacts.download_artifacts(model_uri)
    assert "is_signature_from_type_hint: true" in open(f"{folder}/MLmodel").read()
    example = json.load(open(f"{folder}/serving_input_example.json"))
    assert np.asarray(example["inputs"]).shape == (5, 28, 28, 1)


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
        keras_model.predict(small_splits.test_images[:50], verbose=0), model.predict(small_splits.test_images[:50], verbose=0), atol=1e-6
    )
    # Compiled with its optimizer: one more epoch of fine-tuning runs and changes the weights.
    before = [weight.copy() for weight in keras_model.get_weights()]
    keras_model.fit(small_splits.train_images[:256], small_splits.train_labels[:256], batch_size=64, epochs=1, verbose=0)
    assert any(not np.array_equal(old, new) for old, new in zip(before, keras_model.get_weights()))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.full((2, 28, 28, 1), np.nan), "image 0 holds a value that is not a finite number"),
        (np.concatenate([np.zeros((1, 28, 28, 1)), np.full((1, 28, 28, 1), np.inf)]), "image 1 holds a value that is not a finite number"),
        (np.full((1, 28, 28, 1), 1e30), "image 0 holds a pixel outside 0..255"),
        (np.full((1, 28, 28, 1), -1.0), "image 0 holds a pixel outside 0..255"),
        (np.zeros((3, 28, 28, 1)), "a request may hold at most 2 images; got 3"),
        (np.zeros((1, 28, 28)), "inputs must have shape (n, 28, 28, 1), or (n, 784) for flat rows; got (1, 28, 28)"),
        (np.zeros((1, 783)), "inputs must have shape (n, 28, 28, 1), or (n, 784) for flat rows; got (1, 783)"),
        ([[1.0, 2.0], [3.0]], "inputs must be numbers"),
        (np.zeros((0, 28, 28, 1)), "inputs hold no image"),
    ],
    ids=["nan", "infinity", "1e30", "negative", "too-many", "shape", "flat-row-length", "ragged", "empty"],
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
