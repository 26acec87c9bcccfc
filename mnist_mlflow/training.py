"""Fitting and evaluating a compiled Keras model. This module knows nothing about MLflow.

``train_and_evaluate`` returns its metrics; whoever calls it decides what to record. Extra
Keras callbacks (such as a tracker's) can be passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from mnist_mlflow import lifecycle
from mnist_mlflow.checkpointing import Durability, EpochCheckpoint, RestoreCheckpoint
from mnist_mlflow.config import TrainingConfig, TrainingDivergedError
from mnist_mlflow.data import Splits, evaluation_dataset, training_dataset
from mnist_mlflow.models import MultiStepSequential, computes_in_bfloat16, with_standard_layers

# Batches run per compiled call at most; amortises Python and dispatch overhead per step.
MAX_STEPS_PER_EXECUTION = 200
# A MultiStepSequential takes up to this many batches per step, and at most this many
# examples (the images of one step are a float32 copy, so this bounds its memory).
MAX_BATCHES_PER_STEP = 200
MAX_EXAMPLES_PER_STEP = 10_000


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_time_s`` (wall seconds, including validation) and ``epoch_cpu_time_s`` (CPU
    seconds of all the process's threads) to each epoch's logs.

    Placed before other callbacks, it makes the timing visible to every later callback,
    including the History and any metric logger. CPU time is the steadier figure on a shared
    machine, where wall time also counts the moments other programs hold the cores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch_times: list[float] = []
        self.epoch_cpu_times: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        cpu_elapsed = time.process_time() - self._cpu_start
        self.epoch_times.append(elapsed)
        self.epoch_cpu_times.append(cpu_elapsed)
        if logs is not None:
            logs["epoch_time_s"] = elapsed
            logs["epoch_cpu_time_s"] = cpu_elapsed


class RestoreBestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best ``monitor`` and restores them at the end.

    Ties go to the later epoch, which has trained longer (and, with a decaying learning rate,
    at a smaller step). Unlike ``EarlyStopping(restore_best_weights=True)``, it never stops
    training and always restores.
    """

    def __init__(self, monitor: str = "val_accuracy") -> None:
        super().__init__()
        self.monitor = monitor
        self.best_value = -math.inf
        self.best_epoch = -1
        self._best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value >= self.best_value:
            self.best_value = float(value)
            self.best_epoch = epoch
            self._best_weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


class SetEpoch(keras.callbacks.Callback):
    """Tells the training data set which epoch begins, so that it draws that epoch's order
    (see :func:`mnist_mlflow.data.training_dataset`)."""

    def __init__(self) -> None:
        super().__init__()
        import tensorflow as tf

        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


class StopAtStepBoundary(keras.callbacks.Callback):
    """Raises a stop that arrived during the fit (SIGTERM, a lost server, a lost lease) between
    two compiled calls, where the main thread is in Python and TensorFlow holds no half-done work.

    Raising from a signal handler could land inside TensorFlow's native code, which once in 14
    tries aborted the process (``free(): invalid next size``). So while a fit runs, the handler
    only records the stop (:func:`mnist_mlflow.lifecycle.stops_at_boundaries`) and this raises
    it, within one compiled call (up to ``MAX_STEPS_PER_EXECUTION`` steps).
    """

    def on_train_batch_end(self, batch, logs=None):
        lifecycle.raise_pending_stop()

    def on_epoch_begin(self, epoch, logs=None):
        lifecycle.raise_pending_stop()

    def on_test_batch_end(self, batch, logs=None):
        lifecycle.raise_pending_stop()

    def on_predict_batch_end(self, batch, logs=None):
        lifecycle.raise_pending_stop()


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at once when the loss becomes NaN or infinite, by raising TrainingDivergedError.

    Keras's own TerminateOnNaN only stops the fit, and the run would then end FINISHED with a
    useless model. The loss is looked at after every compiled call (up to
    ``MAX_STEPS_PER_EXECUTION`` steps), so a diverged run stops within one call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _check(self, logs, where: str) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDivergedError(
                f"the training loss became {float(loss)} {where} of epoch {self.epoch + 1}; training diverged "
                "(a smaller learning_rate usually helps)"
            )

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, f"at step {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, "at the end")


