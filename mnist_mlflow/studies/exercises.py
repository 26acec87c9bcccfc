"""The course exercises as studies: the ten dense-network exercises on MNIST and the
Fashion-MNIST convolution exercises (docs/experiments.md sections 1 and 3).

Each exercise is one change to its suite's reference network. This module holds the study's
config (:class:`ExercisesConfig`), the exercises as configs, and the summary (the comparison
table and the accuracy-against-time plot), built from the children's records.
:func:`run_exercises` hands them to the study engine. Importing this module loads neither
TensorFlow nor MLflow, so exercise ids are checked at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pandas as pd

from mnist_mlflow.config import (
    SEED,
    CnnModelConfig,
    CnnRunConfig,
    ConfigError,
    DataConfig,
    DenseModelConfig,
    DenseRunConfig,
    TrainingConfig,
    max_train_examples_parameter,
    sweep_id_parameter,
)
from mnist_mlflow.parameters import (
    Kind,
    Parameters,
    check_parameters,
    choice,
    names,
    parameter,
    whole_number,
)
from mnist_mlflow.studies.protocol import ChildSpec, StudySummary
from mnist_mlflow.studies.summaries import as_number, markdown_table

if TYPE_CHECKING:
    from mnist_mlflow.tracking import ChildRecord


@dataclass(frozen=True)
class Exercise:
    """One exercise: its id, what it changes, the question it answers and how to build its config."""

    exercise_id: str
    change: str
    question: str
    make_config: Callable[[DenseRunConfig | CnnRunConfig], DenseRunConfig | CnnRunConfig]
    # What a figure writes beside the exercise's point, after its number; empty: the change itself.
    label: str = ""

    @property
    def point_label(self) -> str:
        """``7: batch 1``; the reference is named by itself (``baseline``)."""
        what = self.label or self.change
        names_itself = what.split(":")[0].split()[0] == self.exercise_id
        return self.exercise_id if names_itself else f"{self.exercise_id}: {what}"


def _dense_model(config: DenseRunConfig, **changes) -> DenseRunConfig:
    return replace(config, model=replace(config.model, **changes))


def _training(config, **changes):
    return replace(config, training=replace(config.training, **changes))


def _keep(config):
    return config


# Exercise 10 combines what helps in exercises 1-9: width (1, 3), relu (4, 5), Adam's default
# rate (8, 9) and small batches (6, 7), plus what the exercises do not try: dropout against
# the over-fitting of a wide network, a learning rate that decays to zero by the last epoch,
# and twice the suite's epochs: probe runs on the full data stayed below 98.5% validation
# accuracy in the suite's 5 epochs (docs/studies.md records the probes and the suite's run).
COMBINED = {
    "hidden_units": (1024, 1024),
    "activations": ("relu", "relu"),
    "dropout_rate": 0.2,
    "batch_size": 32,
    "lr_schedule": "cosine",
    "epochs_factor": 2,
}


def _combined(config: DenseRunConfig) -> DenseRunConfig:
    config = _dense_model(
        config,
        hidden_units=COMBINED["hidden_units"],
        activations=COMBINED["activations"],
        dropout_rate=COMBINED["dropout_rate"],
    )
    return _training(
        config,
        batch_size=COMBINED["batch_size"],
        lr_schedule=COMBINED["lr_schedule"],
        epochs=config.training.epochs * COMBINED["epochs_factor"],
    )


DENSE_EXERCISES = (
    Exercise(
        "baseline",
        "baseline: 784-50-50-10 relu, Adam 0.001, batch 100",
        "How accurate is the course's baseline network, and how long does one epoch take?",
        _keep,
    ),
    Exercise(
        "1",
        "hidden width 200",
        "Does a wider network (200 units per hidden layer) learn more, and what does it cost per epoch?",
        lambda config: _dense_model(config, hidden_units=(200, 200), activations=("relu",) * 2),
        label="width 200",
    ),
    Exercise(
        "2",
        "depth: 3 hidden layers of 50",
        "Does a third hidden layer of the same width improve accuracy?",
        lambda config: _dense_model(config, hidden_units=(50, 50, 50), activations=("relu",) * 3),
        label="3 layers of 50",
    ),
    Exercise(
        "3",
        "5 hidden layers of 500",
        "Do five wide hidden layers (500 units each) pay for their much higher cost per epoch?",
        lambda config: _dense_model(config, hidden_units=(500,) * 5, activations=("relu",) * 5),
        label="5 layers of 500",
    ),
    Exercise(
        "4",
        "sigmoid in both hidden layers",
        "How much do sigmoid activations lose against relu in five epochs?",
        lambda config: _dense_model(config, activations=("sigmoid", "sigmoid")),
        label="sigmoid",
    ),
    Exercise(
        "5",
        "relu, then tanh",
        "Does a tanh second hidden layer change anything compared with relu?",
        lambda config: _dense_model(config, activations=("relu", "tanh")),
        label="relu, tanh",
    ),
    Exercise(
        "6",
        "batch size 10,000",
        "What happens with very large batches: cheap epochs, but only 6 updates each?",
        lambda config: _training(config, batch_size=10_000),
        label="batch 10,000",
    ),
    Exercise(
        "7",
        "batch size 1 (54,000 steps per epoch)",
        "Is pure stochastic gradient descent (one example per step) worth its many steps?",
        lambda config: _training(config, batch_size=1),
        label="batch 1",
    ),
    Exercise(
        "8",
        "learning rate 0.0001",
        "How much slower does the network learn with a ten times smaller learning rate?",
        lambda config: _training(config, learning_rate=0.0001),
        label="lr 0.0001",
    ),
    Exercise(
        "9",
        "learning rate 0.02",
        "Is a twenty times larger learning rate unstable?",
        lambda config: _training(config, learning_rate=0.02),
        label="lr 0.02",
    ),
    Exercise(
        "10",
        "1024-1024 relu, dropout 0.2, batch 32, cosine-decayed Adam 0.001, twice the epochs",
        "Which combination of the changes reaches 98.5% validation accuracy or more?",
        _combined,
        label="1024-1024, dropout 0.2",
    ),
)


def _conv(filters: tuple[int, ...], pooling: tuple[bool, ...]):
    def make(config: CnnRunConfig) -> CnnRunConfig:
        return replace(config, model=CnnModelConfig(filters=filters, pooling=pooling, dense_units=(128,)))

    return make


def _fashion_dense_reference(config: CnnRunConfig) -> DenseRunConfig:
    return DenseRunConfig(
        model=DenseModelConfig(hidden_units=(128,), activations=("relu",)), training=config.training, data=config.data
    )


CONV_EXERCISES = (
    Exercise(
        "dense",
        "dense reference: 784-128-10, no convolution",
        "How far does a plain dense network get on Fashion-MNIST, as the bar for the convolutions?",
        _fashion_dense_reference,
    ),
    Exercise(
        "1",
        "Conv(64)-pool-Conv(64)-pool-Dense(128)",
        "How much do two convolution layers of 64 filters gain over the dense network?",
        _conv((64, 64), (True, True)),
        label="conv 64-64, dense 128",
    ),
    Exercise(
        "2",
        "filters 16 and 16",
        "What do four times fewer filters cost in accuracy, and save in parameters and time?",
        _conv((16, 16), (True, True)),
        label="filters 16, 16",
    ),
    Exercise(
        "3",
        "one conv layer of 16 (final convolution removed)",
        "Does a single small convolution layer suffice?",
        _conv((16,), (True,)),
        label="one conv of 16",
    ),
    Exercise(
        "4",
        "three conv layers 64, 32, 16 (pool, pool, no pool)",
        "Does a third convolution layer help, with fewer parameters in the dense part?",
        _conv((64, 32, 16), (True, True, False)),
        label="convs 64-32-16",
    ),
    Exercise(
        "5",
        "one conv layer of 32 (all but the first removed)",
        "Is one convolution layer of 32 filters, with a large dense layer after it, the best trade?",
        _conv((32,), (True,)),
        label="one conv of 32",
    ),
)

SUITES = {"dense": DENSE_EXERCISES, "conv": CONV_EXERCISES}
# Each exercise's figure label, by the change its run records.
POINT_LABELS = {exercise.change: exercise.point_label for suite in SUITES.values() for exercise in suite}
# The exercise the others are compared with; highlighted in the plot.
REFERENCE_IDS = {"dense": "baseline", "conv": "dense"}
SUITE_DESCRIPTIONS = {
    "dense": (
        "The ten dense-network exercises on MNIST (docs/experiments.md section 1). Varies: one change per "
        "exercise to the baseline 784-50-50-10 relu network (width, depth, activations, batch size, "
        "learning rate, and a combination). Repeats: nothing, one run per exercise. Holds fixed: "
        "Adam 0.001, batch 100, the epochs, the seed and the 54,000/6,000 split, unless the exercise changes it."
    ),
    "conv": (
        "The Fashion-MNIST convolution exercises (docs/experiments.md section 3). Varies: the convolution "
        "layers (filters, count, pooling) before a Dense(128) layer, plus a dense reference network. "
        "Repeats: nothing, one run per variant. Holds fixed: Adam 0.001, batch 32, the epochs, the seed "
        "and the split."
    ),
}


def exercise_ids(suite: str) -> list[str]:
    return [exercise.exercise_id for exercise in SUITES[suite]]


EXERCISE_SUITES = ("dense", "conv")


def _check_suite_ids(name: str, value: tuple[str, ...]) -> None:
    if len(set(value)) != len(value):
        raise ConfigError(f"{name}={','.join(value)!r} names an exercise twice")


@dataclass(frozen=True)
class ExercisesConfig(Parameters):
    """One ``exercises`` study; mirrors :func:`run_exercises`.

    ``only`` holds the exercise ids to run (empty: the whole suite); the ids of each suite are
    listed in :data:`SUITES`.
    """

    suite: str = parameter(
        "dense",
        "dense: the baseline and the ten exercises of docs/experiments.md section 1, ids baseline, 1 ... 10; "
        "conv: the Fashion-MNIST variants of section 3, ids dense (the dense reference) and 1 ... 5",
        choice(*EXERCISE_SUITES),
    )
    only: tuple[str, ...] = parameter(
        (),
        "comma list of exercise ids to run; empty: the whole suite",
        Kind(read=names(allow_empty=True).read, write=",".join, check=_check_suite_ids),
    )
    epochs: int = parameter(5, "epochs of every exercise (exercise 10 trains twice as many)", whole_number())
    max_train_examples: int = max_train_examples_parameter()
    seed: int = parameter(0, "seed of every exercise: the same split and initial weights for all", SEED)
    sweep_id: str = sweep_id_parameter()

    def __post_init__(self) -> None:
        check_parameters(self)
        known = exercise_ids(self.suite)
        unknown = [item for item in self.only if item not in known]
        if unknown:
            raise ConfigError(
                f"only={','.join(self.only)!r}: {', '.join(map(repr, unknown))} is not an exercise of the "
                f"{self.suite} suite; its exercises are: {', '.join(known)}"
            )


def base_config(config: ExercisesConfig) -> DenseRunConfig | CnnRunConfig:
    """The suite's reference setup: the section 1 baseline, or Adam and batch 32 on Fashion-MNIST."""
    data_config = DataConfig(
        dataset="mnist" if config.suite == "dense" else "fashion_mnist",
        seed=config.seed,
        max_train_examples=config.max_train_examples,
    )
    if config.suite == "dense":
        return DenseRunConfig(training=TrainingConfig(epochs=config.epochs, seed=config.seed), data=data_config)
    return CnnRunConfig(
        training=TrainingConfig(
            optimizer="adam", learning_rate=0.001, batch_size=32, epochs=config.epochs, seed=config.seed
        ),
        data=data_config,
        register_as="",
    )


