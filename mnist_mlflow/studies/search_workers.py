"""Many workers on one search: the shared parent run, heartbeats, retries and the trial budget.

Workers share a study through its storage. The first creates the parent run and records it in
the study; the others join it, and refuse a study started with other settings. Optuna's
heartbeat finds a trial whose worker died: its run is marked KILLED and its parameters queued
again, at most MAX_RETRIES times. ``n_trials`` caps the total over all workers: trial numbers
come from the storage in one order for everyone, so a trial that finds the cap reached, or its
parameters finished or running in a lower-numbered trial, is surplus and trains nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from mnist_mlflow import tracking
from mnist_mlflow.config import UserInputError, parse_int
from mnist_mlflow.redaction import redact_url, server_identity
from mnist_mlflow.studies import study_storage
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_keys import (
    DIVERGED_ATTR,
    PARENT_ATTR,
    SETTINGS_ATTR,
    SURPLUS_ATTR,
    TRACKING_ATTR,
    trial_key,
)
from mnist_mlflow.studies.search_sampling import make_pruner, make_sampler, sampler_settings
from mnist_mlflow.studies.search_spaces import SearchSpace

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
# A worker creates the parent run before the study, and records it in the study a moment
# after creating it; a worker that finds a study without one waits this long, then takes
# the study for orphaned (its creator stopped in between) and gives it a parent itself.
PARENT_WAIT_S = 5

# Heartbeats, stale-trial detection and retries are "experimental" in Optuna; say so once, here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class _NoInterruptionTraceback(logging.Filter):
    """Optuna logs a trial cut off by Ctrl-C or SIGTERM with the whole traceback. The warning line
    stays; the traceback goes, since the process ends with one line saying why it stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = None
            record.exc_text = None
        return True


INTERRUPTION_FILTER = _NoInterruptionTraceback()
logging.getLogger("optuna.study._optimize").addFilter(INTERRUPTION_FILTER)


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
    return study_storage.open_storage(url, interval, grace, on_stale_trial)