@dataclass
class TrainingResult:
    """What a finished fit produced, with the selected (best-epoch) model evaluated on test."""

    history: dict[str, list[float]]
    epoch_times: list[float]
    best_epoch: int
    train_time_s: float
    examples_per_s: float
    test_loss: float
    test_accuracy: float
    test_probabilities: np.ndarray = field(repr=False)

    @property
    def best_val_accuracy(self) -> float:
        return float(self.history["val_accuracy"][self.best_epoch])

    @property
    def mean_epoch_time_s(self) -> float:
        return float(np.mean(self.epoch_times))

    @property
    def steady_epoch_time_s(self) -> float:
        """The median epoch's wall seconds, not counting the first, which also traces and compiles
        the step: what another epoch of this model costs. One epoch alone is its own figure."""
        later = self.epoch_times[1:] or self.epoch_times
        return float(np.median(later))

    def metrics(self) -> dict[str, float]:
        """The run-level summary metrics (per-epoch histories are separate)."""
        return {
            "best_epoch": float(self.best_epoch),
            "best_val_accuracy": self.best_val_accuracy,
            "best_val_loss": float(self.history["val_loss"][self.best_epoch]),
            "train_time_s": self.train_time_s,
            "mean_epoch_time_s": self.mean_epoch_time_s,
            "examples_per_s": self.examples_per_s,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
        }


