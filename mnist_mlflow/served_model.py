"""The served classifier: MLflow's models-from-code file for every model the project logs.

MLflow copies this file into the logged model and runs it when the model is loaded, by
`mlflow.pyfunc.load_model` or `mlflow models serve`. So it imports nothing from this project:
the model needs only MLflow, NumPy, Keras and TensorFlow.

Why not MLflow's Keras flavour: its `predict` calls `keras.Model.predict`, which sets up a
tf.data pipeline and a new step function on every call (mlflow#5259), slow for one image
(benchmarks/results/serving.md). This model calls one compiled TensorFlow function of the Keras
model instead, traced once for every batch size, and refuses what is not an image before it
reaches the network.

How it keeps MLflow's pyfunc contract and still serves fast. MLflow documents that a pyfunc
model takes NumPy arrays and pandas DataFrames in process, and that its signature describes the
input. MLflow's scoring server, though, converts a request against a tensor signature by deep-copying
every nested list of its ``inputs``, which costs more than the network itself for a batch of images
(see benchmarks/results/serving.md). MLflow skips that conversion for a model whose signature
it marks as coming from type hints, and leaves checking the input to the model. So the model is
logged with the image signature users expect to read, ``Tensor('float32', (-1, 28, 28, 1))`` in,
``Tensor('float32', (-1, 10))`` out, marked that way (``tracking.registry.log_keras_model``), and
``check_images`` is the one place that enforces it. In process, ``predict`` takes what MLflow's
pyfunc takes for an image model: a NumPy array of (n, 28, 28, 1) or (n, 784) pixels of any numeric
dtype, a pandas DataFrame of 784 pixel columns (or one column of images, as ``spark_udf`` gives),
or nested lists; over HTTP, the request's ``inputs`` as parsed. That mark, MLflow's private
``ModelSignature._is_signature_from_type_hint``, is the one MLflow internal the model relies on;
``tests/test_served_model.py`` fails if MLflow stops honouring it.

Why the garbage collector is frozen when `mlflow models serve` loads the model: a request of
100 nested 28x28x1 images makes about 80,000 Python lists, which set off full collections
over the half a million objects TensorFlow, Keras and MLflow keep alive; these took most of a
batch request's time. ``gc.freeze()`` after loading moves
those long-lived objects out of the collector's sight. It is done only in the scoring server's
process, never in a training process or a notebook, where frozen objects that later became
garbage would never be freed.

Settings, read when the model is loaded (for example as variables of `mlflow models serve`):
- ``MNIST_MLFLOW_MAX_BATCH``: the largest batch one request may hold (default 1000 images).
- ``MNIST_MLFLOW_SERVING_THREADS``: TensorFlow's threads for one operation (default 1), with
  one operation at a time. A request spends most of its time in MLflow's JSON decoding, on the
  server's own thread, so one TensorFlow thread serves as well as more
  (benchmarks/results/serving_threads2.md). Scale with `--workers`, not threads.
- ``MNIST_MLFLOW_GC_FREEZE``: ``1`` freezes the collector after loading in any process, ``0``
  never; unset, only under `mlflow models serve`.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_BATCH_ENV = "MNIST_MLFLOW_MAX_BATCH"
THREADS_ENV = "MNIST_MLFLOW_SERVING_THREADS"
GC_FREEZE_ENV = "MNIST_MLFLOW_GC_FREEZE"
DEFAULT_MAX_BATCH = 1000
IMAGE_SHAPE = (28, 28, 1)
PIXELS = 28 * 28
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


def _as_array(images) -> np.ndarray:
    """The input as one NumPy array, before any check: a DataFrame's pixel columns, or one
    column that holds an image per row (as ``spark_udf`` passes it), or nested lists."""
    if isinstance(images, pd.DataFrame):
        if images.shape[1] == 1 and images.shape[0] and np.ndim(images.iloc[0, 0]) > 0:
            return np.stack([np.asarray(image) for image in images.iloc[:, 0]])
        return images.to_numpy()
    return np.asarray(images)


def _numbers_of_objects(images: np.ndarray) -> np.ndarray:
    """An array of Python objects as float64, when they are all numbers or nulls (NaN, refused later as
    not finite); otherwise as it was. A whole number beyond any float (10**400) is out of range."""
    values = images.ravel()
    if not all(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) for value in values):
        return images
    numbers = np.empty(len(values), dtype=np.float64)
    for position, value in enumerate(values):
        try:
            numbers[position] = np.nan if value is None else float(value)
        except OverflowError:
            rows = images.shape[0] if images.ndim else 1
            bad = position // max(1, len(values) // max(1, rows))
            raise ImageInputError(f"image {bad} holds a pixel out of range: pixels are raw intensities 0-255") from None
    return numbers.reshape(images.shape)


def _holds_booleans(nested, depth: int) -> bool:
    """Whether nested lists of this depth hold a boolean anywhere. The leaves' types are gathered
    by C loops (chain, map, set), which costs a small part of parsing the request's JSON."""
    leaves = nested
    for _ in range(depth - 1):
        leaves = itertools.chain.from_iterable(leaves)
    return any(issubclass(kind, (bool, np.bool_)) for kind in set(map(type, leaves)))


