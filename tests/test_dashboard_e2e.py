"""optuna-dashboard on a search's PostgreSQL study, as docs/search.md tells users to start it:
a real search writes the study, a real dashboard serves it on loopback, its API reads it back."""

from __future__ import annotations

import shutil
import sys
import uuid

import optuna
import pytest
import requests
from conftest import PROJECT_DIR, run_script

from harness.servers import ServerProcess, free_port, python_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")


def test_optuna_dashboard_serves_a_search_s_postgresql_study(tmp_path, tracking_uri, postgres):
    dashboard = shutil.which("optuna-dashboard", path=str(python_env()["PATH"]))
    assert dashboard, "optuna-dashboard comes with the dev extra"
    (tmp_path / "space.yaml").write_text("parameters:\n  units: [8, 16]\n")
    study_name = f"dashboard-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, SEARCH, "--space", "space.yaml", "--epochs", "1", "--max_train_examples", "300"]
    command += ["--storage", postgres.url, "--study_name", study_name, "--register_as", ""]
    env = python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME=study_name)
    searched = run_script(command, env, cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    expected = optuna.load_study(study_name=study_name, storage=postgres.url)

    port = free_port()
    server = ServerProcess(
        [dashboard, postgres.url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        port,
        tmp_path / "dashboard",
        "/api/studies",
        env=python_env(),
    )
    with server:
        studies = requests.get(f"{server.url}/api/studies", timeout=30).json()["study_summaries"]
        (summary,) = [study for study in studies if study["study_name"] == study_name]
        detail = requests.get(f"{server.url}/api/studies/{summary['study_id']}", params={"after": 0}, timeout=30)
        detail.raise_for_status()
        trials = detail.json()["trials"]
    assert sorted((trial["number"], trial["state"]) for trial in trials) == [(0, "Complete"), (1, "Complete")]
    assert sorted(trial["values"][0] for trial in trials) == sorted(trial.value for trial in expected.trials)
    # The project names the objective for Optuna's plots and the dashboard.
    assert detail.json().get("objective_names") == ["val_accuracy"]