def loss_and_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Mean sparse categorical cross-entropy and accuracy, computed as Keras computes them
    (probabilities clipped to [1e-7, 1 - 1e-7] before the logarithm)."""
    epsilon = keras.config.epsilon()
    chosen = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    loss = -np.log(np.clip(chosen, epsilon, 1 - epsilon)).mean()
    accuracy = (probabilities.argmax(axis=1) == labels).mean()
    return float(loss), float(accuracy)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def steps_per_execution_for(num_examples: int, batch_size: int) -> int:
    return max(1, min(MAX_STEPS_PER_EXECUTION, steps_per_epoch(num_examples, batch_size)))


def batches_per_step_for(model: keras.Model, num_examples: int, batch_size: int) -> int:
    """How many batches a training step of ``model`` takes at once (see MultiStepSequential).

    One, the ordinary way, unless:
    - the model is a MultiStepSequential;
    - the batch size divides the training examples, so every batch is whole (a smaller last
      batch would need a step of another shape inside the compiled loop);
    - it is not a convolutional network compiled with XLA: XLA on CPU runs convolutions
      inside a loop many times slower per step, while dense networks gain, most at small
      batches (``benchmarks/bench_speed.py`` has the whole runs; docs/performance.md explains).
    """
    if not isinstance(model, MultiStepSequential) or num_examples % batch_size:
        return 1
    if model.jit_compile and any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers):
        return 1
    num_batches = num_examples // batch_size
    limit = max(1, min(MAX_BATCHES_PER_STEP, MAX_EXAMPLES_PER_STEP // batch_size))
    # The largest count within the limits that divides the epoch's batches: every step then has
    # one shape, and XLA compiles the step once.
    return max(count for count in range(1, min(limit, num_batches) + 1) if num_batches % count == 0)


def _fit_datasets(model: keras.Model, splits: Splits, config: TrainingConfig, epoch_counter: SetEpoch):
    """The training data set (several batches per step where the model takes them) and the
    validation data set."""
    batches_per_step = batches_per_step_for(model, len(splits.train_labels), config.batch_size)
    if isinstance(model, MultiStepSequential):
        model.step_batch_size = config.batch_size if batches_per_step > 1 else None
    train_data = training_dataset(
        splits.train_images,
        splits.train_labels,
        config.batch_size,
        config.seed,
        max_shift=config.max_shift,
        batches_per_step=batches_per_step,
        epoch=epoch_counter.epoch,
    )
    return train_data, evaluation_dataset(splits.validation_images, splits.validation_labels)


def _durability_callbacks(durability: Durability | None, config: TrainingConfig, best, timer, stopping):
    """The callbacks that restore a checkpoint and save each epoch's, and the durability's own,
    which come after every other: an epoch that another callback ends (a pruned trial) is not
    recorded."""
    if durability is None:
        return [], []
    keeping, resume = [], durability.resume
    if resume is not None:
        keeping.append(RestoreCheckpoint(resume, best, timer, stopping))
    if config.checkpoint:
        earlier = resume.state if resume is not None else None
        keeping.append(EpochCheckpoint(durability.folder, best, timer, stopping, durability.on_saved, earlier))
    return keeping, list(durability.callbacks)


def _whole_history(trained: dict, resume) -> dict[str, list[float]]:
    """The fit's per-epoch history, after the checkpoint's own when the fit was resumed."""
    trained = {name: [float(value) for value in values] for name, values in trained.items()}
    if resume is None:
        return trained
    earlier = resume.state["history"]
    return {name: [*earlier.get(name, []), *trained.get(name, [])] for name in earlier}


def _test_probabilities(model: keras.Model, splits: Splits) -> np.ndarray:
    """One pass over the test split: the loss and accuracy follow from the probabilities. A
    model trained in bfloat16 is saved computing in float32, so that is the one tested."""
    tested_model = with_standard_layers(model) if computes_in_bfloat16(model) else model
    with lifecycle.stops_at_boundaries():
        test_data = evaluation_dataset(splits.test_images, splits.test_labels)
        return tested_model.predict(test_data, verbose=0, callbacks=[StopAtStepBoundary()])


def train_and_evaluate(
    model: keras.Model,
    splits: Splits,
    config: TrainingConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 2,
    durability: Durability | None = None,
) -> TrainingResult:
    """Fits a compiled model as ``config`` says, restores its best-``val_accuracy`` weights and
    evaluates on test.

    The test split is used exactly once, on the selected model. ``config.max_shift`` moves every
    training image by up to that many pixels each time it is drawn (augmentation).
    A MultiStepSequential takes several batches per step where that is faster
    (``batches_per_step_for``); the training itself is the same.

    With ``durability`` (see :mod:`mnist_mlflow.checkpointing`), every finished epoch is saved
    when ``config.checkpoint`` says so, and a fit handed a checkpoint goes on after its epoch
    and ends with the same weights, bit for bit, as the fit left alone would have (on the same
    machine and software). A stop asked for during the fit (SIGTERM, say) takes effect at the
    next step boundary, never inside TensorFlow (:class:`StopAtStepBoundary`).
    """
    timer = EpochTimer()
    best = RestoreBestWeights("val_accuracy")
    epoch_counter = SetEpoch()
    train_data, validation_data = _fit_datasets(model, splits, config, epoch_counter)
    # Keras's own early stopping; the best epoch's weights are restored by RestoreBestWeights.
    stopping = (
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience)
        if config.patience
        else None
    )
    resume = durability.resume if durability is not None else None
    ours = [StopAtStepBoundary(), epoch_counter, StopOnNonFiniteLoss(), timer, best, *([stopping] if stopping else [])]
    keeping, after = _durability_callbacks(durability, config, best, timer, stopping)
    start = time.perf_counter()
    with lifecycle.stops_at_boundaries():
        # The data set shuffles each epoch in an order of its own (SetEpoch).
        history = model.fit(
            train_data,
            epochs=config.epochs,
            validation_data=validation_data,
            shuffle=False,
            callbacks=[*ours, *keeping, *callbacks, *after],
            verbose=verbose,
        )
    train_time_s = time.perf_counter() - start

    test_probabilities = _test_probabilities(model, splits)
    test_loss, test_accuracy = loss_and_accuracy(splits.test_labels, test_probabilities)
    return TrainingResult(
        history=_whole_history(history.history, resume),
        epoch_times=list(timer.epoch_times),
        best_epoch=best.best_epoch,
        train_time_s=train_time_s,
        examples_per_s=len(splits.train_labels) * len(history.history.get("loss", [])) / train_time_s,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_probabilities=test_probabilities,
    )
