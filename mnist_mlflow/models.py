"""Keras model builders. This module knows nothing about MLflow.

Every model takes raw pixel intensities 0-255 of shape (28, 28, 1) and scales them itself,
so the logged and served model needs no preprocessing from its callers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf
from keras import ops

IMAGE_SHAPE = (28, 28, 1)
RELU_INITIALIZER = "he_normal"
NUM_CLASSES = 10


class MultiStepSequential(keras.Sequential):
    """A Sequential model that can take several training batches per step and walk through them
    in one compiled loop.

    Keras pays a fixed cost for every training step it starts (about half a millisecond here),
    which outweighs the arithmetic of a small network or a small batch. With
    ``batches_per_step`` set to the size of one real batch, each batch ``fit`` hands over holds
    a whole number of such batches, and ``train_step`` steps through them in order inside the
    same compiled function. The optimizer, its learning-rate schedule and the metrics see
    exactly the steps, in the order, that one batch per step would give them; only Keras's
    step counter (and its progress bar) counts the larger batches.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The size of one real training batch; None trains on each batch as given.
        self.step_batch_size: int | None = None

    def train_step(self, data):
        if not self.step_batch_size:
            return super().train_step(data)
        images, labels = data
        batch_size = self.step_batch_size
        num_steps = tf.shape(images)[0] // batch_size

        def one_step(step):
            start = step * batch_size
            batch_images = tf.slice(images, [start] + [0] * (images.shape.rank - 1), [batch_size, *images.shape[1:]])
            batch_labels = tf.slice(labels, [start], [batch_size])
            logs = super(MultiStepSequential, self).train_step((batch_images, batch_labels))
            # The next step starts once this one's updates are done.
            with tf.control_dependencies(tf.nest.flatten(logs)):
                return step + 1

        done = tf.while_loop(lambda step: step < num_steps, one_step, [tf.constant(0)])
        with tf.control_dependencies([done]):
            return self.get_metrics_result()


def _input_layers() -> list:
    return [
        keras.Input(shape=IMAGE_SHAPE, name="pixels"),
        keras.layers.Rescaling(1.0 / 255.0, name="rescale"),
    ]


def build_dense_model(
    hidden_units: Sequence[int],
    activations: Sequence[str],
    dropout_rate: float = 0.0,
    l2_factor: float = 0.0,
    regularized_layers: str = "all",
    num_classes: int = NUM_CLASSES,
) -> keras.Model:
    """Flatten -> Dense(width, activation) [-> Dropout] per hidden layer -> Dense(10, softmax).

    ``l2_factor`` adds L2 weight decay to the hidden kernels: to every one with
    ``regularized_layers="all"``, to the first only with ``"first"``. ``dropout_rate`` adds
    dropout after every hidden layer.
    """
    if regularized_layers not in ("all", "first"):
        raise ValueError(f"regularized_layers={regularized_layers!r} is not one of: all, first")
    layers = _input_layers() + [keras.layers.Flatten(name="flatten")]
    for index, (width, activation) in enumerate(zip(hidden_units, activations, strict=True), start=1):
        regularized = l2_factor and (regularized_layers == "all" or index == 1)
        regularizer = keras.regularizers.L2(l2_factor) if regularized else None
        layers.append(
            keras.layers.Dense(width, activation=activation, kernel_regularizer=regularizer, name=f"hidden_{index}")
        )
        if dropout_rate:
            layers.append(keras.layers.Dropout(dropout_rate, name=f"dropout_{index}"))
    layers.append(keras.layers.Dense(num_classes, activation="softmax", name="probabilities"))
    return MultiStepSequential(layers, name="dense")


class ReshapeMaxPooling2D(keras.layers.MaxPooling2D):
    """2x2 max pooling with stride 2 as a reshape and a maximum; same results as MaxPooling2D.

    Like MaxPooling2D with "valid" padding, an odd last row or column is dropped. Under XLA
    on a CPU, MaxPooling2D's gradient is slow enough to dominate the CNN's training step; this
    form's gradient is a cheap elementwise mask, and the whole CNN trains much faster than with
    TensorFlow's own kernels (docs/performance.md).
    """

    def __init__(self, **kwargs):
        super().__init__(pool_size=2, strides=2, **kwargs)

    def call(self, inputs):
        height, width, channels = inputs.shape[1] // 2, inputs.shape[2] // 2, inputs.shape[3]
        inputs = inputs[:, : 2 * height, : 2 * width, :]
        return ops.max(ops.reshape(inputs, (-1, height, 2, width, 2, channels)), axis=(2, 4))


_STANDARD_LAYERS = {ReshapeMaxPooling2D: keras.layers.MaxPooling2D}


def with_standard_layers(model: keras.Model) -> keras.Model:
    """A copy of ``model`` as a plain ``keras.Sequential`` of stock Keras layers, with the same
    weights and predictions.

    Saved and served models use only stock Keras classes, so loading them needs nothing from
    this project.
    """

    def clone(layer):
        standard = _STANDARD_LAYERS.get(type(layer))
        # Weights are float32 also under mixed precision; the copy computes in float32 too.
        return (standard or type(layer)).from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def cpu_multiplies_bfloat16() -> bool:
    """Whether this processor multiplies bfloat16 matrices itself (AMX-BF16 or AVX512-BF16).

    Read from /proc/cpuinfo; False where that file does not exist.
    """
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", cpu_flags) is not None


def resolve_precision(precision: str) -> str:
    """``float32`` or ``bfloat16``: what ``auto`` means on this machine, or the choice as given."""
    if precision == "auto":
        return "bfloat16" if cpu_multiplies_bfloat16() else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision={precision!r} is not one of: auto, float32, bfloat16")
    return precision


