"""When the world fails mid-run, against real parts: a killed `mlflow server`, a killed PostgreSQL,
a full filesystem (a small tmpfs), and a neighbouring PID namespace.

Each test makes the failure happen to a real entry point while it works, then checks the one
line it ends with, its exit status, and the state its runs are left in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient
from test_reliability_e2e import wait_for

from harness.servers import python_env, tracking_server

pytestmark = pytest.mark.e2e

DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
RECONCILE = str(PROJECT_DIR / "entrypoints" / "reconcile.py")
# Long enough to be caught mid-training, short epochs so that the steps are many.
LONG_DENSE = [DENSE, "--epochs", "300", "--max_train_examples", "300", "--batch_size", "100"]
# The tests' server timeout: the run must stop within it (plus one watch interval and a retry).
TIMEOUT_S = 6


def _env(server_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {
        "MNIST_MLFLOW_SERVER_TIMEOUT_S": str(TIMEOUT_S),
        "MNIST_MLFLOW_SPOOL_DIR": str(tmp_path / "spool"),
        "MLFLOW_EXPERIMENT_NAME": "mid-run",
    }
    return python_env(server_url, **{**settings, **extra})


def _one_run(client: MlflowClient, experiment: str = "mid-run"):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0] if len(runs) == 1 else None


def _epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, "val_accuracy"))


def _error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's and absl's start-up chatter."""
    noise = ("WARNING: All log messages", "I0000", "W0000", "oneDNN", "cuda", "E0000")
    return [line for line in stderr.splitlines() if line.strip() and not any(word in line for word in noise)]


def test_a_killed_tracking_server_stops_the_run_in_bounded_time_and_loses_no_metric(tmp_path):
    root = tmp_path / "server"
    server = tracking_server(root).start()
    client = MlflowClient(server.url)
    env = _env(server.url, tmp_path)
    process = subprocess.Popen(
        [sys.executable, *LONG_DENSE], cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        run = wait_for(lambda: _one_run(client), "the run to start", process=process)
        wait_for(lambda: len(_epochs_logged(client, run.info.run_id)) >= 3, "three epochs", process=process)
        server.kill()
        killed_at = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        process.kill()
    lines = _error_lines(stderr)
    # One line, naming the server without credentials, within the timeout and a retry or two.
    assert process.returncode == 69, (stdout[-2000:], stderr[-3000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: the MLflow tracking server at {server.url} ")
    assert "spool" in lines[0] and run.info.run_id in lines[0]
    assert stopped_after < TIMEOUT_S + 40, stopped_after
    spooled = json.loads((tmp_path / "spool" / f"{run.info.run_id}.json").read_text())
    trained_epochs = sorted(int(step) for step in spooled["metrics"]["val_accuracy"])
    assert len(trained_epochs) > 3

    # The server comes back on the same store and port: the next command delivers what was lost.
    server = tracking_server(root, port=server.port).start()
    try:
        result = run_script([sys.executable, RECONCILE], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Run {run.info.run_id} had stopped when its tracking server was unreachable" in result.stdout
        after = client.get_run(run.info.run_id)
        # Never FINISHED as if complete: FAILED, with why, and every trained epoch's metrics.
        assert after.info.status == "FAILED"
        assert "did not answer" in after.data.tags["failed_reason"] or "has not answered" in after.data.tags["failed_reason"]
        assert _epochs_logged(client, run.info.run_id) == trained_epochs
        assert "val_accuracy" in after.data.tags["metrics_delivered_late"]
        assert not (tmp_path / "spool" / f"{run.info.run_id}.json").exists()
    finally:
        server.stop()


def test_metrics_the_server_missed_while_it_was_down_are_sent_again_when_it_returns(tmp_path):
    """A server down for less than the run's timeout, but longer than MLflow's retries of a
    background batch: the run goes on, and the values MLflow dropped are sent again at the end."""
    root = tmp_path / "server"
    server = tracking_server(root).start()
    client = MlflowClient(server.url)
    env = _env(server.url, tmp_path, MNIST_MLFLOW_SERVER_TIMEOUT_S="60")
    command = [DENSE, "--epochs", "120", "--max_train_examples", "300", "--batch_size", "100"]
    process = subprocess.Popen(
        [sys.executable, *command], cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        run = wait_for(lambda: _one_run(client), "the run to start", process=process)
        wait_for(lambda: len(_epochs_logged(client, run.info.run_id)) >= 2, "two epochs", process=process)
        server.kill()
        time.sleep(20)
        server = tracking_server(root, port=server.port).start()
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        server.stop()
    assert process.returncode == 0, (stdout[-2000:], stderr[-3000:])
    server = tracking_server(root, port=server.port).start()
    try:
        after = client.get_run(run.info.run_id)
        assert after.info.status == "FINISHED"
        assert _epochs_logged(client, run.info.run_id) == list(range(120))
        assert "val_accuracy" in after.data.tags["metrics_delivered_late"]
        assert "The tracking server had not taken" in stdout
    finally:
        server.stop()