def selected_exercises(config: ExercisesConfig) -> list[Exercise]:
    wanted = set(config.only)
    return [exercise for exercise in SUITES[config.suite] if not wanted or exercise.exercise_id in wanted]


def exercises_table(records: Sequence[ChildRecord]) -> pd.DataFrame:
    """One row per exercise: what changed, accuracies, time per epoch, total time, parameters."""
    rows = []
    for record in records:
        metrics = record.metrics
        rows.append(
            {
                "exercise": record.params.get("exercise", record.key),
                "change": record.params.get("exercise_change", ""),
                "label": POINT_LABELS.get(record.params.get("exercise_change", ""), record.key),
                "val_accuracy": metrics.get("best_val_accuracy", float("nan")),
                "test_accuracy": metrics.get("test_accuracy", float("nan")),
                "mean_epoch_time_s": metrics.get("mean_epoch_time_s", float("nan")),
                "train_time_s": metrics.get("train_time_s", float("nan")),
                "trainable_parameters": int(as_number(record.params.get("trainable_parameters"))),
                "best_epoch": int(metrics.get("best_epoch", -1)) + 1,
                "run_id": record.run_id,
            }
        )
    return pd.DataFrame(rows)


EXERCISE_FORMATS = {
    "val_accuracy": ".2%",
    "test_accuracy": ".2%",
    "mean_epoch_time_s": ".2f",
    "train_time_s": ".1f",
    "trainable_parameters": ",d",
}


