"""Hostile or oversized input files and values: each refused in one short line, before any work."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from conftest import PROJECT_DIR, run_script

from harness.servers import python_env
from mnist_mlflow.config import ConfigError, DenseRunConfig
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_spaces import MAX_GRID_POINTS, MAX_SPACE_FILE_BYTES

SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
CNN = str(PROJECT_DIR / "entrypoints" / "cnn.py")

# Nine levels of nine aliases: 463 bytes that PyYAML would expand into 9**8 strings.
BOMB = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefg", "bcdefgh")),
    ]
)


@pytest.mark.parametrize(
    "where", ["name: *h", "sampler: *h", "fixed:\n  batch_size: *h", "parameters:\n  units: {low: *h, high: 64}"]
)
def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path, where):
    path = tmp_path / "bomb.yaml"
    text = BOMB + where + "\n"
    if not where.startswith("parameters"):
        text += "parameters:\n  units: [16]\n"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        SearchConfig(space=str(path))
    assert time.perf_counter() - started < 0.5
    message = str(refused.value)
    assert "uses a YAML alias (*a) at line 2" in message and len(message) < 200


def test_the_search_entry_point_refuses_the_bomb_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "name: *h\nparameters:\n  units: [16]\n")
    result = run_script([sys.executable, SEARCH, "--space", str(path)], python_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: space={str(path)!r} uses a YAML alias (*a) at line 2; write each value out instead"
    ]


def test_long_values_are_cut_in_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(f"name: {'x' * 5000}!\nparameters:\n  units: [{', '.join(['1.5'] * 3000)}]\n")
    with pytest.raises(ConfigError) as refused:
        SearchConfig(space=str(path))
    assert len(str(refused.value)) < 300


def test_an_oversized_space_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("#" * (MAX_SPACE_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=f"a space file may hold at most {MAX_SPACE_FILE_BYTES}"):
        SearchConfig(space=str(path))


def test_a_grid_larger_than_the_limit_is_refused_before_any_work(tmp_path):
    path = tmp_path / "huge.yaml"
    values = ", ".join(str(number) for number in range(1, 1001))
    path.write_text(f"parameters:\n  units: [{values}]\n  batch_size: [{values}]\n")
    with pytest.raises(ConfigError) as refused:
        SearchConfig(space=str(path), n_trials=1)
    assert f"a grid of 1,000,000 points; a grid search walks at most {MAX_GRID_POINTS:,}" in str(refused.value)
    # The same space may still be sampled at random.
    assert SearchConfig(space=str(path), sampler="random").resolved_n_trials() == 50


def test_the_heatmap_of_the_largest_grid_has_a_sane_size():
    from mnist_mlflow import plots

    rows, columns = 100, 100  # MAX_GRID_POINTS
    figure = plots.heatmap_figure(
        "units", list(range(rows)), "batch_size", list(range(columns)), np.random.rand(rows, columns)
    )
    width, height = figure.get_size_inches()
    assert width <= plots.MAX_FIGURE_INCHES and height <= plots.MAX_FIGURE_INCHES
    assert len(figure.axes[0].texts) == 0 and len(figure.axes[0].get_xticks()) <= plots.MAX_TICK_LABELS
    plots.close(figure)


def test_a_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(ConfigError, match="batch_size=1000000000 is more than the 54,000 training examples"):
        DenseRunConfig.from_params({"batch_size": "1000000000"})
    with pytest.raises(ConfigError, match="batch_size=600 is more than the 500 training examples"):
        DenseRunConfig.from_params({"batch_size": "600", "max_train_examples": "500"})
    assert DenseRunConfig.from_params({"batch_size": "500", "max_train_examples": "500"}).training.batch_size == 500


@pytest.mark.parametrize("script", [DENSE, CNN])
def test_the_entry_points_refuse_an_enormous_batch_in_one_line(tmp_path, script):
    result = run_script([sys.executable, script, "--batch_size", "1000000000"], python_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: batch_size=1000000000 is more than the 54,000 training examples "
        "(validation_fraction=0.1, max_train_examples=0)"
    ]


def _runs_and_experiments(client):
    experiments = client.search_experiments(view_type=3)  # ViewType.ALL: deleted ones too
    runs = client.search_runs([experiment.experiment_id for experiment in experiments], run_view_type=3)
    return {experiment.experiment_id for experiment in experiments}, {run.info.run_id for run in runs}


# Each value stands for a flag that would refuse it: units for hidden_units (a whole number, the
# size cap), batch_size (no larger than the training set), learning_rate (positive and finite).
HOSTILE_SPACES = {
    "infinity": ("units: [.inf]", "units=inf is not a finite number"),
    "nan": ("units: [.nan]", "units=nan is not a finite number"),
    "huge-units": ("units: [100000000]", "its largest trial (units=100000000, batch_size=32) cannot run"),
    "huge-range": ("units: {low: 8, high: 100000000}", "more than the cap of 50,000,000"),
    "huge-float-range": ("units: {low: 8, high: 1.0e+8}", "more than the cap of 50,000,000"),
    "text-exponent": ("units: {low: 8, high: 1e8}", "units='1e8' is text to YAML, not a number"),
    "batch-beyond-data": ("batch_size: [64, 100000]", "batch_size=100000 is more than the 300 training examples"),
    "huge-whole-number": ("learning_rate: [1" + "0" * 400 + "]", "is out of range"),
    "deep-nesting": ("units: " + "[" * 60_000 + "]" * 60_000, "nests lists or mappings more than 8 deep"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(HOSTILE_SPACES))
def test_a_hostile_space_file_is_one_line_and_creates_no_study_and_no_run(tmp_path, tracking_uri, case):
    from mlflow import MlflowClient

    body, expected = HOSTILE_SPACES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(f"name: hostile\nparameters:\n  {body}\n")
    assert path.stat().st_size < MAX_SPACE_FILE_BYTES
    client = MlflowClient(tracking_uri)
    before = _runs_and_experiments(client)
    result = run_script(
        [sys.executable, SEARCH, "--space", str(path), "--epochs", "1", "--max_train_examples", "300"]
        + ["--n_trials", "1", "--register_as", ""],
        python_env(tracking_uri),
        cwd=tmp_path,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines[:3]
    # Nothing was created: no Optuna storage beside the file, no experiment and no run on the server.
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [path.name]
    assert _runs_and_experiments(client) == before


def test_deep_nesting_is_refused_in_well_under_a_second(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("parameters:\n  units: " + "[" * 60_000 + "]" * 60_000 + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="nests lists or mappings more than 8 deep at line 2"):
        SearchConfig(space=str(path))
    assert time.perf_counter() - started < 0.5
