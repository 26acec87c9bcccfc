"""The environment MLflow builds from conda.yaml: entry points under `mlflow run --env-manager uv`.

uv reads the same conda.yaml that `mlflow run` uses with conda, and builds the environment
through the package registry. MLflow keeps built environments (keyed by the expanded
requirements) under ~/.mlflow/envs, so the suite builds it once.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def mlflow_run_uv(entry_point: str, experiment: str, parameters: dict[str, str], tracking_uri: str, cwd):
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(PROJECT_DIR),
        "-e",
        entry_point,
        "--env-manager",
        "uv",
        "--experiment-name",
        experiment,
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
        "search",
        "e2e-uv-search",
        {
            "space": str(space),
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "epochs": "1",
            "max_train_examples": "300",
            "register_as": "",
        },
        mlflow_server.url,
        tmp_path,
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
        "cnn",
        "e2e-uv-cnn",
        {"epochs": "1", "max_train_examples": "300", "register_as": ""},
        mlflow_server.url,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e-uv-cnn").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert_ran_in_a_built_environment(result)


def test_the_champion_serves_from_its_own_logged_requirements(mlflow_server, tmp_path, small_splits):
    """`mlflow models serve --env-manager uv` builds the model's own environment (its pinned
    requirements.txt and python_env.yaml, nothing from this project) and answers as the model does."""
    import mlflow
    import requests

    from harness.servers import ServerProcess, free_port

    model_name = "uv-served-cnn"
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME="e2e-uv-serve")
    trained = run_script(
        [
            sys.executable,
            "entrypoints/cnn.py",
            "--epochs",
            "1",
            "--max_train_examples",
            "1000",
            "--register_as",
            model_name,
        ],
        env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    promoted = run_script([sys.executable, "entrypoints/promote.py", "--model_name", model_name], env)
    assert promoted.returncode == 0, promoted.stderr[-3000:]

    model_uri = f"models:/{model_name}@champion"
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        requirements_file = mlflow.artifacts.download_artifacts(f"{model_uri}/requirements.txt", dst_path=str(tmp_path))
        in_process = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    requirements = sorted(line.split("==")[0] for line in open(requirements_file).read().split() if line)
    assert requirements == ["keras", "mlflow", "numpy", "tensorflow"]
    assert all("==" in line for line in open(requirements_file).read().split())

    images = small_splits.test_images[:200].astype(np.float32)
    expected = np.asarray(in_process.predict(images.tolist()))
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "uv",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # The first build of the model's environment downloads TensorFlow: allow it time.
    server = ServerProcess(command, port, tmp_path / "serve", "/ping", env=python_env(mlflow_server.url)).start(
        timeout_s=1200
    )
    try:
        response = requests.post(server.url + "/invocations", json={"inputs": images.tolist()}, timeout=120)
    finally:
        server.stop()
    assert response.status_code == 200, response.text[:500]
    served = np.asarray(response.json()["predictions"])
    assert served.shape == (200, 10)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # The server ran in the model's environment, built under MLflow's envs folder.
    assert "/envs/" in (tmp_path / "serve" / f"server-{port}.log").read_text()
