"""Fitting and evaluating a compiled Keras model. This module knows nothing about MLflow.

``train_and_evaluate`` returns its metrics; whoever calls it decides what to record. Extra
Keras callbacks (such as a tracker's) can be passed in.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

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


# The files of a checkpoint folder (see EpochCheckpoint).
CHECKPOINT_WEIGHTS = "latest.weights.h5"
CHECKPOINT_SEED_STATES = "seed_states.npz"
CHECKPOINT_STATE = "state.json"


def best_weights_file(epoch: int) -> str:
    """The file of the best epoch's weights: named by its epoch, so it is never rewritten."""
    return f"best-{epoch:04d}.weights.h5"


def _seed_state_variables(model: keras.Model) -> list:
    """The states of the model's random-number generators (a Dropout layer's, say).

    Keras's ``save_weights`` keeps the layers' weights and the optimizer's state, but not these,
    and the next epoch's dropout masks depend on them.
    """
    return [variable for variable in model.variables if "seed_generator_state" in variable.path]


class EpochCheckpoint(keras.callbacks.Callback):
    """After every finished epoch, writes to ``folder`` everything resuming needs, then calls
    ``on_saved(folder, epoch, files)`` with the files of this epoch's checkpoint, which keeps
    them somewhere safer (with the run).

    What is written: the weights and the optimizer's state (Keras's ``save_weights``); the
    states of the model's random generators; the best epoch's weights, in a file of their own
    when the epoch is a new best and is not the latest (then the latest weights are the
    best); and, as JSON, the epoch, the history so far, the best value, epoch and file, the
    early stopping state and the epoch times. The order of the next epoch's batches and shifts
    follows from the epoch number (see :func:`mnist_mlflow.data.training_dataset`).

    Keras's ``BackupAndRestore`` does the first part on the local disk only; this keeps the
    rest too, which a result identical to the uninterrupted run needs.
    """

    def __init__(self, folder: Path, best, timer, early_stopping, on_saved, resumed: dict | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.best = best
        self.timer = timer
        self.early_stopping = early_stopping
        self.on_saved = on_saved
        resumed = resumed or {}
        self.history: dict[str, list[float]] = {
            name: list(values) for name, values in resumed.get("history", {}).items()
        }
        # The best epoch's own file, once the best is no longer the latest epoch.
        self.best_file: str | None = resumed.get("best_file")

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        self.folder.mkdir(parents=True, exist_ok=True)
        files = [CHECKPOINT_WEIGHTS, CHECKPOINT_STATE]
        if self.best.best_epoch != epoch and self.best_file is None:
            # The best epoch was the previous one: its weights (kept in memory) get a file.
            self.best_file = best_weights_file(self.best.best_epoch)
            current = self.model.get_weights()
            self.model.set_weights(self.best._best_weights)
            self.model.save_weights(self.folder / self.best_file, overwrite=True)
            self.model.set_weights(current)
            files.append(self.best_file)
        elif self.best.best_epoch == epoch:
            self.best_file = None
        self.model.save_weights(self.folder / CHECKPOINT_WEIGHTS, overwrite=True)
        seeds = _seed_state_variables(self.model)
        if seeds:
            np.savez(self.folder / CHECKPOINT_SEED_STATES, *[np.asarray(variable.numpy()) for variable in seeds])
            files.append(CHECKPOINT_SEED_STATES)
        stopping = self.early_stopping
        state = {
            "epoch": epoch,
            "history": self.history,
            "epoch_times": self.timer.epoch_times,
            "epoch_cpu_times": self.timer.epoch_cpu_times,
            "best_value": self.best.best_value,
            "best_epoch": self.best.best_epoch,
            # None: the latest weights are the best.
            "best_file": self.best_file,
            "early_stopping": None
            if stopping is None
            else {"wait": stopping.wait, "best": float(stopping.best), "best_epoch": stopping.best_epoch},
            "stopped": bool(self.model.stop_training),
        }
        (self.folder / CHECKPOINT_STATE).write_text(json.dumps(state))
        self.on_saved(self.folder, epoch, files)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder written by :class:`EpochCheckpoint`, read back."""

    folder: Path
    state: dict

    @classmethod
    def read(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        return cls(folder, json.loads((folder / CHECKPOINT_STATE).read_text()))

    @property
    def epoch(self) -> int:
        """The last finished epoch (0-based)."""
        return int(self.state["epoch"])

    def files(self) -> list[str]:
        """The files this checkpoint is made of."""
        names = [CHECKPOINT_WEIGHTS, CHECKPOINT_STATE, CHECKPOINT_SEED_STATES, self.state.get("best_file")]
        return [name for name in names if name and (self.folder / name).exists()]


class RestoreCheckpoint(keras.callbacks.Callback):
    """Puts a checkpoint back when training begins, so that ``fit`` goes on at the next epoch.

    It does what Keras's ``BackupAndRestore`` does (builds the optimizer, loads the weights and
    sets the model's initial epoch, so that ``fit``'s own ``initial_epoch``, which MLflow's
    autolog records as a parameter, stays 0), and puts back what that leaves out: the random
    generators' states, the best weights and value, the early stopping state and the epoch times.
    """

    def __init__(self, checkpoint: Checkpoint, best, timer, early_stopping) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.best = best
        self.timer = timer
        self.early_stopping = early_stopping

    def on_train_begin(self, logs=None):
        model, folder, state = self.model, self.checkpoint.folder, self.checkpoint.state
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        if state.get("best_file"):
            model.load_weights(folder / state["best_file"])
            self.best._best_weights = model.get_weights()
        model.load_weights(folder / CHECKPOINT_WEIGHTS)
        if not state.get("best_file"):
            self.best._best_weights = model.get_weights()
        if (folder / CHECKPOINT_SEED_STATES).exists():
            with np.load(folder / CHECKPOINT_SEED_STATES) as saved:
                for variable, index in zip(_seed_state_variables(model), range(len(saved.files))):
                    variable.assign(saved[f"arr_{index}"])
        self.best.best_value, self.best.best_epoch = float(state["best_value"]), int(state["best_epoch"])
        self.timer.epoch_times[:] = state["epoch_times"]
        self.timer.epoch_cpu_times[:] = state["epoch_cpu_times"]
        if self.early_stopping is not None and state["early_stopping"]:
            saved = state["early_stopping"]
            self.early_stopping.wait = saved["wait"]
            self.early_stopping.best = saved["best"]
            self.early_stopping.best_epoch = saved["best_epoch"]
        # A run whose early stopping had already ended it trains no further epoch.
        model._initial_epoch = self.params["epochs"] if state["stopped"] else self.checkpoint.epoch + 1


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


def train_and_evaluate(
    model: keras.Model,
    splits: Splits,
    config: TrainingConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 2,
    checkpoint_folder: Path | None = None,
    on_checkpoint: Callable[[Path, int, list[str]], None] | None = None,
    resume: Checkpoint | None = None,
) -> TrainingResult:
    """Fits a compiled model as ``config`` says, restores its best-``val_accuracy`` weights and
    evaluates on test.

    The test split is used exactly once, on the selected model. ``config.max_shift`` moves every
    training image by up to that many pixels each time it is drawn (augmentation).
    A MultiStepSequential takes several batches per step where that is faster
    (``batches_per_step_for``); the training itself is the same.

    With ``checkpoint_folder`` (and ``config.checkpoint``), every finished epoch is saved there
    and handed to ``on_checkpoint``. With ``resume``, training goes on after that checkpoint's
    epoch and ends with the same weights, bit for bit, as the run left alone would have (on
    the same machine and software).
    """
    batch_size, epochs, seed, max_shift = config.batch_size, config.epochs, config.seed, config.max_shift
    timer = EpochTimer()
    best = RestoreBestWeights("val_accuracy")
    batches_per_step = batches_per_step_for(model, len(splits.train_labels), batch_size)
    if isinstance(model, MultiStepSequential):
        model.step_batch_size = batch_size if batches_per_step > 1 else None
    epoch_counter = SetEpoch()
    train_data = training_dataset(
        splits.train_images,
        splits.train_labels,
        batch_size,
        seed,
        max_shift=max_shift,
        batches_per_step=batches_per_step,
        epoch=epoch_counter.epoch,
    )
    validation_data = evaluation_dataset(splits.validation_images, splits.validation_labels)

    # Keras's own early stopping; the best epoch's weights are restored by RestoreBestWeights.
    stopping = (
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience)
        if config.patience
        else None
    )
    early_stopping = [stopping] if stopping else []
    keeping = []
    if resume is not None:
        keeping.append(RestoreCheckpoint(resume, best, timer, stopping))
    if checkpoint_folder is not None and config.checkpoint:
        earlier = resume.state if resume is not None else None
        keeping.append(EpochCheckpoint(checkpoint_folder, best, timer, stopping, on_checkpoint, earlier))
    start = time.perf_counter()
    history = model.fit(
        train_data,
        epochs=epochs,
        validation_data=validation_data,
        # The data set shuffles each epoch in an order of its own (SetEpoch).
        shuffle=False,
        # Keras takes the batches as the data set makes them and ignores this. MLflow's autolog
        # records it as the run's batch_size: without it, autolog would record batch_size=None,
        # clash with the entry point's batch_size parameter and log nothing at all.
        batch_size=batch_size,
        callbacks=[epoch_counter, StopOnNonFiniteLoss(), timer, best, *early_stopping, *keeping, *callbacks],
        verbose=verbose,
    )
    train_time_s = time.perf_counter() - start

    # One pass over the test split: the loss and accuracy follow from the probabilities. A
    # model trained in bfloat16 is saved computing in float32, so that is the one tested.
    tested_model = with_standard_layers(model) if computes_in_bfloat16(model) else model
    test_probabilities = tested_model.predict(evaluation_dataset(splits.test_images, splits.test_labels), verbose=0)
    test_loss, test_accuracy = loss_and_accuracy(splits.test_labels, test_probabilities)
    trained = {name: [float(value) for value in values] for name, values in history.history.items()}
    if resume is not None:
        trained = {
            name: [*resume.state["history"].get(name, []), *trained.get(name, [])] for name in resume.state["history"]
        }
    return TrainingResult(
        history=trained,
        epoch_times=list(timer.epoch_times),
        best_epoch=best.best_epoch,
        train_time_s=train_time_s,
        examples_per_s=len(splits.train_labels) * len(history.history.get("loss", [])) / train_time_s,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_probabilities=test_probabilities,
    )
