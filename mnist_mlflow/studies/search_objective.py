"""A search trial's work: one tracked ``dense`` run per trial, reported to Optuna epoch by epoch."""

from __future__ import annotations

import os
import platform
from typing import Any

import keras
import optuna
from optuna.trial import TrialState

from mnist_mlflow import tracked_run, tracking
from mnist_mlflow.config import TrainingDivergedError
from mnist_mlflow.studies import engine
from mnist_mlflow.studies.protocol import ChildSpec
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_keys import (
    BEST_EPOCH_ATTR,
    BEST_VAL_ACCURACY_ATTR,
    DIVERGED_ATTR,
    EPOCHS_TRAINED_ATTR,
    MODEL_URI_ATTR,
    PARAMETERS_ATTR,
    REUSED_ATTRS,
    RUN_ID_ATTR,
    SAME_AS_TRIAL_ATTR,
    SECONDS_PER_EPOCH_ATTR,
    SURPLUS_ATTR,
    TEST_ACCURACY_ATTR,
    TRAIN_TIME_ATTR,
    WORKER_ATTR,
    trial_key,
)
from mnist_mlflow.studies.search_spaces import SearchSpace
from mnist_mlflow.studies.search_workers import SurplusTrial, check_not_surplus, retried_trial_number
from mnist_mlflow.studies.study_storage import lost_storage


class EpochReporter(keras.callbacks.Callback):
    """Reports each epoch's validation accuracy to the Optuna trial and stops training when the pruner says so.

    A pruned trial is not an error: its run still evaluates and logs the best epoch it reached.
    A multi-objective study takes no intermediate values (Optuna's ``report`` refuses them), so
    there the epochs are only counted.
    """

    def __init__(self, trial, pruner: str, storage_url: str, multi_objective: bool = False) -> None:
        super().__init__()
        self.trial = trial
        self.pruner = pruner
        self.prune = pruner != "none"
        self.storage_url = storage_url
        self.multi_objective = multi_objective
        self.pruned_at_epoch: int | None = None
        self.epochs_reported = 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is None:
            return
        if self.multi_objective:
            self.epochs_reported += 1
            return
        # The last epoch is never judged: stopping there saves nothing, and a pruned trial,
        # though fully trained, would not count as finished.
        last = epoch + 1 >= (self.params or {}).get("epochs", epoch + 2)
        try:
            self.trial.report(float(value), epoch)
            prune = self.prune and not last and self.trial.should_prune()
        except Exception as error:
            # A lost database ends the child run FAILED, with the reason, in one line.
            lost = lost_storage(error, self.storage_url)
            if lost is None:
                raise
            raise lost from None
        self.epochs_reported += 1
        if prune:
            self.pruned_at_epoch = epoch
            self.model.stop_training = True


def make_objective(config: SearchConfig, space: SearchSpace, parent_run_id: str, n_trials: int, counter: list[int]):
    """Optuna's objective for this worker: each trial is refused as surplus, reuses a finished
    twin's result, or trains one child run; ``counter[0]`` counts the trials it trained."""
    sampler = config.resolved_sampler()
    worker = f"{platform.node()}:{os.getpid()}"

    multi_objective = config.is_multi_objective()
    failed = (float("nan"),) * len(config.directions()) if multi_objective else float("nan")

    def objective(trial) -> float | tuple[float, float]:
        values = space.suggest(trial)
        retry_of = retried_trial_number(trial)
        try:
            check_not_surplus(trial.study, trial, values, n_trials, space, sampler, retried=retry_of is not None)
        except SurplusTrial as reason:
            trial.set_user_attr(SURPLUS_ATTR, str(reason))
            trial.study.stop()
            raise
        trial.set_user_attr(WORKER_ATTR, worker)
        earlier = finished_twin(trial, space) if sampler != "grid" else None
        if earlier is not None:
            return reuse_twin(trial, earlier)
        reporter = EpochReporter(trial, config.pruner, config.resolved_storage(), multi_objective)
        child = trial_child(trial, values, retry_of, config, space, worker)
        resume = dead_trial_checkpoint(parent_run_id, retry_of, child) if retry_of is not None else None
        try:
            result = engine.train_child(
                tracking.SEARCH_KIND,
                config.resolved_study_name(),
                parent_run_id,
                child,
                callbacks=[reporter],
                resume=resume,
            )
        except TrainingDivergedError as error:
            # Recorded as a failed trial and never queued again: the same parameters and seed
            # would diverge the same way.
            trial.set_user_attr(DIVERGED_ATTR, str(error))
            print(f"Trial {trial.number}: FAILED: {error}", flush=True)
            # Optuna records a trial whose objective is NaN as failed, without a traceback.
            return failed
        counter[0] += 1
        return record_result(trial, result, reporter, config)

    return objective


