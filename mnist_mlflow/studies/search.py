"""Hyperparameter search with Optuna: one parent MLflow run, one child run per trial, many workers.

Optuna samples (grid, random or TPE), prunes (median rule on each epoch's validation accuracy)
and stores the study (sqlite, or PostgreSQL for many machines). This module adds what a search
needs on top of that to lose no work and to be read in the MLflow UI:

- The study's parent run is created once, by the worker that creates the Optuna study, and
  its id is stored in the study (``user_attrs``), so every worker and every resumed session
  puts its trials under the same parent. Each trial is a complete ``dense`` run, started with
  that parent passed explicitly.
- Optuna's heartbeat finds trials whose worker died. Such a trial is failed in Optuna, its
  child run is marked KILLED, and its parameters are queued again (RetryHeartbeatStaleTrialCallback).
  A trial cut off by Ctrl-C is failed by Optuna and its run ends FAILED; the next session
  queues it again. Grid points and trials already finished are never trained again.
- ``n_trials`` caps the total over all workers. Trial numbers are handed out by the storage
  in one order for all workers, so a trial that finds the cap reached (or, for a grid or a
  retried trial, its parameters already finished or running in a lower-numbered trial) is
  recorded as surplus without training.
- Each worker waits until no trial of the study is running anywhere before it returns, then
  logs the summary on the parent: a table of all trials, the best trial (by validation
  accuracy; its test accuracy reported), a heat map (grid) or best-so-far and
  parameter-importance plots (random, TPE), and the exact best-of-N analysis. The best
  trial's model is registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_mlflow import data, experiments, plots, tracking
from mnist_mlflow.config import (
    DataConfig,
    DenseModelConfig,
    DenseRunConfig,
    TrainingConfig,
    TrainingDivergedError,
    UserInputError,
    parse_int,
)
from mnist_mlflow.redaction import redact_url, server_identity
from mnist_mlflow.studies import best_of_n, engine, study_storage, summaries
from mnist_mlflow.studies.protocol import ChildSpec, Registration, StudySummary
from mnist_mlflow.studies.search_spaces import SearchConfig, SearchSpace

# Optuna's heartbeat: a running trial writes one every HEARTBEAT_INTERVAL_S seconds, and one
# silent for GRACE_PERIOD_S seconds is taken for dead. Both can be set in the environment
# (HEARTBEAT_ENV, GRACE_ENV): the tests shorten them, and a cluster whose workers can stall
# for longer may lengthen the grace.
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 20
HEARTBEAT_ENV = "MNIST_MLFLOW_HEARTBEAT_INTERVAL_S"
GRACE_ENV = "MNIST_MLFLOW_HEARTBEAT_GRACE_S"
# A trial whose worker died is queued again at most this many times.
MAX_RETRIES = 2
# Median pruning: judge no trial before 5 have finished, and none before its third epoch.
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 2
BEST_OF_N = (1, 5, 10, 20, 50, 100)
# docs/experiments.md section 4: the reference's expected best accuracy, from re-running the search.
REFERENCE_BEST_OF_N = {10: 0.975, 20: 0.980, 50: 0.982, 100: 0.981}

# Heartbeats, stale-trial detection and retries are "experimental" in Optuna; say so once, here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
TRACKING_ATTR = "mlflow_tracking_uri"
SURPLUS_ATTR = "surplus"
# A worker creates the parent run before the study, and records it in the study a moment
# after creating it; a worker that finds a study without one waits this long, then takes
# the study for orphaned (its creator stopped in between) and gives it a parent itself.
PARENT_WAIT_S = 5
DIVERGED_ATTR = "diverged"


class SurplusTrial(Exception):
    """A trial that must not train: the cap is reached, or its parameters are taken already."""


def heartbeat_settings() -> tuple[int, int]:
    """The heartbeat interval and the grace period, in seconds, from the environment or the defaults.

    The grace must be at least twice the interval, so that one late heartbeat of a living
    worker does not get its trial taken for dead.
    """
    interval = parse_int(HEARTBEAT_ENV, os.environ.get(HEARTBEAT_ENV, HEARTBEAT_INTERVAL_S), minimum=1)
    grace = parse_int(GRACE_ENV, os.environ.get(GRACE_ENV, GRACE_PERIOD_S), minimum=1)
    if grace < 2 * interval:
        raise UserInputError(f"{GRACE_ENV}={grace} must be at least twice {HEARTBEAT_ENV}={interval}")
    return interval, grace


def open_storage(url: str):
    """Opens the Optuna storage with heartbeats on and the stale-trial callback of this module."""
    interval, grace = heartbeat_settings()
    return study_storage.open_storage(url, interval, grace, _on_stale_trial)


def make_sampler(name: str, space: SearchSpace, seed: int):
    """Optuna's grid, random or TPE sampler. Random and TPE draw trial k from a generator seeded
    with (seed, k), so a trial's parameters do not depend on which worker runs it or when."""
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return TrialSeededSampler(seed, lambda trial_seed: optuna.samplers.RandomSampler(seed=trial_seed))
    return TrialSeededSampler(seed, lambda trial_seed: optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=10))


