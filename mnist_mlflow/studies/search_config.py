"""The search's config: what one ``search`` command asks for, checked before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mnist_mlflow.config import (
    SEED,
    ConfigError,
    DataConfig,
    DenseModelConfig,
    DenseRunConfig,
    TrainingConfig,
    max_train_examples_parameter,
)
from mnist_mlflow.parameters import (
    NAME,
    Parameters,
    check_parameters,
    choice,
    number,
    parameter,
    require_choice,
    text,
    whole_number,
)
from mnist_mlflow.studies.search_spaces import MAX_GRID_POINTS, SAMPLERS, SearchSpace, load_space, space_corner

# Storage URL schemes Optuna's RDBStorage can use (with a driver suffix such as postgresql+psycopg2).
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
DEFAULT_SEARCH_STORAGE = "sqlite:///optuna-search.db"
DEFAULT_RANDOM_TRIALS = 50
SEARCH_PRUNERS = ("none", "median", "successive_halving", "hyperband")
# accuracy: one objective, the best epoch's validation accuracy. accuracy_and_time: two, that
# accuracy (maximised) against a cost (minimised), as the course asks of every exercise.
SEARCH_OBJECTIVES = ("accuracy", "accuracy_and_time")
SEARCH_COSTS = ("seconds_per_epoch", "parameters")


@dataclass(frozen=True)
class SearchConfig(Parameters):
    """One hyperparameter search; mirrors :func:`mnist_mlflow.studies.search.run_search`.

    ``space`` is ``grid``, ``random`` or a YAML file (see ``search_spaces``).
    Empty ``sampler`` and ``study_name`` and zero ``n_trials`` take defaults that follow the
    space: see :meth:`resolved_sampler`, :meth:`resolved_study_name`, :meth:`resolved_n_trials`.
    ``n_trials`` caps the total over all workers of the study.
    """

    space: str = parameter(
        "grid", "grid or random (docs/experiments.md section 4), or the path of a YAML space file", text()
    )
    sampler: str = parameter(
        "", "grid, random or tpe; empty: the space's own (grid for a grid, random otherwise)", text(lower=True)
    )
    n_trials: int = parameter(
        0,
        f"trials in all, over every worker; 0: the whole grid, or {DEFAULT_RANDOM_TRIALS} for random and tpe",
        whole_number(minimum=0),
    )
    epochs: int = parameter(10, "epochs of every trial", whole_number())
    pruner: str = parameter(
        "none",
        "median: below the finished trials' median at the same epoch; successive_halving (ASHA) and "
        "hyperband: outside the best third after epochs 2, 4, 10 (docs/search.md)",
        choice(*SEARCH_PRUNERS),
    )
    objective: str = parameter(
        "accuracy",
        "accuracy: maximise validation accuracy; accuracy_and_time: a Pareto front of validation accuracy "
        "against the cost",
        choice(*SEARCH_OBJECTIVES),
    )
    cost: str = parameter(
        "seconds_per_epoch",
        "what objective=accuracy_and_time minimises: seconds_per_epoch (measured) or parameters (trainable)",
        choice(*SEARCH_COSTS),
    )
    pick_within: float = parameter(
        0.005,
        "objective=accuracy_and_time registers the cheapest Pareto trial whose validation accuracy is within "
        "this of the best (0: the most accurate)",
        number(0.0, 1.0),
    )
    storage: str = parameter(
        "",
        f"Optuna storage URL shared by all workers; empty: {DEFAULT_SEARCH_STORAGE} in the working directory",
        text(),
    )
    study_name: str = parameter(
        "", "the study's name in the storage; empty: search-<space>[-<sampler>][-pareto-<cost>]", NAME
    )
    max_train_examples: int = max_train_examples_parameter()
    seed: int = parameter(0, "seed of the sampler and of every trial's split and training", SEED)
    register_as: str = parameter(
        "mnist-search", "registered model name for the best trial's model; empty: do not register", NAME
    )

    def __post_init__(self) -> None:
        check_parameters(self)
        space = self.search_space()
        if self.sampler:
            require_choice("sampler", self.sampler, SAMPLERS)
        if self.resolved_sampler() == "grid" and not space.is_grid:
            raise ConfigError(
                f"sampler=grid needs a list of values for every parameter; space {self.space!r} has ranges"
            )
        if self.resolved_sampler() == "grid" and space.grid_size > MAX_GRID_POINTS:
            raise ConfigError(
                f"space {self.space!r} is a grid of {space.grid_size:,} points; a grid search walks at most "
                f"{MAX_GRID_POINTS:,} (use sampler=random or tpe for a larger space)"
            )
        if self.resolved_sampler() == "grid" and self.n_trials > space.grid_size:
            raise ConfigError(
                f"n_trials={self.n_trials} is more than the {space.grid_size} points of the {space.name!r} grid"
            )
        if self.is_multi_objective() and self.pruner != "none":
            raise ConfigError(
                f"pruner={self.pruner!r} cannot prune objective=accuracy_and_time: Optuna's pruners judge one "
                "objective and this study has two; use pruner=none (every trial trains all its epochs)"
            )
        self._check_largest_trial(space)
        scheme = self.resolved_storage().partition(":")[0].partition("+")[0]
        if scheme not in STORAGE_SCHEMES or "://" not in self.resolved_storage():
            raise ConfigError(
                f"storage={self.storage!r} is not an Optuna storage URL such as {DEFAULT_SEARCH_STORAGE} "
                "or postgresql://user:password@host:5432/database"
            )

    def trial_config(self, values: dict[str, Any]) -> DenseRunConfig:
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
                epochs=self.epochs,
                seed=self.seed,
            ),
            data=DataConfig(seed=self.seed, max_train_examples=self.max_train_examples),
        )

    def _check_largest_trial(self, space: SearchSpace) -> None:
        """Builds the trial of the space's largest values, so that a value the ``dense`` flags would
        refuse (a network over the size cap, a batch larger than the data) is refused now, before
        the study or any run exists, rather than by the first trial that draws it."""
        largest = space_corner(space, largest=True)
        try:
            self.trial_config(largest)
        except ConfigError as error:
            varied = ", ".join(f"{name}={int(largest[name])}" for name in ("units", "batch_size"))
            raise ConfigError(f"space {space.source}: its largest trial ({varied}) cannot run: {error}") from None

    def is_multi_objective(self) -> bool:
        return self.objective == "accuracy_and_time"

    def directions(self) -> list[str]:
        """The Optuna study's directions: validation accuracy up, and the cost down if there is one."""
        return ["maximize", "minimize"] if self.is_multi_objective() else ["maximize"]

    def search_space(self) -> SearchSpace:
        return load_space(self.space)

    def resolved_sampler(self) -> str:
        return self.sampler or self.search_space().default_sampler

    def resolved_n_trials(self) -> int:
        if self.n_trials:
            return self.n_trials
        return self.search_space().grid_size if self.resolved_sampler() == "grid" else DEFAULT_RANDOM_TRIALS

    def resolved_study_name(self) -> str:
        if self.study_name:
            return self.study_name
        space = self.search_space()
        suffix = "" if self.resolved_sampler() == space.default_sampler else f"-{self.resolved_sampler()}"
        if self.is_multi_objective():
            suffix += f"-pareto-{self.cost}"
        return f"search-{space.name}{suffix}"

    def resolved_storage(self) -> str:
        return self.storage or DEFAULT_SEARCH_STORAGE
