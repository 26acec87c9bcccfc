"""The one study lifecycle: a parent MLflow run with one child run per configuration.

Every study runs through :func:`run_study`: the exercises and the weight-decay sweep, whose
children come from a list (:class:`ListStudy`), and the hyperparameter search, whose children
come from Optuna (:class:`mnist_mlflow.studies.search.OptunaStudy`). The engine does what all
of them share, in this order:

1. check the tracking server and choose the experiment (before anything is created);
2. ``prepare``: load the data, open a storage: anything that can fail cheaply;
3. ``open_parent``: create the parent run, or attach to the one an earlier session or another
   worker created;
4. ``run_children``: train the children that are not finished yet;
5. ``summarise``: build the summary from the children's records, with pure functions; the
   engine logs it on the parent, tags the winner and registers its model if asked;
6. close the parent: FINISHED, FAILED, or KILLED with the reason on Ctrl-C or SIGTERM. A
   parent that other workers still use stays RUNNING: the last of them closes it.

A child's identity is its ``key`` (say ``factor=0.001/replicate=2``), stored as a tag, so a
study started again with the same study id trains only the missing keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnist_mlflow import data, lifecycle, plots, tracked_run, tracking
from mnist_mlflow.config import ConfigError, RunFailedError, TrainingDivergedError
from mnist_mlflow.studies.progress import Progress
from mnist_mlflow.studies.protocol import ChildSpec, Study, StudySummary


@dataclass
class StudyResult:
    """What :func:`run_study` returns: the parent run, how many children this process trained,
    the summary it logged and the registered version, if any."""

    parent: tracking.StudyParent
    study_id: str
    trained: int
    summary: StudySummary
    registered_version: str | None = None


def run_study(study: Study) -> StudyResult:
    """Runs (or resumes, or joins) a study and logs its summary on the parent run.

    Before any run is created, the tracking server is checked and the study prepares what it
    needs, so a bad server or missing data costs no run. If training is interrupted or fails,
    the parent ends KILLED or FAILED and every child finished so far stays FINISHED, ready to
    be reused by running the same command again.
    """
    tracking_uri = tracking.prepare_tracking(study.kind)
    study.prepare()
    parent = study.open_parent()
    # Renews the parent's heartbeat while this process works on the study (tracking.watch).
    tracking.WATCH.add(parent.run_id)
    for line in study.start_lines(parent, tracking_uri):
        print(line, flush=True)
    tracking.print_runs_view(parent.experiment_id)
    status, reason = "FAILED", None
    try:
        trained = study.run_children(parent)
        summary = study.summarise(parent)
        version = _log_summary(parent, summary)
        status = "FINISHED"
    except KeyboardInterrupt as interruption:
        status, reason = "KILLED", lifecycle.interruption_reason(interruption)
        if isinstance(interruption, tracking.TrackingServerLost):
            status = "LOST"  # Nothing can be written to the server; the parent's heartbeat expires.
        else:
            with lifecycle.signals_deferred():
                study.on_interrupt()
        raise
    except RunFailedError as failure:
        reason = str(failure)
        raise
    finally:
        # Another worker still at work keeps the parent RUNNING; it closes the parent itself.
        tracking.WATCH.remove(parent.run_id)
        if status != "LOST":
            parent_too = status == "FINISHED" or not study.others_running()
            tracking.close_study_parent(parent, status, parent_too=parent_too, reason=reason)
    print(study.end_line(parent, trained), flush=True)
    tracking.print_runs_view(parent.experiment_id)
    return StudyResult(parent, study.study_id, trained, summary, version)


def _log_summary(parent: tracking.StudyParent, summary: StudySummary) -> str | None:
    """Logs the summary on the parent, closes its figures, registers the winner's model if asked."""
    try:
        tracking.log_study_summary(
            parent,
            tables=summary.tables,
            texts=summary.texts,
            figures=summary.figures,
            metrics=summary.metrics,
            stepped_metrics=summary.stepped_metrics,
            tags=summary.tags,
            winner_run_id=summary.winner_run_id,
        )
    finally:
        for figure in summary.figures.values():
            plots.close(figure)
    version = None
    registration = summary.registration
    if registration is not None:
        version = tracking.register_once(
            registration.model_uri,
            registration.name,
            registration.run_id,
            registration.val_accuracy,
            registration.test_accuracy,
        )
        tracking.set_run_tags(
            parent.run_id,
            {"registered_model": f"{registration.name}/{version}", "best_model_uri": registration.model_uri},
        )
        print(f"The winner's model is {registration.name} version {version}", flush=True)
    if summary.printed:
        print(summary.printed, flush=True)
    return version


def resumable_child(parent: tracking.StudyParent, kind: str, child: ChildSpec) -> tracking.ResumeFrom | None:
    """The study's killed run of this child, offered for resuming from its checkpoint (the
    run's session resumes it only if it did the same work)."""
    if not child.config.training.checkpoint:
        return None
    killed = tracking.killed_with_checkpoint(kind, parent.experiment_id, parent.run_id, child.key)
    return tracking.ResumeFrom(killed.info.run_id) if killed is not None else None


def train_child(
    kind: str,
    study_id: str,
    parent_run_id: str,
    child: ChildSpec,
    callbacks: Sequence[Any] = (),
    resume: tracking.ResumeFrom | None = None,
) -> tracked_run.RunResult:
    """Trains one child as a run under the parent, tagged with the study and its key; with
    ``resume``, from a killed run's checkpoint."""
    placement = tracked_run.StudyPlacement(
        parent_run_id=parent_run_id,
        run_name=child.run_name,
        tags={
            **child.tags,
            "entry_point": kind,
            tracking.STUDY_ID_TAG: study_id,
            tracking.STUDY_ROLE_TAG: tracking.CHILD_ROLE,
            tracking.CHILD_KEY_TAG: child.key,
        },
        params=dict(child.params),
        description=child.description,
    )
    return tracked_run.run_study_child(child.config, placement, callbacks, resume=resume)


