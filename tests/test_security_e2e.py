"""Credentials and secrets against real servers: MLflow's basic-auth tracking server and a
PostgreSQL that requires a password. Wrong or missing credentials are one line before any data;
no password is ever recorded or printed by the project."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import PROJECT_DIR, RUN_AND_REPORT_IMPORTS, run_script
from mlflow.tracking import MlflowClient
from test_reliability_e2e import DENSE, PROMOTE, RECONCILE, SEARCH, TWO_POINT_GRID, experiment_runs

from harness.servers import PostgresServer, python_env, tracking_server

pytestmark = pytest.mark.e2e

ADMIN_PASSWORD = "tracking-S3cret-e2e"
PG_PASSWORD = "pg-S3cret-e2e"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """MLflow's basic-auth server: every request must log in as admin."""
    with tracking_server(tmp_path_factory.mktemp("auth_server"), admin_password=ADMIN_PASSWORD) as server:
        yield server


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


@pytest.mark.parametrize("credentials", ["wrong", "missing"])
def test_wrong_or_missing_credentials_are_one_line_before_any_data(auth_server, credentials, tmp_path):
    env = python_env(auth_server.url, MLFLOW_EXPERIMENT_NAME="e2e-auth")
    if credentials == "wrong":
        env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="not-the-password")
    result = run_script(
        [sys.executable, "-c", RUN_AND_REPORT_IMPORTS, DENSE, "--epochs", "1", "--max_train_examples", "500"],
        env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the MLflow tracking server at {auth_server.url} refused the credentials (HTTP 401): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server"
    )
    assert "Traceback" not in result.stderr and "MLflow run" not in result.stdout and "Preparing" not in result.stdout
    assert "tensorflow imported: False" in result.stdout

    # promote says the same, never "no registered model".
    promote = run_script([sys.executable, PROMOTE, "--model_name", "mnist-cnn"], env, cwd=tmp_path)
    assert promote.returncode == 2 and "refused the credentials (HTTP 401)" in promote.stderr
    assert "no registered model" not in promote.stderr

    # A search with wrong credentials writes nothing to its study storage.
    storage = tmp_path / "optuna.db"
    search = run_script(
        [
            sys.executable,
            "-c",
            RUN_AND_REPORT_IMPORTS,
            SEARCH,
            "--space",
            "grid",
            "--storage",
            f"sqlite:///{storage}",
            "--epochs",
            "1",
        ],
        env,
        cwd=tmp_path,
    )
    assert search.returncode == 2 and "refused the credentials (HTTP 401)" in search.stderr
    assert "tensorflow imported: False" in search.stdout
    assert not storage.exists()


