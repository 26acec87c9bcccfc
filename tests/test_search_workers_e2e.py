"""Searches shared by several workers through one PostgreSQL study and one tracking server:
two `mlflow run` workers sharing a grid, and a worker killed mid-trial whose trial the other
worker's heartbeat check finds and retries. (Single-worker searches: test_search_e2e.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest
from conftest import PROJECT_DIR
from mlflow.tracking import MlflowClient
from test_search_e2e import (
    FOUR_POINT_GRID,
    SEARCH,
    SIX_POINT_GRID,
    _stop_at_running_child,
    children,
    load_study,
    running_runs,
    space_file,
    start_worker,
)

from harness.servers import python_env

pytestmark = pytest.mark.e2e


@pytest.fixture()
def search_env(tracking_uri, request):
    """A worker's environment, with an MLflow experiment named after the test."""
    return python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME=f"search-{request.node.name}")


def test_two_workers_share_one_grid_study_through_postgres(tmp_path, tracking_uri, postgres):
    """Two `mlflow run` workers, one PostgreSQL study of 6 grid points, one tracking server."""
    space = space_file(tmp_path, SIX_POINT_GRID)
    study_name = "two-workers"
    command = [
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
        "search-two-workers",
        "-P",
        f"space={space}",
        "-P",
        f"storage={postgres.url}",
        "-P",
        f"study_name={study_name}",
        "-P",
        "epochs=1",
        "-P",
        "max_train_examples=1500",
        "-P",
        "register_as=search-two-workers",
    ]
    env = python_env(tracking_uri)
    # MLflow's launcher creates a missing --experiment-name without handling a second launcher
    # doing the same at that moment (RESOURCE_ALREADY_EXISTS, before any project code runs);
    # as the README says, create the experiment once before starting launchers together.
    MlflowClient(tracking_uri).create_experiment("search-two-workers")
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]

    study = load_study(postgres.url, study_name)
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    points = {(trial.params["units"], trial.params["dropout"]) for trial in complete}
    assert len(complete) == 6 and len(points) == 6
    assert points == {(units, dropout) for units in (16, 32, 64) for dropout in (0.0, 0.5)}
    assert not [trial for trial in study.trials if trial.state == optuna.trial.TrialState.RUNNING]

    client = MlflowClient(tracking_uri)
    parent_run_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED"
    runs = children(client, parent_run_id)
    assert len(runs) == 6 and {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags["optuna_trial_number"] for run in runs} == {str(trial.number) for trial in complete}
    assert {run.data.tags["optuna_study"] for run in runs} == {study_name}
    assert all(run.data.tags["worker_host"] for run in runs)
    # Both workers trained trials of the one study.
    assert len({run.data.tags["worker"] for run in runs}) == 2, [run.data.tags["worker"] for run in runs]
    assert running_runs(client, parent_run_id) == []

    # The parent's summary agrees with the children's own metrics.
    best = max(
        runs, key=lambda run: (run.data.metrics["best_val_accuracy"], -int(run.data.tags["optuna_trial_number"]))
    )
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["best_val_accuracy"])
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    assert parent.data.metrics["trials_complete"] == 6
    values = sorted(run.data.metrics["best_val_accuracy"] for run in runs)
    assert parent.data.metrics["expected_best_at_1"] == pytest.approx(sum(values) / 6)
    # The best of 5 of 6 misses the top value only when the one left out is it (1 case in 6).
    assert parent.data.metrics["expected_best_at_5"] == pytest.approx((values[5] * 5 + values[4]) / 6)
    assert "expected_best_at_10" not in parent.data.metrics
    artifacts = {item.path for item in client.list_artifacts(parent_run_id, "search")}
    assert {
        "search/trials.json",
        "search/heatmap_val_accuracy.png",
        "search/best_of_n.png",
        "search/best_of_n.json",
    } <= artifacts
    assert best.data.tags["study_winner"] == "true"

    # The best trial's model is registered exactly once, although both workers summarised.
    versions = client.search_model_versions("name='search-two-workers'")
    assert [version.tags["run_id"] for version in versions] == [best.info.run_id]


