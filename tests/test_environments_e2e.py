"""The environment MLflow builds from conda.yaml: entry points under `mlflow run --env-manager uv`.

uv reads the same conda.yaml that `mlflow run` uses with conda, and builds the environment
through the package registry. MLflow keeps built environments (keyed by the expanded
requirements) under ~/.mlflow/envs, so the suite builds it once.
"""

from __future__ import annotations

import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT_DIR, run_script
from mnist_mlflow.processes import python_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def mlflow_run_uv(entry_point: str, experiment: str, parameters: dict[str, str], tracking_uri: str, cwd):
    command = [
        sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", "uv",
        "--experiment-name", experiment,
    ]
    for name, value in parameters.items():
        command += ["-P", f"{name}={value}"]
    return run_script(command, python_env(tracking_uri), timeout=1500, cwd=cwd)


def assert_ran_in_a_built_environment(result) -> None:
    """The launcher ran the entry point in an environment of its own under MLflow's envs folder."""
    commands = [line for line in result.stderr.splitlines() if "Running command" in line]
    assert commands and "/envs/mlflow-" in commands[0] and "/bin/activate" in commands[0], commands


def test_search_runs_in_the_environment_built_from_conda_yaml(mlflow_server, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  units: [8, 16]\n")
    result = mlflow_run_uv(
        "search", "e2e-uv-search",
        {"space": str(space), "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "epochs": "1", "max_train_examples": "300", "register_as": ""},
        mlflow_server.url, tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 trials trained by this worker" in result.stdout
    assert_ran_in_a_built_environment(result)
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("e2e-uv-search").experiment_id])
    assert len([run for run in runs if run.data.tags.get("study_role") == "child"]) == 2
    assert all(run.info.status == "FINISHED" for run in runs)


def test_cnn_runs_in_the_environment_built_from_conda_yaml(mlflow_server, tmp_path):
    result = mlflow_run_uv(
        "cnn", "e2e-uv-cnn", {"epochs": "1", "max_train_examples": "300", "register_as": ""}, mlflow_server.url, tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e-uv-cnn").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert_ran_in_a_built_environment(result)
