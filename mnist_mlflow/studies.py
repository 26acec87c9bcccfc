"""Studies: one parent MLflow run with one child run per configuration or replicate.

The exercises, the weight-decay sweep and the hyperparameter search all run through
:func:`run_study`. It creates the parent (or reopens it when a ``sweep_id`` is given again),
trains the children that have not FINISHED yet, reuses those that have, and hands every
child's recorded metrics to a summary function that logs the parent's tables and plots.

A child's identity is its ``key`` (say ``factor=0.001/replicate=2``), stored as a tag. A
study started again with the same ``sweep_id`` and the same settings therefore trains only
the missing keys. A child that some killed process left RUNNING is marked KILLED and trained
again: a killed run never counts as finished.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mnist_mlflow import data, experiments, lifecycle, tracking
from mnist_mlflow.config import CnnRunConfig, ConfigError, DenseRunConfig, RunFailedError, TrainingDivergedError

# The study_role tag of every child (the parent's is "parent"), so the MLflow UI's compare view
# and mlflow.search_runs can tell them apart.
CHILD_ROLE = "child"


@dataclass(frozen=True)
class ChildSpec:
    """One child run of a study: what to train and how the run is labelled."""

    key: str
    run_name: str
    config: DenseRunConfig | CnnRunConfig
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class StudySpec:
    """A study: its kind, its parameters, and a description of what it varies, repeats and holds fixed."""

    kind: str
    study_id: str
    run_name: str
    params: Mapping[str, Any]
    description: str


@dataclass
class ChildOutcome:
    """A FINISHED child as recorded in MLflow; ``reused`` if an earlier session trained it.

    ``val_accuracy_history`` holds the validation accuracy of every epoch.
    """

    spec: ChildSpec
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    reused: bool
    val_accuracy_history: list[float] = field(default_factory=list)


@dataclass
class StudyResult:
    parent_run_id: str
    study_id: str
    resumed: bool
    outcomes: list[ChildOutcome]
    trained: int


def new_study_id(kind: str) -> str:
    """A fresh sweep id such as ``weight_decay-1a2b3c4d``."""
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def fingerprint(params: Mapping[str, Any]) -> str:
    """A short digest of a study's settings (without its id): equal settings, equal digest."""
    settings = {name: str(value) for name, value in params.items() if name != "sweep_id"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_study(
    spec: StudySpec,
    children: Sequence[ChildSpec],
    summarise: Callable[[tracking.StudyParent, list[ChildOutcome]], None],
) -> StudyResult:
    """Runs (or resumes) a study and logs its summary on the parent run.

    Before any run is created, the tracking server is checked and every data set the children
    need is loaded, so a bad server or missing data costs no run. If training is interrupted
    or fails, the parent ends KILLED or FAILED and every child finished so far stays FINISHED,
    ready to be reused by running the same command again with the same ``sweep_id``.
    """
    keys = [child.key for child in children]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"study {spec.study_id!r} has duplicate child keys: {sorted(keys)}")
    tracking_uri = tracking.prepare_tracking(spec.kind)
    for data_config in {child.config.data for child in children}:
        data.load_splits(data_config)

    parent = tracking.open_study_parent(
        spec.kind, spec.study_id, spec.run_name, spec.params, fingerprint(spec.params), spec.description
    )
    verb = "Resuming" if parent.resumed else "Started"
    print(f"{verb} {spec.kind} study {spec.study_id}: parent run {parent.run_id} at {tracking_uri}", flush=True)
    print(f"To resume it after an interruption, run the same command with sweep_id={spec.study_id}", flush=True)
    tracking.print_runs_view(parent.experiment_id)
    status, reason = "FAILED", None
    diverged: list[str] = []
    try:
        finished = _reusable_children(parent)
        trained = 0
        for index, child in enumerate(children, start=1):
            prefix = f"[{index}/{len(children)}] {child.run_name}"
            if child.key in finished:
                print(f"{prefix}: FINISHED earlier in run {finished[child.key].run_id}; reused", flush=True)
                continue
            print(f"{prefix}: training", flush=True)
            try:
                experiments.run_config(
                    child.config,
                    experiments.ChildOptions(
                        parent_run_id=parent.run_id,
                        run_name=child.run_name,
                        tags={
                            **child.tags,
                            "entry_point": spec.kind,
                            tracking.STUDY_ID_TAG: spec.study_id,
                            tracking.STUDY_ROLE_TAG: CHILD_ROLE,
                            tracking.CHILD_KEY_TAG: child.key,
                        },
                        params=dict(child.params),
                        description=child.description,
                    ),
                )
            except TrainingDivergedError as error:
                # The child's run has ended FAILED with the reason; the other children go on.
                print(f"{prefix}: FAILED: {error}", flush=True)
                diverged.append(child.key)
                continue
            trained += 1
        outcomes = _outcomes(parent, children, previously_finished=set(finished))
        if not outcomes:
            raise RunFailedError(f"{spec.kind} study {spec.study_id}: no child finished, so there is nothing to summarise")
        if diverged:
            tracking.set_run_tags(parent.run_id, {"failed_children": ", ".join(diverged)})
        summarise(parent, outcomes)
        status = "FINISHED"
    except KeyboardInterrupt as interruption:
        status, reason = "KILLED", lifecycle.interruption_reason(interruption)
        raise
    finally:
        tracking.close_study_parent(parent, status, reason=reason)
    failed_note = f", {len(diverged)} failed ({', '.join(diverged)})" if diverged else ""
    print(
        f"{spec.kind} study {spec.study_id}: {trained} trained, {len(children) - trained - len(diverged)} reused"
        f"{failed_note}; parent run {parent.run_id}",
        flush=True,
    )
    tracking.print_runs_view(parent.experiment_id)
    return StudyResult(parent.run_id, spec.study_id, parent.resumed, outcomes, trained)


def _finished_by_key(records: Sequence[tracking.ChildRecord]) -> dict[str, tracking.ChildRecord]:
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
            print(f"Run {record.run_id} ({record.key}) was left RUNNING by an earlier session; marked KILLED", flush=True)
    return _finished_by_key(records)


def _outcomes(
    parent: tracking.StudyParent, children: Sequence[ChildSpec], previously_finished: set[str]
) -> list[ChildOutcome]:
    """Every child's outcome, read back from MLflow, in the order of ``children``."""
    records = _finished_by_key(tracking.study_children(parent))
    outcomes = []
    for child in children:
        record = records.get(child.key)
        if record is None:
            # A child that failed (its loss diverged) has no outcome; the summary covers the others.
            continue
        outcomes.append(
            ChildOutcome(
                child, record.run_id, record.metrics, record.params, child.key in previously_finished,
                tracking.metric_values(record.run_id, "val_accuracy"),
            )
        )
    return outcomes
