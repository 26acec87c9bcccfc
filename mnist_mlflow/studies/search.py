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

The search is split by job, a file each: ``search_config`` (what a command asks for),
``search_spaces`` (what is varied and held fixed), ``search_sampling`` (samplers and
pruners), ``search_workers`` (the shared parent, heartbeats, retries and the trial budget),
``search_objective`` (one trial's run), ``search_summary`` (the parent's tables and figures)
and ``search_keys`` (every name written into the study). This file joins them as one study of
the engine.
"""

from __future__ import annotations

import os
import platform
import time

import optuna
from optuna.trial import TrialState

from mnist_mlflow import data, tracking
from mnist_mlflow.config import DataConfig
from mnist_mlflow.redaction import redact_url
from mnist_mlflow.studies import engine
from mnist_mlflow.studies.progress import Progress
from mnist_mlflow.studies.protocol import StudySummary
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_keys import trial_key
from mnist_mlflow.studies.search_objective import make_objective
from mnist_mlflow.studies.search_summary import search_summary
from mnist_mlflow.studies.search_workers import (
    SurplusTrial,
    heartbeat_settings,
    open_storage,
    open_study,
    retry_failed,
    work_left,
)
from mnist_mlflow.studies.study_storage import lost_storage, quiet_lost_storage_in_threads


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
        # Each worker's runs carry its system metrics under its own name: which machine did what.
        tracking.set_system_metrics_node(f"{platform.node()}-{os.getpid()}")
        self.storage = open_storage(self.config.resolved_storage())
        quiet_lost_storage_in_threads(self.config.resolved_storage())
        data.load_splits(DataConfig(seed=self.config.seed, max_train_examples=self.config.max_train_examples))

    def open_parent(self) -> tracking.StudyParent:
        self.study, parent = open_study(self.config, self.space, self.storage)
        return parent

    def start_lines(self, parent: tracking.StudyParent, tracking_uri: str) -> list[str]:
        verb = "Joined" if parent.resumed else "Started"
        return [
            f"{verb} search {self.study_id} ({self.sampler} sampler, "
            + (
                f"Pareto front of accuracy against {self.config.cost}, no pruning, "
                if self.config.is_multi_objective()
                else f"{self.config.pruner} pruner, "
            )
            + f"at most {self.n_trials} "
            f"trials) in {redact_url(self.config.resolved_storage())}; parent run {parent.run_id} at {tracking_uri}",
            f"More workers, or a resumed session, join it with the same command (study_name={self.study_id}).",
        ]

    def run_children(self, parent: tracking.StudyParent) -> int:
        try:
            return self._run_children(parent)
        except Exception as error:
            lost = lost_storage(error, self.config.resolved_storage())
            if lost is None:
                raise
            raise lost from None

    def _run_children(self, parent: tracking.StudyParent) -> int:
        study = self.study
        objective = make_objective(self.config, self.space, parent.run_id, self.n_trials, self.counter)

        progress = Progress(parent.run_id, self.n_trials)

        def stop_when_done(study, trial) -> None:
            report_progress(study, progress)
            if not work_left(study, self.n_trials, self.grid_size):
                study.stop()

        while True:
            optuna.storages.fail_stale_trials(study)
            retry_failed(study)
            if work_left(study, self.n_trials, self.grid_size):
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
            trial_key(trial.number) for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        tracking.close_orphan_children(parent, running_keys=running_keys)
        return self.counter[0]

    def summarise(self, parent: tracking.StudyParent) -> StudySummary:
        return search_summary(self.study, self.config, self.space)

    def on_interrupt(self) -> None:
        # Optuna has failed the trial this worker was running; queue it again at once, so
        # that another worker (or the next session) trains it.
        retry_failed(self.study)

    def others_running(self) -> bool:
        try:
            return bool(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        except Exception as error:
            if lost_storage(error, self.config.resolved_storage()) is None:
                raise
            # Nobody can tell without the database: the parent is closed with the reason, and
            # the next worker, once the database is back, opens it again.
            return False

    def end_line(self, parent: tracking.StudyParent, trained: int) -> str:
        return f"Search {self.study_id}: {trained} trials trained by this worker; parent run {parent.run_id}"


def report_progress(study: optuna.Study, progress: Progress) -> None:
    """The whole study's count of finished trials (complete or pruned, by any worker), and the best
    validation accuracy so far, as one line and on the parent run."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.values]
    best = max(complete, key=lambda trial: (trial.values[0], -trial.number), default=None)
    if best is None:
        progress.report(len(trials), None, None)
    else:
        progress.report(len(trials), best.values[0], f"trial {best.number}")


def run_search(config: SearchConfig) -> engine.StudyResult:
    """Runs one worker of the search ``config`` describes until the study is complete; returns its result.

    Checks the tracking server, the storage and the data before any run is created.
    """
    return engine.run_study(OptunaStudy(config))
