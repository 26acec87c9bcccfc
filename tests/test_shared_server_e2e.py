"""The README's team set-up: a real `mlflow server` whose backend store is PostgreSQL, with
proxied artifacts (--artifacts-destination). A small study of dense runs, a CNN run and promote all work."""

from __future__ import annotations

import sys

import pytest
from conftest import run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env, tracking_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def postgres_tracking_server(postgres, tmp_path_factory):
    # MLflow's store through SQLAlchemy with psycopg 3, the driver the project installs.
    backend = postgres.create_database("mlflow_backend").replace("postgresql://", "postgresql+psycopg://")
    with tracking_server(tmp_path_factory.mktemp("pg_tracking"), backend_store_uri=backend) as server:
        yield server


def test_dense_study_and_promote_against_a_postgres_backed_server(postgres_tracking_server, tmp_path):
    url = postgres_tracking_server.url
    env = python_env(url, MLFLOW_EXPERIMENT_NAME="team")
    # The study's children are dense runs nested under a parent; the CNN is a top-level run.
    study = run_script(
        [
            sys.executable,
            "entrypoints/exercises.py",
            "--only",
            "baseline,1",
            "--epochs",
            "1",
            "--max_train_examples",
            "500",
        ],
        env,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    cnn = run_script(
        [
            sys.executable,
            "entrypoints/cnn.py",
            "--epochs",
            "1",
            "--max_train_examples",
            "500",
            "--register_as",
            "team-cnn",
        ],
        env,
    )
    assert cnn.returncode == 0, cnn.stderr[-3000:]
    promote = run_script([sys.executable, "entrypoints/promote.py", "--model_name", "team-cnn"], env)
    assert promote.returncode == 0 and "Alias 'champion' -> team-cnn version 1" in promote.stdout, promote.stderr[
        -3000:
    ]

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    # The parent, 2 children, the cnn, and promote's evaluation of the champion (its gate).
    assert len(runs) == 5 and {run.info.status for run in runs} == {"FINISHED"}
    (evaluation,) = [run for run in runs if run.data.tags.get("entry_point") == "promote"]
    assert evaluation.info.run_name == "evaluate-team-cnn-v1" and 0 <= evaluation.data.metrics["accuracy_score"] <= 1
    parent = [run for run in runs if run.data.tags.get("study_role") == "parent"][0]
    assert {item.path for item in client.list_artifacts(parent.info.run_id, "summary")} >= {"summary/exercises.json"}
    # Artifacts went through the server (proxied), into its --artifacts-destination folder.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list((postgres_tracking_server.root / "artifacts").rglob("exercises.json"))
    assert stored, "the summary table should be stored under the server's artifacts destination"
    assert client.get_model_version_by_alias("team-cnn", "champion").version == "1"