def check_images(images, max_batch: int) -> np.ndarray:
    """The batch as float32 (n, 28, 28, 1) raw pixels, or ImageInputError naming what is wrong.

    Two shapes are accepted: images of (28, 28, 1), and the compact form, rows of 784 pixels
    (each image flattened row by row), which is far cheaper to send and parse. Pixels may be
    of any integer or floating-point type; strings and booleans are not pixels.
    """
    if isinstance(images, dict):
        # {"inputs": {...}}: named tensors, which this model does not take. Name a few keys, never the values.
        keys = ", ".join(repr(str(key)[:20]) for key in list(images)[:3])
        raise ImageInputError(f"inputs must be a list of images, not a mapping (keys {keys or 'none'})")
    given_as = images
    try:
        images = _as_array(images)
    except (TypeError, ValueError):
        images = None
    if images is not None and images.dtype.kind == "O":
        images = _numbers_of_objects(images)
    if images is None or images.dtype.kind not in "iuf":
        raise ImageInputError("inputs must be numbers: raw pixel intensities 0-255")
    if isinstance(given_as, (list, tuple)) and _holds_booleans(given_as, images.ndim):
        # NumPy turns true and false among numbers into 1.0 and 0.0; only the lists still tell.
        raise ImageInputError("inputs must be numbers: raw pixel intensities 0-255, not true or false")
    given = images
    images = images.astype(np.float32, copy=False)
    if images.ndim == 2 and images.shape[1] == PIXELS:
        images = images.reshape(-1, *IMAGE_SHAPE)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ImageInputError(
            f"inputs must have shape (n, 28, 28, 1), or (n, 784) for flat rows; got {tuple(images.shape)}"
        )
    count = images.shape[0]
    if count == 0:
        raise ImageInputError("inputs hold no image")
    if count > max_batch:
        raise ImageInputError(
            f"a request may hold at most {max_batch} images; got {count} "
            f"(split the batch, or serve with {MAX_BATCH_ENV} set higher)"
        )
    finite = np.isfinite(images)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(count, -1).all(axis=1))[0, 0])
        if np.isfinite(given.reshape(count, -1)[bad]).all():
            # Finite as sent (say 1e308), but beyond float32: out of range rather than not a number.
            raise ImageInputError(f"image {bad} holds a pixel out of range: pixels are raw intensities 0-255")
        raise ImageInputError(f"image {bad} holds a value that is not a finite number (NaN, Infinity or null)")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 255.0:
        outside = (images < 0.0) | (images > 255.0)
        bad = int(np.argwhere(outside.reshape(count, -1).any(axis=1))[0, 0])
        raise ImageInputError(f"image {bad} holds a pixel outside 0..255: pixels are raw intensities 0-255")
    return images


def loaded_by_mlflow_scoring_server() -> bool:
    """Whether `mlflow models serve` is loading this model.

    MLflow has no public flag for this at load time (it marks the serving environment only after
    the model is loaded, and also while validating an input example at logging time). Its
    scoring server runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``, and that module loads
    the model while it is being imported, so its presence says so. A serving test checks that
    the frozen collector is reported by a real `mlflow models serve`, and fails if this changes.
    """
    return "mlflow.pyfunc.scoring_server.app" in sys.modules


def should_freeze_garbage_collector() -> bool:
    setting = os.environ.get(GC_FREEZE_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return loaded_by_mlflow_scoring_server()


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
        if should_freeze_garbage_collector():
            # Collect what loading left behind first, so that only live objects are frozen.
            gc.collect()
            gc.freeze()
            print(
                f"mnist-mlflow: froze {gc.get_freeze_count()} loaded objects out of the garbage collector's sight",
                file=sys.stderr,
                flush=True,
            )

    # ``np.ndarray`` is a hint MLflow documents as one it neither validates nor infers a signature
    # from; the signature is given when the model is logged, and check_images enforces it. The
    # input may also be a DataFrame or nested lists (see the module's docstring).
    def predict(self, context, model_input: np.ndarray, params=None):
        images = check_images(model_input, self.max_batch)
        return self.probabilities(images).numpy()


mlflow.models.set_model(KerasImageClassifier())
