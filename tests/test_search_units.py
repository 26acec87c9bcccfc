"""Search spaces, search settings and the parts of a search that need no server (fast)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest

from mnist_mlflow.config import ConfigError
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_spaces import GRID_SPACE, RANDOM_SPACE, load_space


def write(tmp_path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_built_in_spaces_are_those_of_experiments_section_4():
    assert GRID_SPACE.grid() == {"dropout": [0.0, 0.1, 0.3, 0.5, 0.8], "units": [16, 32, 64, 128, 256]}
    assert GRID_SPACE.grid_size == 25
    assert GRID_SPACE.all_fixed() == {"activation": "relu", "batch_size": 32, "learning_rate": 0.001}
    assert RANDOM_SPACE.grid()["learning_rate"] == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert RANDOM_SPACE.grid()["activation"] == ["relu", "elu", "sigmoid", "tanh"]
    assert RANDOM_SPACE.grid_size == 5 * 5 * 5 * 4 * 6


def test_defaults_follow_the_space():
    grid = SearchConfig(space="grid")
    assert (grid.resolved_sampler(), grid.resolved_n_trials(), grid.resolved_study_name()) == (
        "grid",
        25,
        "search-grid",
    )
    random = SearchConfig(space="random")
    assert (random.resolved_sampler(), random.resolved_n_trials(), random.resolved_study_name()) == (
        "random",
        50,
        "search-random",
    )
    tpe = SearchConfig(space="random", sampler="tpe")
    assert tpe.resolved_study_name() == "search-random-tpe"
    assert SearchConfig(space="grid", sampler="random").resolved_n_trials() == 50


def test_yaml_space_with_choices_and_range(tmp_path):
    path = write(
        tmp_path,
        "name: mine\nfixed:\n  batch_size: 64\nparameters:\n  units: [16, 32]\n"
        "  learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n",
    )
    space = load_space(path)
    assert space.name == "mine" and not space.is_grid and space.default_sampler == "tpe"
    assert space.all_fixed() == {"dropout": 0.0, "activation": "relu", "batch_size": 64}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = space.suggest(trial)
    assert values["units"] in (16, 32) and 1e-4 <= values["learning_rate"] <= 1e-2 and values["batch_size"] == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("parameters: [units", "is not valid YAML at line"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("parameters:\n  neurons: [1, 2]\n", "unknown hyperparameter 'neurons'"),
        ("parameters:\n  dropout: [0.1, 1.2]\n", "dropout=1.2 must lie in [0, 1)"),
        ("parameters:\n  units: []\n", "must be a non-empty list"),
        ("parameters:\n  units: [16, 16]\n", "lists a value twice"),
        ("parameters:\n  activation: [relu, swishy]\n", "activation='swishy' is not one of"),
        ("parameters:\n  units: [8]\nfixed:\n  units: 8\n", "units is both varied and fixed"),
        ("parameters:\n  units: [8]\nsampler: annealing\n", "sampler='annealing' is not one of"),
        ("parameters:\n  units: [8]\nsteps: 3\n", "unknown key(s) steps"),
        ("parameters:\n  learning_rate: {low: 0.1, high: 0.01}\n", "needs low < high"),
        ("{}\n", "'parameters' must map"),
    ],
)
def test_malformed_space_files_name_the_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_space(path)
    assert expected in str(error.value)


def test_space_argument_that_is_neither_built_in_nor_a_file(tmp_path):
    with pytest.raises(ConfigError, match="space='grids' is neither a built-in space"):
        load_space("grids")
    with pytest.raises(ConfigError, match="no such file"):
        load_space(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"sampler": "annealing"}, "sampler='annealing' is not one of: grid, random, tpe"),
        ({"pruner": "asha"}, "pruner='asha' is not one of: none, median, successive_halving, hyperband"),
        ({"objective": "speed"}, "objective='speed' is not one of: accuracy, accuracy_and_time"),
        ({"cost": "flops"}, "cost='flops' is not one of: seconds_per_epoch, parameters"),
        ({"pick_within": "1.5"}, "pick_within='1.5' must lie in [0, 1]"),
        ({"objective": "accuracy_and_time", "pruner": "hyperband"}, "pruner='hyperband' cannot prune objective"),
        ({"n_trials": "30"}, "n_trials=30 is more than the 25 points"),
        ({"n_trials": "-1"}, "n_trials='-1' must be at least 0"),
        ({"epochs": "0"}, "epochs='0' must be at least 1"),
        ({"storage": "redis://localhost/0"}, "storage='redis://localhost/0' is not an Optuna storage URL"),
        ({"storage": "optuna.db"}, "storage='optuna.db' is not an Optuna storage URL"),
        ({"study_name": "my study"}, "study_name='my study' may hold"),
        ({"register_as": "a/b"}, "register_as='a/b' may hold"),
    ],
)
def test_bad_search_parameters_are_refused(params, expected):
    with pytest.raises(ConfigError) as error:
        SearchConfig.from_params(params)
    assert expected in str(error.value)


def test_grid_sampler_refuses_a_space_with_ranges(tmp_path):
    path = write(tmp_path, "parameters:\n  learning_rate: {low: 0.001, high: 0.1}\n")
    with pytest.raises(ConfigError, match="sampler=grid needs a list of values"):
        SearchConfig(space=path, sampler="grid")


def _drawn(sampler, trials: int) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda trial: RANDOM_SPACE.suggest(trial)["units"] / 1000, n_trials=trials)
    return [trial.params for trial in study.trials]


@pytest.mark.parametrize("name", ["random", "tpe"])
def test_trial_k_draws_the_same_parameters_in_any_study_with_the_same_seed(name):
    from mnist_mlflow.studies.search_sampling import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = _drawn(make_sampler(name, RANDOM_SPACE, seed=3), 12)
    # A fresh sampler (another worker, a resumed session) gives trial k the same values ...
    assert _drawn(make_sampler(name, RANDOM_SPACE, seed=3), 12) == first
    # ... the trials of one study are not all alike, and another seed draws other values.
    assert len({tuple(sorted(params.items())) for params in first}) > 6
    assert _drawn(make_sampler(name, RANDOM_SPACE, seed=4), 12) != first


def test_grid_heatmap_places_each_finished_trial_in_its_cell():
    from mnist_mlflow.studies.search_summary import grid_heatmap

    table = pd.DataFrame(
        [
            {"trial": 0, "state": "COMPLETE", "dropout": 0.1, "units": 64, "val_accuracy": 0.97},
            {"trial": 1, "state": "COMPLETE", "dropout": 0.8, "units": 16, "val_accuracy": 0.80},
            {"trial": 2, "state": "FAIL", "dropout": 0.0, "units": 16, "val_accuracy": math.nan},
        ]
    )
    row_name, rows, column_name, columns, matrix = grid_heatmap(table, GRID_SPACE)
    assert (row_name, column_name) == ("dropout", "units")
    assert matrix[rows.index(0.1), columns.index(64)] == pytest.approx(0.97)
    assert matrix[rows.index(0.8), columns.index(16)] == pytest.approx(0.80)
    assert np.isfinite(matrix).sum() == 2
    assert grid_heatmap(table, RANDOM_SPACE) is None


def test_heartbeat_settings_come_from_the_environment_and_are_checked(monkeypatch):
    from mnist_mlflow.config import UserInputError
    from mnist_mlflow.studies import search_workers as search

    monkeypatch.delenv(search.HEARTBEAT_ENV, raising=False)
    monkeypatch.delenv(search.GRACE_ENV, raising=False)
    assert search.heartbeat_settings() == (search.HEARTBEAT_INTERVAL_S, search.GRACE_PERIOD_S) == (5, 20)
    monkeypatch.setenv(search.HEARTBEAT_ENV, "2")
    monkeypatch.setenv(search.GRACE_ENV, "8")
    assert search.heartbeat_settings() == (2, 8)
    monkeypatch.setenv(search.GRACE_ENV, "3")
    with pytest.raises(UserInputError, match="MNIST_MLFLOW_HEARTBEAT_GRACE_S=3 must be at least twice"):
        search.heartbeat_settings()
    monkeypatch.setenv(search.HEARTBEAT_ENV, "soon")
    with pytest.raises(UserInputError, match="MNIST_MLFLOW_HEARTBEAT_INTERVAL_S='soon' is not a whole number"):
        search.heartbeat_settings()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("none", optuna.pruners.NopPruner),
        ("median", optuna.pruners.MedianPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
    ],
)
def test_each_pruner_name_makes_optuna_s_pruner(name, kind):
    from mnist_mlflow.studies.search_sampling import make_pruner

    assert isinstance(make_pruner(name, epochs=10), kind)


def test_a_pareto_study_has_its_own_default_name_and_two_directions():
    config = SearchConfig(space="random", objective="accuracy_and_time", cost="parameters")
    assert config.resolved_study_name() == "search-random-pareto-parameters"
    assert config.directions() == ["maximize", "minimize"]
    assert SearchConfig(space="random").directions() == ["maximize"]


def _front_table(rows):
    return pd.DataFrame(
        [
            {"trial": number, "state": state, "val_accuracy": accuracy, "parameters": cost, "note": note}
            for number, state, accuracy, cost, note in rows
        ]
    )


def test_pareto_front_keeps_only_undominated_finished_trials_and_the_rule_picks_the_cheapest_near_the_best():
    from mnist_mlflow.studies.search_summary import choose_from_front, pareto_front

    table = _front_table(
        [
            (0, "COMPLETE", 0.90, 1000, ""),
            (1, "COMPLETE", 0.95, 5000, ""),
            (2, "COMPLETE", 0.94, 2000, ""),  # within 0.01 of the best, and cheaper: the choice
            (3, "COMPLETE", 0.93, 6000, ""),  # dominated by 1 and 2
            (4, "PRUNED", 0.99, 10, ""),  # not finished: never on the front
            (5, "COMPLETE", 0.95, 5000, "same as trial 1"),  # trial 1 again, not a second point
            (6, "COMPLETE", 0.90, 1000, ""),  # equal to trial 0: both stay, neither dominates
            (7, "FAIL", float("nan"), float("nan"), ""),
        ]
    )
    front = pareto_front(table, "parameters")
    assert list(front["trial"]) == [0, 6, 2, 1]
    assert choose_from_front(front, "parameters", 0.01)["trial"] == 2
    assert choose_from_front(front, "parameters", 0.0)["trial"] == 1
    # A wide margin takes the cheapest of all; of equal cost and accuracy, the earlier trial.
    assert choose_from_front(front, "parameters", 0.2)["trial"] == 0


def test_joining_a_study_with_other_directions_is_refused(tmp_path):
    from mnist_mlflow.config import UserInputError
    from mnist_mlflow.studies.search_workers import check_joinable

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s", direction="maximize")
    with pytest.raises(UserInputError, match=r"optimises \['maximize'\], not \['maximize', 'minimize'\]"):
        check_joinable(study, {}, {}, "http://127.0.0.1:5000", ["maximize", "minimize"])
    check_joinable(study, {}, {}, "http://127.0.0.1:5000", ["maximize"])


def test_optuna_s_warning_for_an_interrupted_trial_keeps_its_line_and_drops_the_traceback():
    import logging
    import sys

    from mnist_mlflow.lifecycle import Terminated
    from mnist_mlflow.studies.search_workers import INTERRUPTION_FILTER

    def record_for(error):
        try:
            raise error
        except BaseException:
            return logging.LogRecord("optuna", logging.WARNING, __file__, 1, "Trial 4 failed", None, sys.exc_info())

    interrupted = record_for(Terminated("terminated by SIGTERM"))
    assert INTERRUPTION_FILTER.filter(interrupted) and interrupted.exc_info is None
    crashed = record_for(ValueError("a real bug"))
    assert INTERRUPTION_FILTER.filter(crashed) and crashed.exc_info is not None
    assert INTERRUPTION_FILTER in logging.getLogger("optuna.study._optimize").filters


def test_tpe_s_settings_are_stated_so_optuna_4_and_5_draw_alike_and_are_recorded():
    import warnings

    from mnist_mlflow.studies.search_sampling import TPE_SETTINGS, make_sampler, sampler_settings
    from mnist_mlflow.studies.search_spaces import RANDOM_SPACE

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna 4.x's ExperimentalWarning is handled, not shown.
        sampler = make_sampler("tpe", RANDOM_SPACE, 0)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        trial = study.ask()
        tpe = sampler._for(trial)
    assert (tpe._multivariate, tpe._constant_liar, tpe._group) == (True, True, False)
    assert tpe._parzen_estimator_parameters is not None and tpe._n_startup_trials == 10
    recorded = sampler_settings("tpe")
    assert recorded["optuna_version"] == optuna.__version__
    stated = {key.removeprefix("tpe_"): value for key, value in recorded.items() if key.startswith("tpe_")}
    assert stated == TPE_SETTINGS
    assert sampler_settings("random") == {"optuna_version": optuna.__version__}
