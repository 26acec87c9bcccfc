"""Killed runs and trials resume from their last finished epoch and end bit for bit as the
runs left alone: real SIGKILL and SIGTERM, a real `mlflow server`, real search workers."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient
from test_reliability_e2e import signal_when

from harness.servers import python_env

pytestmark = pytest.mark.e2e

DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
CNN = str(PROJECT_DIR / "entrypoints" / "cnn.py")
SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
DENSE_ARGS = ["--epochs", "40", "--max_train_examples", "1000", "--dropout", "0.2"]
CNN_ARGS = [
    "--epochs",
    "8",
    "--max_train_examples",
    "600",
    "--filters",
    "4,8",
    "--dense_units",
    "16",
    "--batch_size",
    "50",
    "--register_as",
    "",
]

# MLflow samples system metrics every 10 s by default; these short runs would have none.
SAMPLE_EVERY_SECOND = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}


def _runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _checkpointed(client: MlflowClient, experiment: str, epoch: int):
    """The experiment's one RUNNING run once its checkpoint holds at least ``epoch``."""
    runs = [run for run in _runs(client, experiment) if run.info.status == "RUNNING"]
    if len(runs) == 1 and int(runs[0].data.tags.get("mnist_mlflow.checkpoint_epoch", "-1")) >= epoch:
        return runs[0]
    return None


def _child_checkpointed(client: MlflowClient, experiment: str, epoch: int):
    """A study child of the experiment whose checkpoint holds at least ``epoch``."""
    children = [run for run in _runs(client, experiment) if run.data.tags.get("study_role") == "child"]
    return next(
        (run for run in children if int(run.data.tags.get("mnist_mlflow.checkpoint_epoch", "-1")) >= epoch), None
    )