def _trial_seed(seed: int, trial_number: int) -> int:
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler whose draws for trial k come from a sampler seeded with (seed, k).

    Optuna's samplers draw from one generator per process, so which values trial k gets would
    depend on which worker runs it and what that worker drew before. This wrapper makes a fresh
    sampler (random or TPE, through ``make``) for each trial, seeded from the trial's number,
    and hands it every call. TPE keeps no state of its own between trials: it reads the
    finished trials from the study. Only Optuna's public sampler interface is used.
    """

    def __init__(self, seed: int, make: Callable[[int], optuna.samplers.BaseSampler]) -> None:
        self.base_seed = seed
        self._make = make
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = self._make(_trial_seed(self.base_seed, trial.number))
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        sampler = self._samplers.pop(trial.number, None)
        if sampler is not None:
            sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to reseed: every trial's sampler is seeded from its number."""


def make_pruner(name: str):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)
    return optuna.pruners.NopPruner()


class EpochReporter(keras.callbacks.Callback):
    """Reports each epoch's validation accuracy to the Optuna trial and stops training when the pruner says so.

    A pruned trial is not an error: its run still evaluates and logs the best epoch it reached.
    """

    def __init__(self, trial, prune: bool) -> None:
        super().__init__()
        self.trial = trial
        self.prune = prune
        self.pruned_at_epoch: int | None = None
        self.epochs_reported = 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is None:
            return
        self.trial.report(float(value), epoch)
        self.epochs_reported += 1
        if self.prune and self.trial.should_prune():
            self.pruned_at_epoch = epoch
            self.model.stop_training = True


def trial_config(values: dict[str, Any], config: SearchConfig) -> DenseRunConfig:
    """The ``dense`` run of one trial: Dense(units, activation) -> Dropout -> Dense(10), Adam."""
    return DenseRunConfig(
        model=DenseModelConfig(
            hidden_units=(int(values["units"]),),
            activations=(str(values["activation"]),),
            dropout_rate=float(values["dropout"]),
        ),
        training=TrainingConfig(
            optimizer="adam",
            learning_rate=float(values["learning_rate"]),
            batch_size=int(values["batch_size"]),
            epochs=config.epochs,
            seed=config.seed,
        ),
        data=DataConfig(seed=config.seed, max_train_examples=config.max_train_examples),
    )


