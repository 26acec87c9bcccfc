"""The served classifier: MLflow's models-from-code file for every model the project logs.

MLflow copies this file into the logged model and runs it when the model is loaded, by
`mlflow.pyfunc.load_model` or `mlflow models serve`. So it imports nothing from this project:
the model needs only MLflow, NumPy, Keras and TensorFlow.

Why not MLflow's Keras flavour: its `predict` calls `keras.Model.predict`, which sets up a
tf.data pipeline and a new step function on every call (mlflow#5259), about 70 ms for one
image. This model calls one compiled TensorFlow function of the Keras model instead, traced
once for every batch size, and refuses what is not an image before it reaches the network.

Settings, read when the model is loaded (for example as variables of `mlflow models serve`):
- ``MNIST_MLFLOW_MAX_BATCH``: the largest batch one request may hold (default 1000 images).
- ``MNIST_MLFLOW_SERVING_THREADS``: TensorFlow's threads for one operation (default 1), with
  one operation at a time. A request spends most of its time in MLflow's JSON decoding, on the
  server's own thread; measured on 2 cores, one TensorFlow thread served single images faster
  (p50 3.5 against 3.8 ms) and batches as fast as two. Scale with `--workers`, not threads.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_BATCH_ENV = "MNIST_MLFLOW_MAX_BATCH"
THREADS_ENV = "MNIST_MLFLOW_SERVING_THREADS"
DEFAULT_MAX_BATCH = 1000
IMAGE_SHAPE = (28, 28, 1)
KERAS_MODEL_ARTIFACT = "keras_model"


class ImageInputError(MlflowException):
    """A request that is not a batch of images: HTTP 400, with a message that names the problem.

    MLflow's scoring server puts the whole input in front of the message of an exception that
    ``predict`` raises ("Failed to predict data '...'"), which would echo the request back,
    pixels and all. This exception keeps its own message.
    """

    def __init__(self, message: str):
        self._own_message = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._own_message

    @message.setter
    def message(self, value: str) -> None:
        # Ignore the scoring server's rewrite, which would include the input.
        pass


def check_images(images: np.ndarray, max_batch: int) -> np.ndarray:
    """The batch as float32 (n, 28, 28, 1) raw pixels, or ImageInputError naming what is wrong."""
    try:
        images = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise ImageInputError("inputs must be numbers: raw pixel intensities 0-255") from None
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ImageInputError(f"inputs must have shape (n, 28, 28, 1); got {tuple(images.shape)}")
    count = images.shape[0]
    if count == 0:
        raise ImageInputError("inputs hold no image")
    if count > max_batch:
        raise ImageInputError(
            f"a request may hold at most {max_batch} images; got {count} (split the batch, or serve with {MAX_BATCH_ENV} set higher)"
        )
    finite = np.isfinite(images)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(count, -1).all(axis=1))[0, 0])
        raise ImageInputError(f"image {bad} holds a value that is not a finite number (NaN, Infinity or null)")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 255.0:
        outside = (images < 0.0) | (images > 255.0)
        bad = int(np.argwhere(outside.reshape(count, -1).any(axis=1))[0, 0])
        raise ImageInputError(f"image {bad} holds a pixel outside 0..255: pixels are raw intensities 0-255")
    return images


class KerasImageClassifier(mlflow.pyfunc.PythonModel):
    """Ten class probabilities for each 28x28x1 image of raw pixels."""

    def load_context(self, context) -> None:
        threads = int(os.environ.get(THREADS_ENV, "0") or 0) or 1
        import tensorflow as tf

        # Set before TensorFlow starts its thread pools, that is before the model is loaded.
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            # Already started (say, in a process that trained the model): keep its settings.
            pass
        import keras

        self.max_batch = int(os.environ.get(MAX_BATCH_ENV, "0") or 0) or DEFAULT_MAX_BATCH
        self.keras_model = keras.saving.load_model(context.artifacts[KERAS_MODEL_ARTIFACT], compile=False)
        model = self.keras_model

        # One trace for any batch size: the batch dimension is left open.
        @tf.function(input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.float32)], reduce_retracing=True)
        def probabilities(images):
            return model(images, training=False)

        self.probabilities = probabilities

    def predict(self, context, model_input, params=None):
        images = check_images(model_input, self.max_batch)
        return self.probabilities(images).numpy()


mlflow.models.set_model(KerasImageClassifier())