def _weights(client: MlflowClient, run_id: str) -> dict[str, np.ndarray]:
    """The run's last checkpoint's weights (the layers' and the optimizer's), by name."""
    folder = tempfile.mkdtemp()
    slot = client.get_run(run_id).data.tags["mnist_mlflow.checkpoint_slot"]
    path = client.download_artifacts(run_id, f"checkpoint/{slot}/latest.weights.h5", folder)
    arrays = {}
    with h5py.File(path) as file:
        file.visititems(
            lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


def _history(client: MlflowClient, run_id: str, key: str = "val_accuracy") -> list[tuple[int, float]]:
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


def _assert_same_result(client: MlflowClient, resumed: str, alone: str, epochs: int) -> None:
    history = _history(client, resumed)
    assert [step for step, _ in history] == list(range(epochs)), "each step exactly once"
    assert history == _history(client, alone)
    for key in ("loss", "val_loss"):
        assert _history(client, resumed, key) == _history(client, alone, key)
    mine, theirs = _weights(client, resumed), _weights(client, alone)
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert np.array_equal(mine[name], theirs[name]), name
    resumed_run, alone_run = client.get_run(resumed), client.get_run(alone)
    for metric in ("test_accuracy", "best_val_accuracy", "best_epoch"):
        assert resumed_run.data.metrics[metric] == alone_run.data.metrics[metric], metric


def _kill_and_resume(tmp_path, server_url, script, args, experiment, kill_signal, at_epoch):
    client = MlflowClient(server_url)
    env = python_env(server_url, MLFLOW_EXPERIMENT_NAME=experiment)
    process = subprocess.Popen(
        [sys.executable, script, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run, _ = signal_when(
        process, lambda: _checkpointed(client, experiment, at_epoch), f"epoch {at_epoch + 1}", kill_signal
    )
    killed_at = int(client.get_run(run.info.run_id).data.tags["mnist_mlflow.checkpoint_epoch"])
    result = run_script([sys.executable, script, *args], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming run {run.info.run_id} (resume 1) from its checkpoint after epoch {killed_at + 1}" in result.stdout
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.tags["resume_count"] == "1" and "after epoch" in after.data.tags["resumed_1"]
    # A FINISHED run carries no killed_reason: why it had stopped moved into the resume's record.
    assert "killed_reason" not in after.data.tags and "it had stopped: " in after.data.tags["resumed_1"]
    assert len(_runs(client, experiment)) == 1, "the same run, not a new one"
    return run.info.run_id, killed_at


def _alone(tmp_path, server_url, script, args, experiment, **settings: str) -> str:
    client = MlflowClient(server_url)
    env = python_env(server_url, MLFLOW_EXPERIMENT_NAME=experiment, **settings)
    result = run_script([sys.executable, script, *args], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs(client, experiment)
    return run.info.run_id


# The default run resumes a dense run after SIGKILL; SIGTERM's resumes (dense and CNN) are slow.
SIGKILL_THEN_SIGTERM = [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]


@pytest.mark.parametrize("kill_signal", SIGKILL_THEN_SIGTERM, ids=["sigkill", "sigterm"])
def test_a_killed_dense_run_resumes_to_the_same_weights(mlflow_server, tmp_path, kill_signal):
    name = f"resume-dense-{kill_signal.name}"
    resumed, killed_at = _kill_and_resume(tmp_path, mlflow_server.url, DENSE, DENSE_ARGS, name, kill_signal, at_epoch=3)
    assert killed_at < 39
    alone = _alone(tmp_path, mlflow_server.url, DENSE, DENSE_ARGS, f"{name}-alone", **SAMPLE_EVERY_SECOND)
    _assert_same_result(MlflowClient(mlflow_server.url), resumed, alone, 40)
    # Every training run logs system metrics, here the run left alone (sampled every second).
    alone_metrics = MlflowClient(mlflow_server.url).get_run(alone).data.metrics
    for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{metric}" in alone_metrics


@pytest.mark.slow  # the dense SIGKILL resume is the default run's
def test_a_cnn_run_stopped_with_sigterm_resumes_to_the_same_weights(mlflow_server, tmp_path):
    resumed, killed_at = _kill_and_resume(
        tmp_path, mlflow_server.url, CNN, CNN_ARGS, "resume-cnn", signal.SIGTERM, at_epoch=1
    )
    assert killed_at < 7
    alone = _alone(tmp_path, mlflow_server.url, CNN, CNN_ARGS, "resume-cnn-alone")
    _assert_same_result(MlflowClient(mlflow_server.url), resumed, alone, 8)


def test_a_changed_configuration_starts_anew_and_says_so(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME="resume-changed")
    process = subprocess.Popen([sys.executable, DENSE, *DENSE_ARGS], cwd=tmp_path, env=env, stdout=subprocess.PIPE)
    killed, _ = signal_when(process, lambda: _checkpointed(client, "resume-changed", 1), "epoch 2", signal.SIGTERM)
    # Another dropout, and (so that the new run is short) fewer epochs: both named in the line.
    changed = [DENSE, "--epochs", "3", *DENSE_ARGS[2:-1], "0.3"]
    result = run_script([sys.executable, *changed], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Not resuming run {killed.info.run_id} (killed after epoch" in result.stdout
    assert "dropout 0.2 there, 0.3 here" in result.stdout and "epochs 40 there, 3 here" in result.stdout
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert len(_runs(client, "resume-changed")) == 2


@pytest.mark.parametrize("kill_signal", SIGKILL_THEN_SIGTERM, ids=["sigkill", "sigterm"])
def test_a_trial_whose_worker_died_is_taken_over_from_its_checkpoint_by_another_worker(
    mlflow_server, tmp_path, kill_signal
):
    client = MlflowClient(mlflow_server.url)
    space = tmp_path / "one.yaml"
    space.write_text("parameters:\n  units: [24]\n  dropout: [0.2]\n")
    common = ["--space", str(space), "--epochs", "30", "--max_train_examples", "1000", "--register_as", ""]

    def search(experiment: str, storage: Path):
        # System metrics every second, so that this short trial has some.
        env = python_env(
            mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"
        )
        return [sys.executable, SEARCH, *common, "--storage", f"sqlite:///{storage}"], env

    experiment = f"resume-search-{kill_signal.name}"
    command, env = search(experiment, tmp_path / "optuna.db")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    dead, _ = signal_when(
        first, lambda: _child_checkpointed(client, experiment, 2), "the trial's third epoch", kill_signal
    )
    second = run_script(command, env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Taking over killed run {dead.info.run_id} from its checkpoint after epoch" in second.stdout
    children = [run for run in _runs(client, experiment) if run.data.tags.get("study_role") == "child"]
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["resumed_from_run"] == dead.info.run_id
    assert client.get_run(dead.info.run_id).data.tags["resumed_by_run"] == finished[0].info.run_id
    # Each worker names itself in its runs' system metrics: which machine did what.
    worker = finished[0].data.tags["worker"].replace(":", "-")
    assert f"system/{worker}/cpu_utilization_percentage" in finished[0].data.metrics

    command, env = search(f"{experiment}-alone", tmp_path / "alone.db")
    alone = run_script(command, env, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    (reference,) = [run for run in _runs(client, f"{experiment}-alone") if run.data.tags.get("study_role") == "child"]
    _assert_same_result(client, finished[0].info.run_id, reference.info.run_id, 30)


def test_a_study_s_killed_child_resumes_under_its_parent(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME="resume-study")
    command = [
        sys.executable,
        str(PROJECT_DIR / "entrypoints" / "weight_decay.py"),
        *["--factors", "0.0001,0.001", "--replicates", "1", "--epochs", "40", "--max_train_examples", "500"],
        *["--sweep_id", "resume-study-1"],
    ]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    child, _ = signal_when(
        process, lambda: _child_checkpointed(client, "resume-study", 2), "a child's third epoch", signal.SIGKILL
    )
    result = run_script(command, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming run {child.info.run_id} (resume 1)" in result.stdout
    after = client.get_run(child.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resume_count"] == "1"
    assert [step for step, _ in _history(client, child.info.run_id)] == list(range(40))
    children = [run for run in _runs(client, "resume-study") if run.data.tags.get("study_role") == "child"]
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
