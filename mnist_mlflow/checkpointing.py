"""The checkpoint of a fit: what one finished epoch leaves behind so that the fit can go on later.

This module alone knows the checkpoint's format. A checkpoint is a folder of files:

- ``latest.weights.h5``: the weights and the optimizer's state (Keras's ``save_weights``);
- ``seed_states.npz``: the states of the model's random generators (a Dropout layer's);
- ``best-<epoch>.weights.h5``: the best epoch's weights, once the best is no longer the latest;
- ``state.json``: the epoch, the history so far, the best value and epoch, the early stopping
  state and the epoch times;
- ``manifest.json``: the SHA-256 digest of each of the others. A checkpoint is used only when
  every file matches it (:meth:`Checkpoint.read`).

It knows nothing of MLflow: :class:`Durability` is what the fit is handed by whoever keeps the
checkpoints somewhere safer (``mnist_mlflow.tracking.session``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from mnist_mlflow.data import file_sha256

# The files of a checkpoint folder (see EpochCheckpoint).
CHECKPOINT_WEIGHTS = "latest.weights.h5"
CHECKPOINT_SEED_STATES = "seed_states.npz"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_MANIFEST = "manifest.json"


class CheckpointDamaged(ValueError):
    """A checkpoint's files are missing, or do not match its manifest."""


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
        # Digests of files written earlier (the best epoch's file is written once).
        self._digests: dict[str, str] = dict(resumed.get("digests", {}))

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
        self._write_manifest(epoch, files)
        self.on_saved(self.folder, epoch, [*files, CHECKPOINT_MANIFEST])

    def _write_manifest(self, epoch: int, files: list[str]) -> None:
        """Writes the digests of this epoch's files, and of the best epoch's file it names."""
        named = [*files, self.best_file] if self.best_file and self.best_file not in files else files
        for name in named:
            if name in files or name not in self._digests:
                self._digests[name] = file_sha256(self.folder / name)
        manifest = {"epoch": epoch, "sha256": {name: self._digests[name] for name in named}}
        (self.folder / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder written by :class:`EpochCheckpoint`, read back and verified."""

    folder: Path
    state: dict
    digests: dict = field(default_factory=dict)

    @staticmethod
    def manifest_of(folder: str | Path) -> dict[str, str]:
        """The files a checkpoint folder's manifest names, with their digests."""
        try:
            manifest = json.loads((Path(folder) / CHECKPOINT_MANIFEST).read_text())
            digests = manifest["sha256"]
            if not isinstance(digests, dict) or not all(isinstance(value, str) for value in digests.values()):
                raise TypeError("its digests are not text")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointDamaged(f"its manifest cannot be read ({error})") from None
        return digests

    @classmethod
    def read(cls, folder: str | Path) -> Checkpoint:
        """The checkpoint in ``folder``; raises :class:`CheckpointDamaged` unless every file
        its manifest names is there and matches its digest."""
        folder = Path(folder)
        digests = cls.manifest_of(folder)
        for name, expected in digests.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointDamaged(f"{name} is missing")
            if file_sha256(path) != expected:
                raise CheckpointDamaged(f"{name} does not match its SHA-256 digest")
        try:
            state = json.loads((folder / CHECKPOINT_STATE).read_text())
            int(state["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointDamaged(f"{CHECKPOINT_STATE} cannot be read ({error})") from None
        return cls(folder, {**state, "digests": digests}, digests)

    @property
    def epoch(self) -> int:
        """The last finished epoch (0-based)."""
        return int(self.state["epoch"])

    def files(self) -> list[str]:
        """The files this checkpoint is made of, its manifest included."""
        return [*self.digests, CHECKPOINT_MANIFEST]


@dataclass
class Durability:
    """What a fit is handed by whatever keeps it alive: where each finished epoch's checkpoint
    is written, who is told of it (``on_saved(folder, epoch, files)``), the checkpoint to go on
    from, and Keras callbacks of its own (say, the metrics of each epoch, once each)."""

    folder: Path
    on_saved: Callable[[Path, int, list[str]], None]
    resume: Checkpoint | None = None
    callbacks: Sequence = ()


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