def _settings(config: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    """What must be equal for two workers (or sessions) to share a study."""
    return {
        "space": space.describe(),
        "sampler": config.resolved_sampler(),
        "epochs": config.epochs,
        "pruner": config.pruner,
        "max_train_examples": config.max_train_examples,
        "seed": config.seed,
    }


def _study_description(config: SearchConfig, space: SearchSpace) -> str:
    varied = "; ".join(
        f"{name} in {list(choices)}"
        if isinstance(choices, tuple)
        else f"{name} in [{choices.low:g}, {choices.high:g}]"
        + (" (log)" if not isinstance(choices, tuple) and choices.log else "")
        for name, choices in space.parameters.items()
    )
    fixed = ", ".join(f"{name}={value}" for name, value in space.all_fixed().items())
    return (
        f"Hyperparameter search {config.resolved_study_name()} ({config.resolved_sampler()} sampler, "
        f"{config.pruner} pruner, at most {config.resolved_n_trials()} trials over all workers). "
        f"Model: Dense(units, activation) -> Dropout -> Dense(10, softmax), Adam, {config.epochs} epochs, "
        f"best epoch by validation accuracy. Varies: {varied}. Repeats: nothing (one run per trial). "
        f"Holds fixed: {fixed}, seed={config.seed} (split and initial weights), "
        f"max_train_examples={config.max_train_examples or 'all'}. Each child run is one trial."
    )


def _open_study(config: SearchConfig, space: SearchSpace, storage):
    """Creates the study and its parent run, or joins them; refuses a study started with other settings.

    The parent run exists before anything is written to the study storage, so a worker that
    fails (say, with wrong credentials) leaves no study behind without a parent.
    """
    study_name = config.resolved_study_name()
    sampler = make_sampler(config.resolved_sampler(), space, config.seed)
    pruner = make_pruner(config.pruner)
    settings = _settings(config, space)
    tracking_uri = tracking.tracking_uri_shown()
    launcher_run_id = tracking.claim_launcher_run()
    run_params = {
        **config.as_params(),
        "sampler": config.resolved_sampler(),
        "n_trials": config.resolved_n_trials(),
        "study_name": study_name,
        "storage": redact_url(config.resolved_storage()),
        "space": space.name,
        "space_source": space.source,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def new_parent() -> tracking.StudyParent:
        return tracking.create_study_parent(
            tracking.SEARCH_KIND,
            study_name,
            study_name,
            run_params,
            fingerprint,
            _study_description(config, space),
            launcher_run_id,
            texts={"search/space.json": json.dumps(space.describe(), indent=2)},
        )

    def record_parent(study, parent: tracking.StudyParent) -> None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        study.set_user_attr(TRACKING_ATTR, tracking_uri)
        # Written last: a joining worker waits for it, and then finds the other two in place.
        study.set_user_attr(PARENT_ATTR, parent.run_id)

    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        parent = new_parent()
        try:
            study = optuna.create_study(
                storage=storage, study_name=study_name, direction="maximize", sampler=sampler, pruner=pruner
            )
        except optuna.exceptions.DuplicatedStudyError:
            # Another worker created the study a moment ago; join it instead.
            tracking.discard_study_parent(parent)
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        else:
            record_parent(study, parent)
            return study, parent

    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserInputError(
            f"study_name={study_name!r} is an Optuna study that minimises; it is not one of this project's searches"
        )
    attrs = _wait_for_attrs(study)
    existing = attrs.get(SETTINGS_ATTR)
    if existing is not None and existing != settings:
        differing = sorted(key for key in set(existing) | set(settings) if existing.get(key) != settings.get(key))
        raise UserInputError(
            f"study_name={study_name!r} was started with other settings ({', '.join(differing)} differ: "
            f"{ {key: existing.get(key) for key in differing} }); rerun with its settings or choose another study_name"
        )
    recorded_server = attrs.get(TRACKING_ATTR)
    # Servers are compared by scheme, host, port and path: two workers may log in differently.
    if recorded_server and server_identity(recorded_server) != server_identity(tracking_uri):
        raise UserInputError(
            f"study_name={study_name!r} records its runs at {redact_url(recorded_server)}, but this worker's "
            f"tracking URI is {tracking_uri}; point MLFLOW_TRACKING_URI at the study's server"
        )
    if PARENT_ATTR in attrs:
        return study, tracking.attach_study_parent(
            tracking.SEARCH_KIND, study_name, attrs[PARENT_ATTR], launcher_run_id
        )
    print(
        f"Study {study_name} has no parent run recorded (its creator stopped before recording it); creating one",
        flush=True,
    )
    parent = new_parent()
    record_parent(study, parent)
    return study, parent


def _wait_for_attrs(study) -> dict[str, Any]:
    """The study's user attributes once its creator has recorded the parent run (or after a short wait)."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while True:
        attrs = dict(study.user_attrs)
        if PARENT_ATTR in attrs or time.monotonic() > deadline:
            return attrs
        time.sleep(0.2)


def _on_stale_trial(study, trial) -> None:
    """Called by Optuna when a trial's heartbeat stopped: close its run and queue it again."""
    print(
        f"Trial {trial.number}: its worker stopped sending heartbeats; the trial is failed and queued again", flush=True
    )
    parent_run_id = study.user_attrs.get(PARENT_ATTR)
    if parent_run_id:
        for record in tracking.study_children_of(parent_run_id):
            # On the dead worker's own host, reconciliation may have closed the run already.
            if record.key == _trial_key(trial.number) and record.status == "RUNNING":
                tracking.mark_run_killed(
                    record.run_id, f"Optuna trial {trial.number} stopped sending heartbeats (its worker died)"
                )
                print(f"Trial {trial.number}: run {record.run_id} marked KILLED", flush=True)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def _retry_of(trial) -> int | None:
    """The number of the failed trial that a trial (live or finished) retries, if any.

    A live ``optuna.Trial`` has no public view of its system attributes; the study's list of
    trials holds it as a ``FrozenTrial``, which Optuna's retry callback can read.
    """
    if not isinstance(trial, optuna.trial.FrozenTrial):
        trial = next(frozen for frozen in trial.study.get_trials(deepcopy=False) if frozen.number == trial.number)
    return optuna.storages.RetryFailedTrialCallback.retried_trial_number(trial)


def _trial_key(number: int) -> str:
    return f"trial={number}"


def _is_surplus(trial) -> bool:
    return bool(trial.user_attrs.get(SURPLUS_ATTR))


def _budget_states():
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _check_not_surplus(
    study, trial, values: dict[str, Any], n_trials: int, space: SearchSpace, sampler: str, retried: bool
) -> None:
    """Raises SurplusTrial when the cap is reached by lower-numbered trials, or when a grid point or
    a retried trial's parameters already finished or run in a lower-numbered trial."""
    others = [
        other for other in study.get_trials(deepcopy=False) if other.number != trial.number and not _is_surplus(other)
    ]
    earlier_in_budget = [other for other in others if other.number < trial.number and other.state in _budget_states()]
    if len(earlier_in_budget) >= n_trials:
        raise SurplusTrial(f"the cap of n_trials={n_trials} is reached by lower-numbered trials")
    if sampler == "grid" or retried:
        varied = {name: values[name] for name in space.parameters}
        for other in others:
            taken = other.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                other.state == TrialState.RUNNING and other.number < trial.number
            )
            if taken and other.params == varied:
                raise SurplusTrial(f"its parameters are those of trial {other.number} ({other.state.name})")


def _objective(config: SearchConfig, space: SearchSpace, parent_run_id: str, n_trials: int, counter: list[int]):
    study_name = config.resolved_study_name()
    sampler = config.resolved_sampler()
    worker = f"{platform.node()}:{os.getpid()}"

    def objective(trial) -> float:
        values = space.suggest(trial)
        retry_of = _retry_of(trial)
        try:
            _check_not_surplus(trial.study, trial, values, n_trials, space, sampler, retried=retry_of is not None)
        except SurplusTrial as reason:
            trial.set_user_attr(SURPLUS_ATTR, str(reason))
            trial.study.stop()
            raise
        trial.set_user_attr("worker", worker)
        earlier = _finished_twin(trial, space) if sampler != "grid" else None
        if earlier is not None:
            # Random and TPE draw with replacement; with the same seed, training again gives
            # the same model, so the earlier trial's result is reused, not recomputed.
            print(
                f"Trial {trial.number}: same parameters as finished trial {earlier.number}; its result is reused",
                flush=True,
            )
            for name in REUSED_ATTRS:
                if name in earlier.user_attrs:
                    trial.set_user_attr(name, earlier.user_attrs[name])
            trial.set_user_attr("same_as_trial", earlier.number)
            return earlier.value
        run_config = trial_config(values, config)
        varied = ", ".join(f"{name}={values[name]}" for name in space.parameters)
        note = f" (retry of trial {retry_of})" if retry_of is not None else ""
        print(f"Trial {trial.number}{note}: training {varied}", flush=True)
        reporter = EpochReporter(trial, prune=config.pruner != "none")
        child = ChildSpec(
            key=_trial_key(trial.number),
            run_name=f"trial-{trial.number:03d}-{experiments.dense_run_name(run_config)}",
            config=run_config,
            tags={
                "optuna_study": study_name,
                "optuna_trial_number": str(trial.number),
                "worker_host": platform.node(),
                "worker": worker,
                **({"retry_of_trial": str(retry_of)} if retry_of is not None else {}),
            },
            params={
                "trial_number": trial.number,
                "sampler": sampler,
                "pruner": config.pruner,
                "search_space": space.name,
            },
            description=f"Trial {trial.number} of search {study_name}{note}: {varied}.",
        )
        try:
            result = engine.train_child(tracking.SEARCH_KIND, study_name, parent_run_id, child, callbacks=[reporter])
        except TrainingDivergedError as error:
            # Recorded as a failed trial and never queued again: the same parameters and seed
            # would diverge the same way.
            trial.set_user_attr(DIVERGED_ATTR, str(error))
            print(f"Trial {trial.number}: FAILED: {error}", flush=True)
            # Optuna records a trial whose objective is NaN as failed, without a traceback.
            return float("nan")
        counter[0] += 1
        metrics = result.metrics
        for name, value in {
            "mlflow_run_id": result.run_id,
            "model_uri": result.model_uri,
            "best_val_accuracy": metrics["best_val_accuracy"],
            "test_accuracy": metrics["test_accuracy"],
            "best_epoch": int(metrics["best_epoch"]),
            "epochs_trained": reporter.epochs_reported,
            "train_time_s": metrics["train_time_s"],
        }.items():
            trial.set_user_attr(name, value)
        state_tags = {"optuna_trial_state": "PRUNED" if reporter.pruned_at_epoch is not None else "COMPLETE"}
        if reporter.pruned_at_epoch is not None:
            state_tags["pruned_after_epoch"] = str(reporter.pruned_at_epoch + 1)
        tracking.set_run_tags(result.run_id, state_tags)
        if reporter.pruned_at_epoch is not None:
            raise optuna.TrialPruned(f"below the median after epoch {reporter.pruned_at_epoch + 1}")
        return metrics["best_val_accuracy"]

    return objective


# What a trial with the parameters of an earlier finished trial takes over from it (not its
# epochs or time: it trained nothing).
REUSED_ATTRS = ("mlflow_run_id", "model_uri", "best_val_accuracy", "test_accuracy", "best_epoch")


def _finished_twin(trial, space: SearchSpace):
    """The earliest COMPLETE trial with exactly this trial's varied parameters, if any."""
    varied = {name: trial.params[name] for name in space.parameters}
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == varied and "same_as_trial" not in other.user_attrs:
            return other
    return None


def _retry_failed(study) -> None:
    """Queues again every failed trial (cut off by Ctrl-C or a crash) that has no retry yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {_retry_of(trial) for trial in trials}
    covered = [trial.params for trial in trials if trial.state != TrialState.FAIL]
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for trial in trials:
        if trial.state != TrialState.FAIL or _is_surplus(trial) or trial.number in retried or not trial.params:
            continue
        if DIVERGED_ATTR in trial.user_attrs:
            continue
        if trial.params in covered:
            continue
        print(f"Trial {trial.number} ({trial.params}) did not finish in an earlier session; queued again", flush=True)
        callback(study, trial)
        covered.append(trial.params)


def _work_left(study, n_trials: int, grid_size: int | None) -> bool:
    """Whether this worker should start another trial: a queued retry, or room under the cap
    (and, for a grid, a grid point no trial has been given yet)."""
    all_trials = study.get_trials(deepcopy=False)
    trials = [trial for trial in all_trials if not _is_surplus(trial)]
    if any(trial.state == TrialState.WAITING for trial in trials):
        return True
    used = sum(trial.state in _budget_states() for trial in trials)
    if used >= n_trials:
        return False
    if grid_size is not None:
        # The grid sampler gives trial k < grid_size grid point k; later trials only repeat points.
        fresh = [trial for trial in all_trials if _retry_of(trial) is None]
        return len(fresh) < grid_size
    return True


class OptunaStudy:
    """A search as a study of the engine: Optuna supplies the children, one per trial.

    Many workers share one study: the parent run is recorded in the Optuna study, each worker
    trains trials until none is left, and each waits until no trial runs anywhere before it
    summarises, so the last summary covers the whole study.
    """

    kind = tracking.SEARCH_KIND

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self.space = config.search_space()
        self.study_id = config.resolved_study_name()
        self.n_trials = config.resolved_n_trials()
        self.sampler = config.resolved_sampler()
        self.grid_size = self.space.grid_size if self.sampler == "grid" else None
        # Checked before the tracking server is even asked; the waits use the same values.
        self.interval, self.grace = heartbeat_settings()
        self.storage = None
        self.study = None
        self.counter = [0]

    def prepare(self) -> None:
        self.storage = open_storage(self.config.resolved_storage())
        data.load_splits(DataConfig(seed=self.config.seed, max_train_examples=self.config.max_train_examples))

    def open_parent(self) -> tracking.StudyParent:
        self.study, parent = _open_study(self.config, self.space, self.storage)
        return parent

    def start_lines(self, parent: tracking.StudyParent, tracking_uri: str) -> list[str]:
        verb = "Joined" if parent.resumed else "Started"
        return [
            f"{verb} search {self.study_id} ({self.sampler} sampler, "
            f"{self.config.pruner} pruner, at most {self.n_trials} "
            f"trials) in {redact_url(self.config.resolved_storage())}; parent run {parent.run_id} at {tracking_uri}",
            f"More workers, or a resumed session, join it with the same command (study_name={self.study_id}).",
        ]

    def run_children(self, parent: tracking.StudyParent) -> int:
        study = self.study
        objective = _objective(self.config, self.space, parent.run_id, self.n_trials, self.counter)

        def stop_when_done(study, trial) -> None:
            if not _work_left(study, self.n_trials, self.grid_size):
                study.stop()

        while True:
            optuna.storages.fail_stale_trials(study)
            _retry_failed(study)
            if _work_left(study, self.n_trials, self.grid_size):
                study.optimize(objective, callbacks=[stop_when_done], catch=(SurplusTrial,), gc_after_trial=False)
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                break
            print(
                f"Waiting for trial(s) {', '.join(str(trial.number) for trial in running)} running elsewhere "
                f"(a dead worker's trial is failed and queued again after {self.grace} s without heartbeat)",
                flush=True,
            )
            time.sleep(self.interval)
        # Runs left RUNNING by workers that died without a heartbeat check catching them.
        running_keys = {
            _trial_key(trial.number) for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        tracking.close_orphan_children(parent, running_keys=running_keys)
        return self.counter[0]

    def summarise(self, parent: tracking.StudyParent) -> StudySummary:
        return search_summary(self.study, self.config, self.space)

    def on_interrupt(self) -> None:
        # Optuna has failed the trial this worker was running; queue it again at once, so
        # that another worker (or the next session) trains it.
        _retry_failed(self.study)

    def others_running(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def end_line(self, parent: tracking.StudyParent, trained: int) -> str:
        return f"Search {self.study_id}: {trained} trials trained by this worker; parent run {parent.run_id}"


def run_search(config: SearchConfig) -> engine.StudyResult:
    """Runs one worker of the search ``config`` describes until the study is complete; returns its result.

    Checks the tracking server, the storage and the data before any run is created.
    """
    return engine.run_study(OptunaStudy(config))


def trials_table(study, space: SearchSpace) -> pd.DataFrame:
    """One row per trial: number, state, the varied parameters and what the trial recorded."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number):
        attrs = trial.user_attrs
        retry_of = _retry_of(trial)
        state = "SURPLUS" if _is_surplus(trial) else trial.state.name
        row = {"trial": trial.number, "state": state}
        row.update({name: trial.params.get(name) for name in space.parameters})
        row.update(
            {
                "val_accuracy": attrs.get("best_val_accuracy", np.nan),
                "test_accuracy": attrs.get("test_accuracy", np.nan),
                "best_epoch": attrs.get("best_epoch", np.nan),
                "epochs_trained": attrs.get("epochs_trained", len(trial.intermediate_values)),
                "train_time_s": attrs.get("train_time_s", np.nan),
                "worker": attrs.get("worker", ""),
                "retry_of": "" if retry_of is None else retry_of,
                "run_id": attrs.get("mlflow_run_id", ""),
                "note": attrs.get(SURPLUS_ATTR, "")
                or (f"diverged: {attrs[DIVERGED_ATTR]}" if DIVERGED_ATTR in attrs else "")
                or (f"same as trial {attrs['same_as_trial']}" if "same_as_trial" in attrs else ""),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def grid_heatmap(table: pd.DataFrame, space: SearchSpace) -> tuple[str, list, str, list, np.ndarray] | None:
    """Rows, columns and the validation accuracy of each cell of a two-axis grid (NaN where unfinished)."""
    axes = [name for name, choices in space.parameters.items() if isinstance(choices, tuple) and len(choices) > 1]
    if not space.is_grid or len(axes) != 2:
        return None
    row_name, column_name = axes
    rows, columns = list(space.parameters[row_name]), list(space.parameters[column_name])
    matrix = np.full((len(rows), len(columns)), np.nan)
    finished = table[table["state"] == "COMPLETE"]
    for _, trial in finished.iterrows():
        row, column = rows.index(trial[row_name]), columns.index(trial[column_name])
        matrix[row, column] = np.nanmax([matrix[row, column], trial["val_accuracy"]])
    return row_name, rows, column_name, columns, matrix


def search_summary(study, config: SearchConfig, space: SearchSpace) -> StudySummary:
    """The search's summary, from its trials: the table, the best trial, best-of-N, the figures."""
    table = trials_table(study, space)
    summary = StudySummary(
        tables={"search/trials.json": table},
        texts={"search/space.json": json.dumps(space.describe(), indent=2)},
        metrics=_trial_counts(table, config.epochs),
    )
    best = _best_trial(table)
    if best is not None:
        _describe_best(summary, best, study, config, space)
    trained = table[table["state"].isin(["COMPLETE", "PRUNED"])]
    _add_best_of_n(summary, trained, space)
    heatmap = grid_heatmap(table, space)
    if heatmap is not None:
        summary.figures["search/heatmap_val_accuracy.png"] = plots.heatmap_figure(*heatmap)
    if len(trained):
        summary.figures["search/best_so_far.png"] = plots.best_so_far_figure(
            list(trained["trial"]), list(trained["val_accuracy"]), list(trained["state"] == "PRUNED")
        )
    if config.resolved_sampler() != "grid" or heatmap is None:
        try:
            summary.figures["search/parameter_importance.png"] = plots.parameter_importance_figure(study)
        except (ValueError, RuntimeError) as error:
            note = f"no parameter-importance plot: {error}"
            print(f"Search {study.study_name}: {note}", flush=True)
            summary.tags["parameter_importance_note"] = note
    summary.texts["search/trials.md"] = summaries.markdown_table(
        table.drop(columns=["run_id", "note"]), {"val_accuracy": ".2%", "test_accuracy": ".2%", "train_time_s": ".1f"}
    )
    return summary


def _trial_counts(table: pd.DataFrame, epochs: int) -> dict[str, float]:
    """How many trials ended in each state, the epochs trained and saved, the training time."""
    if not len(table):
        return {
            name: 0.0
            for name in (
                "trials_complete",
                "trials_pruned",
                "trials_failed",
                "trials_surplus",
                "trials_reused",
                "epochs_trained",
                "train_time_s",
                "epochs_saved_by_pruning",
            )
        }
    pruned = table[table["state"] == "PRUNED"]
    return {
        "trials_complete": int((table["state"] == "COMPLETE").sum()),
        "trials_pruned": len(pruned),
        "trials_failed": int((table["state"] == "FAIL").sum()),
        "trials_surplus": int((table["state"] == "SURPLUS").sum()),
        "trials_reused": int(table["note"].str.startswith("same as").sum()),
        "epochs_trained": float(table["epochs_trained"].sum()),
        "train_time_s": float(np.nansum(table["train_time_s"])),
        "epochs_saved_by_pruning": float(len(pruned) * epochs - pruned["epochs_trained"].sum()),
    }


def _best_trial(table: pd.DataFrame):
    """The COMPLETE trial with the best validation accuracy; of equals, the earliest. None if none completed."""
    complete = table[table["state"] == "COMPLETE"]
    if not len(complete):
        return None
    return complete.sort_values(["val_accuracy", "trial"], ascending=[False, True]).iloc[0]


def _describe_best(summary: StudySummary, best, study, config: SearchConfig, space: SearchSpace) -> None:
    """The best trial's metrics and tags, the winner, its registration and the line printed about it."""
    best_params = {name: _plain(best[name]) for name in space.parameters}
    summary.metrics.update(
        best_val_accuracy=float(best["val_accuracy"]),
        best_test_accuracy=float(best["test_accuracy"]),
        best_trial_number=float(best["trial"]),
    )
    summary.tags.update(
        best_params=json.dumps(best_params), best_run_id=str(best["run_id"]), best_trial=str(int(best["trial"]))
    )
    summary.tags.update({f"best_{name}": str(value) for name, value in best_params.items()})
    summary.winner_run_id = str(best["run_id"])
    model_uri = study.trials[int(best["trial"])].user_attrs.get("model_uri")
    if config.register_as and model_uri:
        summary.registration = Registration(
            model_uri,
            config.register_as,
            str(best["run_id"]),
            float(best["val_accuracy"]),
            float(best["test_accuracy"]),
        )
    summary.printed = (
        f"Best trial {int(best['trial'])}: val_accuracy "
        f"{best['val_accuracy']:.4f}, test_accuracy {best['test_accuracy']:.4f}, "
        + ", ".join(f"{name}={value}" for name, value in best_params.items())
    )


def _add_best_of_n(summary: StudySummary, trained: pd.DataFrame, space: SearchSpace) -> None:
    """The expected best of N trials drawn from this search: table, metrics and plot.

    The pool is every trial that trained; a pruned one enters with the best accuracy it reached
    (a lower bound of what it would have reached: pruning keeps the figures on the safe side).
    """
    pool = [float(value) for value in trained["val_accuracy"] if np.isfinite(value)]
    rows = best_of_n.best_of_n_table(pool, BEST_OF_N) if pool else []
    if not rows:
        return
    frame = pd.DataFrame(
        {
            "N": [row.n for row in rows],
            "expected_best": [row.expected for row in rows],
            "standard_deviation": [row.standard_deviation for row in rows],
            "p10": [row.low for row in rows],
            "p90": [row.high for row in rows],
            "pool_size": [row.pool_size for row in rows],
        }
    )
    # The reference re-ran the random search of section 4; its figures belong on that space only.
    on_reference_space = space.name == "random"
    if on_reference_space:
        frame["reference"] = [REFERENCE_BEST_OF_N.get(row.n, np.nan) for row in rows]
    summary.tables["search/best_of_n.json"] = frame
    summary.texts["search/best_of_n.md"] = summaries.markdown_table(
        frame, {"expected_best": ".2%", "standard_deviation": ".2%", "p10": ".2%", "p90": ".2%", "reference": ".1%"}
    )
    summary.metrics.update({f"expected_best_at_{row.n}": row.expected for row in rows})
    reference = {n: value for n, value in REFERENCE_BEST_OF_N.items() if n <= len(pool)} if on_reference_space else None
    summary.figures["search/best_of_n.png"] = plots.best_of_n_figure(
        [row.n for row in rows],
        [row.expected for row in rows],
        [row.low for row in rows],
        [row.high for row in rows],
        len(pool),
        reference,
        title=f"Expected best of N trials drawn from this search ({space.name} space)",
    )


def _plain(value: Any) -> Any:
    """A NumPy scalar as a plain Python number (for JSON and tags)."""
    return value.item() if hasattr(value, "item") else value