def study_settings(config: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    """What must be equal for two workers (or sessions) to share a study.

    The objective and its cost are recorded only for a Pareto study, so that a single-objective
    study of an earlier release is still joined.
    """
    settings = {
        "space": space.describe(),
        "sampler": config.resolved_sampler(),
        "epochs": config.epochs,
        "pruner": config.pruner,
        "max_train_examples": config.max_train_examples,
        "seed": config.seed,
    }
    if config.is_multi_objective():
        settings.update(objective=config.objective, cost=config.cost)
    return settings


def study_description(config: SearchConfig, space: SearchSpace) -> str:
    varied = "; ".join(
        f"{name} in {list(choices)}"
        if isinstance(choices, tuple)
        else f"{name} in [{choices.low:g}, {choices.high:g}]"
        + (" (log)" if not isinstance(choices, tuple) and choices.log else "")
        for name, choices in space.parameters.items()
    )
    fixed = ", ".join(f"{name}={value}" for name, value in space.all_fixed().items())
    objective = (
        f"Objectives: best-epoch validation accuracy (maximised) and {config.cost.replace('_', ' ')} (minimised); "
        f"the Pareto front is kept and the cheapest trial within {config.pick_within:g} of the best accuracy "
        "is registered. "
        if config.is_multi_objective()
        else ""
    )
    return (
        f"Hyperparameter search {config.resolved_study_name()} ({config.resolved_sampler()} sampler, "
        f"{config.pruner} pruner, at most {config.resolved_n_trials()} trials over all workers). "
        f"Model: Dense(units, activation) -> Dropout -> Dense(10, softmax), Adam, {config.epochs} epochs, "
        f"best epoch by validation accuracy. {objective}Varies: {varied}. Repeats: nothing (one run per trial). "
        f"Holds fixed: {fixed}, seed={config.seed} (split and initial weights), "
        f"max_train_examples={config.max_train_examples or 'all'}. Each child run is one trial."
    )


def open_study(config: SearchConfig, space: SearchSpace, storage):
    """Creates the study and its parent run, or joins them; refuses a study started with other settings.

    The parent run exists before anything is written to the study storage, so a worker that
    fails (say, with wrong credentials) leaves no study behind without a parent.
    """
    study_name = config.resolved_study_name()
    sampler = make_sampler(config.resolved_sampler(), space, config.seed)
    pruner = make_pruner(config.pruner, config.epochs)
    settings = study_settings(config, space)
    tracking_uri = tracking.tracking_uri_shown()
    launcher_run_id = tracking.claim_launcher_run()

    def new_parent() -> tracking.StudyParent:
        return tracking.create_study_parent(
            tracking.SEARCH_KIND,
            study_name,
            study_name,
            parent_run_params(config, space, study_name),
            tracking.Fingerprint.digest_of(settings),
            study_description(config, space),
            launcher_run_id,
            texts={"search/space.json": json.dumps(space.describe(), indent=2)},
        )

    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        parent = new_parent()
        try:
            study = optuna.create_study(
                storage=storage, study_name=study_name, directions=config.directions(), sampler=sampler, pruner=pruner
            )
        except optuna.exceptions.DuplicatedStudyError:
            # Another worker created the study a moment ago; join it instead.
            tracking.discard_study_parent(parent)
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        else:
            record_parent(study, parent, config, settings, tracking_uri)
            return study, parent

    attrs = wait_for_attrs(study)
    check_joinable(study, attrs, settings, tracking_uri, config.directions())
    if PARENT_ATTR in attrs:
        return study, tracking.attach_study_parent(
            tracking.SEARCH_KIND, study_name, attrs[PARENT_ATTR], launcher_run_id
        )
    print(
        f"Study {study_name} has no parent run recorded (its creator stopped before recording it); creating one",
        flush=True,
    )
    parent = new_parent()
    record_parent(study, parent, config, settings, tracking_uri)
    return study, parent


def parent_run_params(config: SearchConfig, space: SearchSpace, study_name: str) -> dict:
    """The search parent's parameters: the command's, and what it resolved them to."""
    return {
        **config.as_params(),
        "sampler": config.resolved_sampler(),
        "n_trials": config.resolved_n_trials(),
        "study_name": study_name,
        "storage": redact_url(config.resolved_storage()),
        "space": space.name,
        "space_source": space.source,
        **sampler_settings(config.resolved_sampler()),
    }


def record_parent(study, parent: tracking.StudyParent, config: SearchConfig, settings: dict, tracking_uri: str) -> None:
    """Writes into the study what joining workers check and find: the objectives' names, the
    settings, the tracking server and, last, the parent run."""
    # Optuna's own plots and dashboard then name the objectives.
    study.set_metric_names(["val_accuracy", config.cost] if config.is_multi_objective() else ["val_accuracy"])
    study.set_user_attr(SETTINGS_ATTR, settings)
    study.set_user_attr(TRACKING_ATTR, tracking_uri)
    # Written last: a joining worker waits for it, and then finds the other two in place.
    study.set_user_attr(PARENT_ATTR, parent.run_id)


def check_joinable(
    study, attrs: dict[str, Any], settings: dict[str, Any], tracking_uri: str, directions: list[str]
) -> None:
    """Refuses to join a study that is not one of this project's searches, was started with other
    settings, or records its runs at another tracking server."""
    study_name = study.study_name
    found = [direction.name.lower() for direction in study.directions]
    if found != directions:
        raise UserInputError(
            f"study_name={study_name!r} is an Optuna study that optimises {found}, not {directions}; "
            "it is not a search with this objective (choose another study_name)"
        )
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


def wait_for_attrs(study) -> dict[str, Any]:
    """The study's user attributes once its creator has recorded the parent run (or after a short wait)."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while True:
        attrs = dict(study.user_attrs)
        if PARENT_ATTR in attrs or time.monotonic() > deadline:
            return attrs
        time.sleep(0.2)


def on_stale_trial(study, trial) -> None:
    """Called by Optuna when a trial's heartbeat stopped: close its run and queue it again."""
    print(
        f"Trial {trial.number}: its worker stopped sending heartbeats; the trial is failed and queued again", flush=True
    )
    parent_run_id = study.user_attrs.get(PARENT_ATTR)
    if parent_run_id:
        for record in tracking.study_children_of(parent_run_id):
            # On the dead worker's own host, reconciliation may have closed the run already.
            if record.key == trial_key(trial.number) and record.status == "RUNNING":
                tracking.mark_run_killed(
                    record.run_id, f"Optuna trial {trial.number} stopped sending heartbeats (its worker died)"
                )
                print(f"Trial {trial.number}: run {record.run_id} marked KILLED", flush=True)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def retried_trial_number(trial) -> int | None:
    """The number of the failed trial that a trial (live or finished) retries, if any.

    A live ``optuna.Trial`` has no public view of its system attributes; the study's list of
    trials holds it as a ``FrozenTrial``, which Optuna's retry callback can read.
    """
    if not isinstance(trial, optuna.trial.FrozenTrial):
        trial = next(frozen for frozen in trial.study.get_trials(deepcopy=False) if frozen.number == trial.number)
    return optuna.storages.RetryFailedTrialCallback.retried_trial_number(trial)


def is_surplus(trial) -> bool:
    return bool(trial.user_attrs.get(SURPLUS_ATTR))


def budget_states():
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def check_not_surplus(
    study, trial, values: dict[str, Any], n_trials: int, space: SearchSpace, sampler: str, retried: bool
) -> None:
    """Raises SurplusTrial when the cap is reached by lower-numbered trials, or when a grid point or
    a retried trial's parameters already finished or run in a lower-numbered trial."""
    others = [
        other for other in study.get_trials(deepcopy=False) if other.number != trial.number and not is_surplus(other)
    ]
    earlier_in_budget = [other for other in others if other.number < trial.number and other.state in budget_states()]
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


def retry_failed(study) -> None:
    """Queues again every failed trial (cut off by Ctrl-C or a crash) that has no retry yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {retried_trial_number(trial) for trial in trials}
    covered = [trial.params for trial in trials if trial.state != TrialState.FAIL]
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for trial in trials:
        if trial.state != TrialState.FAIL or is_surplus(trial) or trial.number in retried or not trial.params:
            continue
        if DIVERGED_ATTR in trial.user_attrs:
            continue
        if trial.params in covered:
            continue
        print(f"Trial {trial.number} ({trial.params}) did not finish in an earlier session; queued again", flush=True)
        callback(study, trial)
        covered.append(trial.params)


def work_left(study, n_trials: int, grid_size: int | None) -> bool:
    """Whether this worker should start another trial: a queued retry, or room under the cap
    (and, for a grid, a grid point no trial has been given yet)."""
    all_trials = study.get_trials(deepcopy=False)
    trials = [trial for trial in all_trials if not is_surplus(trial)]
    if any(trial.state == TrialState.WAITING for trial in trials):
        return True
    used = sum(trial.state in budget_states() for trial in trials)
    if used >= n_trials:
        return False
    if grid_size is not None:
        # The grid sampler gives trial k < grid_size grid point k; later trials only repeat points.
        fresh = [trial for trial in all_trials if retried_trial_number(trial) is None]
        return len(fresh) < grid_size
    return True