def new_study_id(kind: str) -> str:
    """A fresh study id such as ``weight_decay-1a2b3c4d``."""
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def fingerprint(params: Mapping[str, Any]) -> str:
    """A short digest of a study's settings (without its id): equal settings, equal digest."""
    return tracking.Fingerprint.digest_of({name: str(value) for name, value in params.items() if name != "sweep_id"})


@dataclass
class ListStudy:
    """A study whose children come from a list: the exercises and the weight-decay sweep.

    ``summarise`` builds the summary from the FINISHED children's records, in the order of
    ``children``. A child whose training diverged is failed and the others go on.
    """

    kind: str
    study_id: str
    run_name: str
    params: Mapping[str, Any]
    description: str
    children: Sequence[ChildSpec]
    summarise_records: Callable[[list[tracking.ChildRecord]], StudySummary]
    _failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        keys = [child.key for child in self.children]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"study {self.study_id!r} has duplicate child keys: {sorted(keys)}")

    def prepare(self) -> None:
        for data_config in {child.config.data for child in self.children}:
            data.load_splits(data_config)

    def open_parent(self) -> tracking.StudyParent:
        return tracking.open_study_parent(
            self.kind,
            self.study_id,
            self.run_name,
            self.params,
            fingerprint(self.params),
            self.description,
            tracking.claim_launcher_run(),
        )

    def start_lines(self, parent: tracking.StudyParent, tracking_uri: str) -> list[str]:
        verb = "Resuming" if parent.resumed else "Started"
        return [
            f"{verb} {self.kind} study {self.study_id}: parent run {parent.run_id} at {tracking_uri}",
            f"To resume it after an interruption, run the same command with sweep_id={self.study_id}",
        ]

    def run_children(self, parent: tracking.StudyParent) -> int:
        finished = _reusable_children(parent)
        progress = Progress(parent.run_id, len(self.children))
        best: tuple[float, str] | None = None
        trained = 0
        for index, child in enumerate(self.children, start=1):
            prefix = f"[{index}/{len(self.children)}] {child.run_name}"
            if child.key in finished:
                print(f"{prefix}: FINISHED earlier in run {finished[child.key].run_id}; reused", flush=True)
                accuracy = finished[child.key].metrics.get("best_val_accuracy")
            else:
                accuracy = self._train(parent, child, prefix)
                trained += accuracy is not None
            if accuracy is not None and (best is None or accuracy > best[0]):
                best = (accuracy, child.run_name)
            progress.report(index, *(best or (None, None)))
        if self._failed:
            tracking.set_run_tags(parent.run_id, {"failed_children": ", ".join(self._failed)})
        return trained

    def _train(self, parent: tracking.StudyParent, child: ChildSpec, prefix: str) -> float | None:
        """Trains (or resumes) one child; returns its best validation accuracy, or None if it diverged."""
        resume = resumable_child(parent, self.kind, child)
        print(f"{prefix}: {'resuming' if resume else 'training'}", flush=True)
        try:
            result = train_child(self.kind, self.study_id, parent.run_id, child, resume=resume)
        except TrainingDivergedError as error:
            # The child's run has ended FAILED with the reason; the other children go on.
            print(f"{prefix}: FAILED: {error}", flush=True)
            self._failed.append(child.key)
            return None
        return result.metrics["best_val_accuracy"]

    def summarise(self, parent: tracking.StudyParent) -> StudySummary:
        by_key = finished_by_key(tracking.study_children(parent, with_history=True))
        # A child that failed (its loss diverged) has no record; the summary covers the others.
        records = [by_key[child.key] for child in self.children if child.key in by_key]
        if not records:
            raise RunFailedError(
                f"{self.kind} study {self.study_id}: no child finished, so there is nothing to summarise"
            )
        return self.summarise_records(records)

    def on_interrupt(self) -> None:
        """Nothing to hand back: the next session trains what is missing."""

    def others_running(self) -> bool:
        # One process runs a list study; its parent is this process's own.
        return False

    def end_line(self, parent: tracking.StudyParent, trained: int) -> str:
        reused = len(self.children) - trained - len(self._failed)
        failed_note = f", {len(self._failed)} failed ({', '.join(self._failed)})" if self._failed else ""
        return (
            f"{self.kind} study {self.study_id}: {trained} trained, {reused} reused{failed_note}; "
            f"parent run {parent.run_id}"
        )


def finished_by_key(records: Sequence[tracking.ChildRecord]) -> dict[str, tracking.ChildRecord]:
    """The FINISHED children by key; of two with one key (oldest first), the first counts."""
    finished: dict[str, tracking.ChildRecord] = {}
    for record in records:
        if record.status == "FINISHED" and record.key:
            finished.setdefault(record.key, record)
    return finished


def _reusable_children(parent: tracking.StudyParent) -> dict[str, tracking.ChildRecord]:
    """The study's FINISHED children by key. Children left RUNNING by a dead process are marked KILLED."""
    records = tracking.study_children(parent)
    for record in records:
        if record.status == "RUNNING":
            tracking.mark_run_killed(record.run_id, "its process ended before the run did; the study was resumed")
            print(
                f"Run {record.run_id} ({record.key}) was left RUNNING by an earlier session; marked KILLED", flush=True
            )
    return finished_by_key(records)