def dead_trial_checkpoint(parent_run_id: str, retry_of: int, child: ChildSpec) -> tracking.ResumeFrom | None:
    """The killed run of the trial this one retries, for a new run to take over from its
    checkpoint (if it trained the same config: the session checks). Its own run stays KILLED,
    pointing to the new one."""
    killed = tracking.killed_with_checkpoint(
        tracking.SEARCH_KIND, parent_run_id=parent_run_id, child_key=trial_key(retry_of)
    )
    return None if killed is None else tracking.ResumeFrom(killed.info.run_id, same_run=False)


def reuse_twin(trial, earlier) -> float | tuple[float, ...]:
    """Random and TPE draw with replacement; with the same seed, training again gives the same
    model, so the earlier trial's result is reused, not recomputed."""
    print(f"Trial {trial.number}: same parameters as finished trial {earlier.number}; its result is reused", flush=True)
    for name in REUSED_ATTRS:
        if name in earlier.user_attrs:
            trial.set_user_attr(name, earlier.user_attrs[name])
    trial.set_user_attr(SAME_AS_TRIAL_ATTR, earlier.number)
    return earlier.value if len(earlier.values) == 1 else tuple(earlier.values)


def trial_child(
    trial, values: dict[str, Any], retry_of: int | None, config: SearchConfig, space: SearchSpace, worker: str
) -> ChildSpec:
    """The child run of one trial: its key, name, labels and the ``dense`` config it trains."""
    study_name = config.resolved_study_name()
    run_config = config.trial_config(values)
    varied = ", ".join(f"{name}={values[name]}" for name in space.parameters)
    note = f" (retry of trial {retry_of})" if retry_of is not None else ""
    print(f"Trial {trial.number}{note}: training {varied}", flush=True)
    return ChildSpec(
        key=trial_key(trial.number),
        run_name=f"trial-{trial.number:03d}-{tracked_run.dense_run_name(run_config)}",
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
            "sampler": config.resolved_sampler(),
            "pruner": config.pruner,
            "search_space": space.name,
        },
        description=f"Trial {trial.number} of search {study_name}{note}: {varied}.",
    )


def record_result(
    trial, result: tracked_run.RunResult, reporter: EpochReporter, config: SearchConfig
) -> float | tuple[float, float]:
    """What the trial's run measured, into the trial and the run's tags; raises TrialPruned for a
    pruned trial, which still keeps its best epoch's run and model.

    Returns the validation accuracy, and for a Pareto study the cost beside it.
    """
    metrics = result.metrics
    for name, value in {
        RUN_ID_ATTR: result.run_id,
        MODEL_URI_ATTR: result.model_uri,
        BEST_VAL_ACCURACY_ATTR: metrics["best_val_accuracy"],
        TEST_ACCURACY_ATTR: metrics["test_accuracy"],
        BEST_EPOCH_ATTR: int(metrics["best_epoch"]),
        EPOCHS_TRAINED_ATTR: reporter.epochs_reported,
        TRAIN_TIME_ATTR: metrics["train_time_s"],
        SECONDS_PER_EPOCH_ATTR: result.steady_epoch_time_s,
        PARAMETERS_ATTR: result.trainable_parameters,
    }.items():
        trial.set_user_attr(name, value)
    pruned = reporter.pruned_at_epoch is not None
    state_tags = {"optuna_trial_state": "PRUNED" if pruned else "COMPLETE"}
    if pruned:
        state_tags["pruned_after_epoch"] = str(reporter.pruned_at_epoch + 1)
    tracking.set_run_tags(result.run_id, state_tags)
    if pruned:
        raise optuna.TrialPruned(f"stopped by the {reporter.pruner} pruner after epoch {reporter.pruned_at_epoch + 1}")
    if config.is_multi_objective():
        cost = result.steady_epoch_time_s if config.cost == "seconds_per_epoch" else result.trainable_parameters
        return metrics["best_val_accuracy"], float(cost)
    return metrics["best_val_accuracy"]


def finished_twin(trial, space: SearchSpace):
    """The earliest COMPLETE trial with exactly this trial's varied parameters, if any."""
    varied = {name: trial.params[name] for name in space.parameters}
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == varied and SAME_AS_TRIAL_ATTR not in other.user_attrs:
            return other
    return None
