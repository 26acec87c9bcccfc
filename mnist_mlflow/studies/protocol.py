"""What a study hands the study engine: its children, its summary, and the calls the engine makes.

Plain data: importing this module loads neither TensorFlow nor MLflow, so a study's
definition module (its config and its list of children) can use these types and still
validate its input at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mnist_mlflow.config import CnnRunConfig, DenseRunConfig

if TYPE_CHECKING:
    from mnist_mlflow.tracking import StudyParent


@dataclass(frozen=True)
class ChildSpec:
    """One child run to train: its key in the study, its run name, its config and its labels."""

    key: str
    run_name: str
    config: DenseRunConfig | CnnRunConfig
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class Registration:
    """A model the summary wants registered: the winner's model, its run and its scores."""

    model_uri: str
    name: str
    run_id: str
    val_accuracy: float
    test_accuracy: float


@dataclass
class StudySummary:
    """What a study's parent run holds, built by a study's pure summary function.

    ``tables`` are pandas DataFrames (shown by the MLflow UI), ``texts`` Markdown or JSON,
    ``figures`` Matplotlib figures; ``stepped_metrics`` hold one value per step (say, per
    weight-decay factor). The child ``winner_run_id`` is tagged ``study_winner=true``.
    ``printed`` is shown at the end of the study.
    """

    tables: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stepped_metrics: dict[str, list[float]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    winner_run_id: str | None = None
    registration: Registration | None = None
    printed: str = ""


class Study(Protocol):
    """What the engine needs from a study; see the module docstring for when each is called."""

    kind: str
    study_id: str

    def prepare(self) -> None: ...

    def open_parent(self) -> StudyParent: ...

    def start_lines(self, parent: StudyParent, tracking_uri: str) -> list[str]: ...

    def run_children(self, parent: StudyParent) -> int: ...

    def summarise(self, parent: StudyParent) -> StudySummary: ...

    def on_interrupt(self) -> None: ...

    def others_running(self) -> bool: ...

    def end_line(self, parent: StudyParent, trained: int) -> str: ...