def exercises_summary(records: Sequence[ChildRecord], reference_id: str) -> StudySummary:
    """The parent's comparison table, its Markdown and the accuracy-against-time plot."""
    from mnist_mlflow import plots

    table = exercises_table(records)
    best = table.loc[table["val_accuracy"].idxmax()]
    figure = plots.accuracy_vs_time_figure(
        list(table["label"]),
        list(table["mean_epoch_time_s"]),
        list(table["val_accuracy"]),
        highlight=reference_id,
        title="Exercises: best validation accuracy against mean seconds per epoch",
    )
    markdown = markdown_table(table.drop(columns=["run_id", "label"]), EXERCISE_FORMATS)
    return StudySummary(
        tables={"summary/exercises.json": table},
        texts={"summary/exercises.md": markdown},
        figures={"summary/accuracy_vs_epoch_time.png": figure},
        metrics={"best_val_accuracy": float(best["val_accuracy"]), "best_test_accuracy": float(best["test_accuracy"])},
        tags={"best_exercise": str(best["exercise"]), "best_run_id": str(best["run_id"])},
        winner_run_id=str(best["run_id"]),
        printed=markdown,
    )


def children(config: ExercisesConfig) -> list[ChildSpec]:
    """One child run per selected exercise."""
    return [
        ChildSpec(
            key=f"exercise={exercise.exercise_id}",
            run_name=f"{config.suite}-exercise-{exercise.exercise_id}",
            config=exercise.make_config(base_config(config)),
            tags={"exercise": exercise.exercise_id, "suite": config.suite},
            params={"exercise": exercise.exercise_id, "exercise_change": exercise.change},
            description=exercise.question,
        )
        for exercise in selected_exercises(config)
    ]


def run_exercises(config: ExercisesConfig):
    """Trains the selected exercises of ``config.suite`` as children of one parent run.

    Returns the :class:`mnist_mlflow.studies.engine.StudyResult`; the parent holds the comparison
    table (``summary/exercises.json`` and ``.md``) and ``summary/accuracy_vs_epoch_time.png``.
    """
    from mnist_mlflow.studies import engine

    study_id = config.sweep_id or engine.new_study_id(f"exercises-{config.suite}")
    return engine.run_study(
        engine.ListStudy(
            kind="exercises",
            study_id=study_id,
            run_name=f"exercises-{config.suite}-{study_id.rsplit('-', 1)[-1]}",
            params={**config.as_params(), "sweep_id": study_id},
            description=SUITE_DESCRIPTIONS[config.suite],
            children=children(config),
            summarise_records=lambda records: exercises_summary(records, reference_id=REFERENCE_IDS[config.suite]),
        )
    )