def test_a_dead_worker_is_found_by_the_heartbeat_and_the_other_worker_finishes_the_study(
    tmp_path, tracking_uri, postgres, search_env
):
    """Two workers share a PostgreSQL study; one is SIGKILLed "
    "mid-trial; the other fails its trial, retries it, finishes."""
    space = space_file(tmp_path, FOUR_POINT_GRID)
    study_name = "dead-worker"
    command = [
        sys.executable,
        SEARCH,
        "--space",
        space,
        "--storage",
        postgres.url,
        "--study_name",
        study_name,
        "--epochs",
        "2",
        "--max_train_examples",
        "2000",
        "--register_as",
        "",
    ]
    env = search_env
    client = MlflowClient(tracking_uri)
    doomed = start_worker(command, env, tmp_path)
    survivor = None
    try:
        # The doomed worker's first trial is running; start the survivor, then kill the doomed one.
        parent_run_id, _, cut = _stop_at_running_child(
            client, postgres.url, study_name, finished_before=0, process=doomed
        )
        survivor = start_worker(command, env, tmp_path)
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate(timeout=60)
        output = survivor.communicate(timeout=600)[0]
    finally:
        for process in (doomed, survivor):
            if process is not None and process.poll() is None:
                process.kill()
    assert survivor.returncode == 0, output[-4000:]
    assert "stopped sending heartbeats" in output

    cut_trial = int(cut.data.tags["optuna_trial_number"])
    study = load_study(postgres.url, study_name)
    assert study.trials[cut_trial].state == optuna.trial.TrialState.FAIL
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len({(trial.params["units"], trial.params["dropout"]) for trial in complete}) == len(complete) == 4
    assert client.get_run(cut.info.run_id).info.status == "KILLED"
    runs = children(client, parent_run_id)
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 4 + ["KILLED"]
    assert running_runs(client, parent_run_id) == []
    assert client.get_run(parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_eight_workers_on_one_study_train_every_trial_exactly_once(tmp_path, tracking_uri, postgres):
    """Eight real workers start at once on a fresh PostgreSQL database: one parent for all, every
    trial of the budget trained once, by several workers, and nothing left RUNNING anywhere."""
    storage = postgres.create_database("eight_workers")
    study_name = "eight-workers"
    n_trials = 16
    command = [
        sys.executable,
        SEARCH,
        "--space",
        "random",
        "--n_trials",
        str(n_trials),
        "--epochs",
        "1",
        "--max_train_examples",
        "300",
        "--storage",
        storage,
        "--study_name",
        study_name,
        "--register_as",
        "",
    ]
    # The experiment is created by whichever worker gets there first: they race for it, too.
    env = python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME="search-eight-workers")
    workers = [start_worker(command, env, tmp_path) for _ in range(8)]
    outputs = [worker.communicate(timeout=1200)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]

    study = load_study(storage, study_name)
    states = optuna.trial.TrialState
    trained = [
        trial
        for trial in study.trials
        if trial.state in (states.COMPLETE, states.PRUNED) and "surplus" not in trial.user_attrs
    ]
    assert len(trained) == n_trials
    assert not [trial for trial in study.trials if trial.state in (states.RUNNING, states.WAITING)]
    # Trials that drew the parameters of a finished one reuse its run; every other trial has one.
    own_runs = [trial for trial in trained if "same_as_trial" not in trial.user_attrs]

    client = MlflowClient(tracking_uri)
    parent_run_id = study.user_attrs["mlflow_parent_run_id"]
    # Every worker joined the one parent, and said so.
    for output in outputs:
        assert f"parent run {parent_run_id}" in output, output[-2000:]
    parents = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], "tags.study_role = 'parent'", max_results=100
    )
    assert [run.info.run_id for run in parents] == [parent_run_id]
    assert client.get_run(parent_run_id).info.status == "FINISHED"
    runs = children(client, parent_run_id)
    numbers = [run.data.tags["optuna_trial_number"] for run in runs]
    assert sorted(numbers) == sorted(str(trial.number) for trial in own_runs), "each trial has exactly one run"
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {trial.user_attrs["mlflow_run_id"] for trial in own_runs} == {run.info.run_id for run in runs}
    assert running_runs(client, parent_run_id) == []
    # The work was shared: on two cores some workers may get few trials, but several get some.
    assert len({run.data.tags["worker"] for run in runs}) >= 3, sorted(run.data.tags["worker"] for run in runs)
    assert (
        client.get_run(parent_run_id).data.metrics["trials_complete"]
        + client.get_run(parent_run_id).data.metrics["trials_pruned"]
        == n_trials
    )