def computes_in_bfloat16(model: keras.Model) -> bool:
    return any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in model.layers)


def build_cnn_model(
    filters: Sequence[int],
    kernel_size: int = 3,
    pooling: Sequence[bool] | None = None,
    dense_units: Sequence[int] = (64, 64),
    dropout_rate: float = 0.0,
    num_classes: int = NUM_CLASSES,
    precision: str = "float32",
) -> keras.Model:
    """Conv2D(count, kernel, relu) [-> MaxPool 2x2] per entry -> Flatten -> Dense(relu)... -> Dense(10, softmax).

    ``pooling`` holds one flag per convolution (default: pool after each). ``dropout_rate``
    applies dropout just before the output layer. The relu layers start from He-normal
    weights, which suit relu better than Keras's default Glorot-uniform: with plain SGD at
    0.1 the network learns markedly faster in its first hundred steps.

    In float32, pooling uses ``ReshapeMaxPooling2D``, the equivalent of MaxPooling2D that
    trains fast under XLA; ``with_standard_layers`` gives the stock-Keras copy to save.

    ``precision`` (``float32``, ``bfloat16`` or ``auto``, see ``resolve_precision``):
    bfloat16 is Keras mixed precision, with bfloat16 arithmetic and float32 weights; the
    softmax stays float32. It runs on TensorFlow's oneDNN kernels, not XLA (XLA on CPU does
    not use the bfloat16 matrix units), with stock pooling. The saved model computes in float32.
    """
    bfloat16 = resolve_precision(precision) == "bfloat16"
    policy = "mixed_bfloat16" if bfloat16 else None
    pool_layer = keras.layers.MaxPooling2D if bfloat16 else ReshapeMaxPooling2D
    pooling = [True] * len(filters) if pooling is None else list(pooling)
    layers = _input_layers()
    for index, (count, pooled) in enumerate(zip(filters, pooling, strict=True), start=1):
        layers.append(
            keras.layers.Conv2D(
                count,
                kernel_size,
                activation="relu",
                kernel_initializer=RELU_INITIALIZER,
                name=f"conv_{index}",
                dtype=policy,
            )
        )
        if pooled:
            layers.append(pool_layer(name=f"pool_{index}", dtype=policy))
    layers.append(keras.layers.Flatten(name="flatten", dtype=policy))
    for index, width in enumerate(dense_units, start=1):
        layers.append(
            keras.layers.Dense(
                width, activation="relu", kernel_initializer=RELU_INITIALIZER, name=f"hidden_{index}", dtype=policy
            )
        )
    if dropout_rate:
        layers.append(keras.layers.Dropout(dropout_rate, name="dropout", dtype=policy))
    layers.append(keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32"))
    return MultiStepSequential(layers, name="cnn")


def make_optimizer(
    name: str, learning_rate: float, lr_schedule: str = "constant", total_steps: int | None = None
) -> keras.optimizers.Optimizer:
    """An optimizer by name; ``lr_schedule="cosine"`` decays the rate to zero over ``total_steps``."""
    if lr_schedule == "cosine":
        if not total_steps:
            raise ValueError("lr_schedule='cosine' needs total_steps")
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    elif lr_schedule != "constant":
        raise ValueError(f"lr_schedule={lr_schedule!r} is not one of: constant, cosine")
    optimizers = {
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    if name not in optimizers:
        raise ValueError(f"optimizer={name!r} is not one of: {', '.join(optimizers)}")
    return optimizers[name](learning_rate=learning_rate)


def compile_model(
    model: keras.Model,
    optimizer: str | keras.optimizers.Optimizer,
    learning_rate: float | None = None,
    steps_per_execution: int = 1,
    jit_compile: bool = True,
) -> keras.Model:
    """Compiles for integer labels; ``steps_per_execution`` batches run per call.

    ``optimizer`` is a name (then ``learning_rate`` is required) or an optimizer instance,
    whose state is kept. ``jit_compile`` turns XLA on: on CPU it speeds up the dense networks
    and, with ``ReshapeMaxPooling2D`` for pooling, the convolutional ones.
    """
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return model


def prepare_for_inference(model: keras.Model) -> keras.Model:
    """The trained model as it should be saved: stock layers, one batch per call, no XLA.

    Training runs many batches per call; a saved model that did so would report odd step
    counts and over-run small prediction requests. XLA would compile again for every new
    request size. The optimizer and its state are kept so training can be resumed.
    """
    if (
        type(model) is not keras.Sequential
        or computes_in_bfloat16(model)
        or any(type(layer) in _STANDARD_LAYERS for layer in model.layers)
    ):
        model = with_standard_layers(model)
    return compile_model(model, model.optimizer, steps_per_execution=1, jit_compile=False)


def use_xla(model: keras.Model) -> bool:
    """Whether to compile ``model`` with XLA: yes, unless it has dropout or computes in bfloat16.

    On a CPU, XLA makes the small dense networks and the convolutional ones (with
    ReshapeMaxPooling2D) faster, but its dropout is several times slower than TensorFlow's own
    (``benchmarks/bench_dropout_xla.py`` measures all four variants side by side; the figures are
    in ``benchmarks/results/dropout_xla.md``).
    """
    has_dropout = any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    return not has_dropout and not computes_in_bfloat16(model)


def count_trainable_parameters(model: keras.Model) -> int:
    return int(sum(int(keras.ops.size(weight)) for weight in model.trainable_weights))


def summary_text(model: keras.Model) -> str:
    """The model summary (layers, output shapes, parameter counts) as plain text."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100)
    return "\n".join(lines)