def test_a_search_recovers_a_study_left_without_parent_at_once(auth_server, tmp_path):
    """A study whose creator stopped before recording its parent run gets one from the next worker."""
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  units: [16]\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="orphan", direction="maximize")
    env = python_env(
        auth_server.url,
        MLFLOW_EXPERIMENT_NAME="e2e-orphan",
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD,
    )
    started = time.monotonic()
    result = run_script(
        [
            sys.executable,
            SEARCH,
            "--space",
            str(space),
            "--storage",
            storage,
            "--study_name",
            "orphan",
            "--epochs",
            "1",
            "--max_train_examples",
            "500",
            "--register_as",
            "",
        ],
        env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Study orphan has no parent run recorded" in result.stdout
    study = optuna.load_study(study_name="orphan", storage=storage)
    parent = MlflowClient(with_credentials(auth_server.url, "admin", ADMIN_PASSWORD)).get_run(
        study.user_attrs["mlflow_parent_run_id"]
    )
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 1
    # The recovery did not wait for the old 60 s.
    assert time.monotonic() - started < 120


def _everything_recorded(client: MlflowClient, experiment: str, download_to: Path) -> tuple[list[str], str]:
    """Every param, tag and metric key of the experiment's runs, and the text of all their artifacts."""
    import mlflow

    texts: list[str] = []
    for run in experiment_runs(client, experiment):
        texts.append(json.dumps({"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name}))
        target = download_to / run.info.run_id
        target.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(target), tracking_uri=client.tracking_uri
        )
        for path in target.rglob("*"):
            if path.is_file():
                texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    return texts, "\n".join(texts)


def test_no_password_is_recorded_or_printed(auth_server, tmp_path):
    """A search on a PostgreSQL that requires a password, tracked on a basic-auth server.

    Worker 1 is a careless `mlflow run` with the database password inside -P storage and the
    tracking password inside MLFLOW_TRACKING_URI; worker 2 passes them as documented
    (PGPASSWORD, MLFLOW_TRACKING_USERNAME/PASSWORD). Neither secret may appear in anything
    the project writes or prints: only the parameter MLflow itself logged from -P holds it.
    """
    experiment = "e2e-secrets"
    space = tmp_path / "space.yaml"
    space.write_text(TWO_POINT_GRID)
    with PostgresServer(password=PG_PASSWORD) as postgres:
        careless_storage = postgres.url.replace("search@", f"search:{PG_PASSWORD}@")
        careless_env = python_env(with_credentials(auth_server.url, "admin", ADMIN_PASSWORD))
        careless = run_script(
            [
                sys.executable,
                "-m",
                "mlflow",
                "run",
                str(PROJECT_DIR),
                "-e",
                "search",
                "--env-manager",
                "local",
                "--experiment-name",
                experiment,
                "-P",
                f"space={space}",
                "-P",
                f"storage={careless_storage}",
                "-P",
                "study_name=secrets",
                "-P",
                "epochs=1",
                "-P",
                "max_train_examples=500",
                "-P",
                "register_as=secrets-model",
            ],
            careless_env,
            cwd=tmp_path,
        )
        assert careless.returncode == 0, careless.stdout[-3000:] + careless.stderr[-3000:]
        assert "warning: mlflow run recorded a password given in -P storage" in careless.stdout

        careful_env = python_env(
            auth_server.url,
            MLFLOW_EXPERIMENT_NAME=experiment,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD,
            **postgres.client_env(),
        )
        # Another way of logging in to the same server is not another server.
        careful = run_script(
            [
                sys.executable,
                SEARCH,
                "--space",
                str(space),
                "--storage",
                postgres.url,
                "--study_name",
                "secrets",
                "--epochs",
                "1",
                "--max_train_examples",
                "500",
                "--register_as",
                "secrets-model",
            ],
            careful_env,
            cwd=tmp_path,
        )
        assert careful.returncode == 0, careful.stdout[-3000:] + careful.stderr[-3000:]
        assert "Joined search secrets" in careful.stdout

        study = optuna.load_study(
            study_name="secrets", storage=postgres.url.replace("search@", f"search:{PG_PASSWORD}@")
        )
        parent_id = study.user_attrs["mlflow_parent_run_id"]
        study_text = json.dumps(
            [study.user_attrs] + [[trial.user_attrs, trial.system_attrs, trial.params] for trial in study.trials],
            default=str,
        )

    client = MlflowClient(with_credentials(auth_server.url, "admin", ADMIN_PASSWORD))
    runs = experiment_runs(client, experiment)
    launcher = [run for run in runs if run.data.params.get("storage") == careless_storage]
    assert len(launcher) == 1, "MLflow itself records the -P value on the launcher's run"
    assert parent_id != launcher[0].info.run_id, "the shared parent must not be the run that holds the password"
    assert launcher[0].data.tags["resumed_study_run_id"] == parent_id
    assert client.get_run(parent_id).data.params["storage"] == postgres.url.replace("search@", "search:***@")

    texts, _ = _everything_recorded(client, experiment, tmp_path / "artifacts")
    without_mlflows_own = [
        text.replace(json.dumps(careless_storage)[1:-1], "<mlflow's own -P record>") for text in texts
    ]
    for secret in (PG_PASSWORD, ADMIN_PASSWORD):
        assert not [text[:300] for text in without_mlflows_own if secret in text]
        assert secret not in study_text
        for output in (careless.stdout, careless.stderr, careful.stdout, careful.stderr):
            # MLflow's launcher prints the command it runs (-P values and all) and, at its end, its
            # own run's URL built from MLFLOW_TRACKING_URI: those lines are MLflow's, not the project's.
            launcher_id = launcher[0].info.run_id
            ours = [
                line
                for line in output.splitlines()
                if "INFO mlflow.projects" not in line
                and not (
                    line.startswith(("🏃 View run", "🧪 View experiment"))
                    and (launcher_id in line or "/runs/" not in line)
                )
            ]
            assert not [line for line in ours if secret in line]
    assert len(runs) >= 4  # launcher, parent, two trials


def test_reconcile_by_a_read_only_user_is_one_line(auth_server, tmp_path):
    """A reader may look at runs but not close them: one line naming the refusal, not a traceback."""
    import requests
    from mlflow.tracking import MlflowClient

    from mnist_mlflow import lifecycle

    admin = requests.auth.HTTPBasicAuth("admin", ADMIN_PASSWORD)
    created = requests.post(
        f"{auth_server.url}/api/2.0/mlflow/users/create",
        json={"username": "reader", "password": "reader-Pass-1234"},
        auth=admin,
        timeout=30,
    )
    assert created.status_code == 200, created.text
    # A RUNNING run whose process is gone, in this very namespace and boot: reconcile would close it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = MlflowClient(with_credentials(auth_server.url, "admin", ADMIN_PASSWORD))
    experiment_id = client.create_experiment("e2e-read-only")
    identity = {**lifecycle.process_identity(), lifecycle.PID_TAG: str(dead.pid)}
    run = client.create_run(experiment_id, tags=identity)
    env = python_env(auth_server.url, MLFLOW_TRACKING_USERNAME="reader", MLFLOW_TRACKING_PASSWORD="reader-Pass-1234")
    result = run_script([sys.executable, RECONCILE, "--experiment", "e2e-read-only"], env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: the MLflow tracking server at {auth_server.url} refused the request (HTTP 403): the account in "
        "MLFLOW_TRACKING_USERNAME lacks the permission; ask the server's admin to grant it"
    ]
    assert "reader-Pass" not in result.stdout + result.stderr
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
