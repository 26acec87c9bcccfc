"""Reliability against real servers and real signals: SIGTERM, SIGKILL, a dying `mlflow run`
launcher, reconciliation, and workers or scripts that start at the same moment. (Credentials
and secrets: test_security_e2e.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env

pytestmark = pytest.mark.e2e

DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
PROMOTE = str(PROJECT_DIR / "entrypoints" / "promote.py")
RECONCILE = str(PROJECT_DIR / "entrypoints" / "reconcile.py")
WEIGHT_DECAY = str(PROJECT_DIR / "entrypoints" / "weight_decay.py")
# Long enough to be caught mid-training: the test stops it after the first epoch.
LONG_DENSE = [DENSE, "--epochs", "200", "--max_train_examples", "2000"]
TWO_POINT_GRID = "parameters:\n  units: [16, 32]\n"


def wait_for(condition, what: str, timeout_s: float = 300, process: subprocess.Popen | None = None):
    """Polls ``condition`` until it returns something truthy; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(
                f"the process ended (status {process.returncode}) before {what}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
            )
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def experiment_runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def running_with_an_epoch(client: MlflowClient, experiment: str):
    """The experiment's RUNNING runs that have logged at least one epoch."""
    return [
        run
        for run in experiment_runs(client, experiment)
        if run.info.status == "RUNNING" and "val_accuracy" in run.data.metrics
    ]


def start(command: list[str], env: dict[str, str], cwd: Path = PROJECT_DIR) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when(process: subprocess.Popen, condition, what: str, signal_number: int):
    """Sends ``signal_number`` to ``process`` once ``condition`` holds; returns its value and the process's stderr."""
    try:
        value = wait_for(condition, what, process=process)
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return value, stderr


def test_sigterm_ends_a_dense_run_killed_at_once_with_one_line(mlflow_server):
    experiment = "e2e-sigterm-dense"
    client = MlflowClient(mlflow_server.url)
    process = start([sys.executable, *LONG_DENSE], python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment))
    (run,), stderr = signal_when(
        process, lambda: running_with_an_epoch(client, experiment), "a running run", signal.SIGTERM
    )
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "stopped: terminated by SIGTERM; the runs of this process ended KILLED"
    assert "Traceback" not in stderr
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["killed_reason"] == "terminated by SIGTERM"


def test_a_killed_process_leaves_a_run_that_the_next_start_closes(mlflow_server):
    """SIGKILL leaves the run RUNNING; the next entry point of the experiment closes it KILLED,
    but never a run of another host or a young run without process information."""
    experiment = "e2e-sigkill-reconcile"
    client = MlflowClient(mlflow_server.url)
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    process = start([sys.executable, *LONG_DENSE], env)
    (run,), _ = signal_when(process, lambda: running_with_an_epoch(client, experiment), "a running run", signal.SIGKILL)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert run.data.tags["mnist_mlflow.process_id"] == str(process.pid)

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    elsewhere = client.create_run(
        experiment_id,
        tags={
            "mnist_mlflow.process_host": "another-host",
            "mnist_mlflow.process_id": "1",
            "mnist_mlflow.process_start_time": "1.00",
        },
    ).info.run_id
    young_unknown = client.create_run(experiment_id).info.run_id
    old_unknown = client.create_run(experiment_id, start_time=int((time.time() - 25 * 3600) * 1000)).info.run_id

    # Any entry point reconciles its experiment on start; promote is the cheapest one.
    result = run_script([sys.executable, PROMOTE, "--model_name", "no-such-model"], env)
    assert result.returncode == 2 and "no registered model" in result.stderr, result.stderr[-2000:]
    assert f"Run {run.info.run_id} was left RUNNING" in result.stdout
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "KILLED"
    assert f"its process {process.pid} on" in closed.data.tags["killed_reason"]
    assert client.get_run(old_unknown).info.status == "KILLED"
    assert "no process information" in client.get_run(old_unknown).data.tags["killed_reason"]
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(young_unknown).info.status == "RUNNING"

    # The reconcile entry point does the same on demand; a dry run changes nothing.
    dead = client.create_run(
        experiment_id,
        tags={
            **{
                name: closed.data.tags[name]
                for name in (
                    "mnist_mlflow.process_host",
                    "mnist_mlflow.process_boot_id",
                    "mnist_mlflow.process_pid_namespace",
                )
            },
            "mnist_mlflow.process_id": str(process.pid),
            "mnist_mlflow.process_start_time": "1.00",
        },
    ).info.run_id
    dry = run_script([sys.executable, RECONCILE, "--experiment", experiment, "--dry_run", "true"], env)
    assert dry.returncode == 0 and f"run {dead}: would be closed" in dry.stdout, dry.stderr
    assert client.get_run(dead).info.status == "RUNNING"
    done = run_script([sys.executable, RECONCILE, "--experiment", experiment], env)
    assert done.returncode == 0 and "1 run(s) closed KILLED" in done.stdout, done.stdout + done.stderr
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(elsewhere).info.status == "RUNNING"
    # The server is shared with other tests, which check that nothing is left RUNNING.
    for run_id in (elsewhere, young_unknown):
        client.set_terminated(run_id, status="KILLED")


def test_when_the_mlflow_run_launcher_dies_the_entry_point_closes_its_run(mlflow_server, tmp_path):
    """`docker stop` or a scheduler signals the launcher, which does not pass SIGTERM on."""
    experiment = "e2e-launcher-dies"
    client = MlflowClient(mlflow_server.url)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(PROJECT_DIR),
        "-e",
        "dense",
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
        "-P",
        "epochs=200",
        "-P",
        "max_train_examples=2000",
    ]
    launcher = start(command, python_env(mlflow_server.url), cwd=tmp_path)
    try:
        (run,) = wait_for(lambda: running_with_an_epoch(client, experiment), "a running run", process=launcher)
        script = psutil.Process(int(run.data.tags["mnist_mlflow.process_id"]))
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        # The entry point notices within about a second, closes its run and exits.
        gone, _ = psutil.wait_procs([script], timeout=60)
        assert gone, "the entry point kept running after its launcher died"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["killed_reason"] == f"its mlflow run launcher (pid {launcher.pid}) ended"


def test_sigterm_to_a_study_kills_the_parent_and_the_current_child_and_keeps_the_finished_one(mlflow_server):
    experiment = "e2e-sigterm-study"
    client = MlflowClient(mlflow_server.url)
    command = [
        sys.executable,
        WEIGHT_DECAY,
        "--factors",
        "1e-4",
        "--replicates",
        "2",
        "--epochs",
        "8",
        "--max_train_examples",
        "1000",
        "--sweep_id",
        "wd-sigterm",
    ]
    process = start(command, python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment))

    def second_child_running():
        runs = experiment_runs(client, experiment)
        children = [run for run in runs if run.data.tags.get("study_role") == "child"]
        finished = [run for run in children if run.info.status == "FINISHED"]
        running = [run for run in children if run.info.status == "RUNNING"]
        return (finished, running) if finished and running else None

    (finished, running), stderr = signal_when(process, second_child_running, "the second child", signal.SIGTERM)
    assert process.returncode == 143, stderr[-2000:]
    runs = {run.info.run_id: run for run in experiment_runs(client, experiment)}
    (parent,) = [run for run in runs.values() if run.data.tags.get("study_role") == "parent"]
    assert parent.info.status == "KILLED" and parent.data.tags["killed_reason"] == "terminated by SIGTERM"
    assert runs[running[0].info.run_id].info.status == "KILLED"
    assert runs[running[0].info.run_id].data.tags["killed_reason"] == "terminated by SIGTERM"
    assert runs[finished[0].info.run_id].info.status == "FINISHED"


def test_scripts_started_together_on_a_fresh_sqlite_store_both_finish(tmp_path):
    """No CircularDependencyError from MLflow's schema set-up when two scripts create mlflow.db together."""
    env = python_env(f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="together")
    command = [sys.executable, DENSE, "--epochs", "1", "--max_train_examples", "300"]
    processes = [start(command, env, cwd=tmp_path) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(run.info.status for run in experiment_runs(client, "together")) == ["FINISHED", "FINISHED"]


OPEN_STORAGE_AT = """
import sys, time
from mnist_mlflow.studies.study_storage import open_storage
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
open_storage(url)
print("opened")
"""


# The race is repeated five times; the repeats are slow (`-m "not slow"` keeps the first round).
@pytest.mark.parametrize("round_number", [0, *(pytest.param(number, marks=pytest.mark.slow) for number in range(1, 5))])
def test_workers_opening_a_fresh_postgres_database_together_all_get_in(postgres, round_number):
    """optuna#1092: workers that create the tables of a fresh database at the same moment."""
    database = f"fresh_{round_number}_{os.getpid()}"
    url = postgres.create_database(database)
    at = time.time() + 6  # all four have imported Optuna by then
    workers = [start([sys.executable, "-c", OPEN_STORAGE_AT, url, str(at)], python_env()) for _ in range(4)]
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0 and "opened" in stdout, stderr[-2000:]
    assert optuna.get_all_study_names(storage=url) == []


# The two tests below run their study in this process, as the entry point would: what they
# check is how a study treats a diverging child, not the process around it (each process costs
# about 5 s of CPU in imports; the signal and exit-status tests above cover the process).
@pytest.mark.slow  # a diverging trial, below, is checked by default
def test_a_diverging_child_fails_and_the_study_goes_on(tracking_uri, monkeypatch, capsys):
    from mnist_mlflow.studies.weight_decay import WeightDecayConfig, run_weight_decay

    experiment = "e2e-diverging-child"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    run_weight_decay(WeightDecayConfig(factors=(1e30, 1e-4), replicates=1, epochs=1, max_train_examples=500))
    output = capsys.readouterr().out
    assert "FAILED: the training loss became" in output and "1 failed (factor=1e+30/replicate=0)" in output
    runs = experiment_runs(MlflowClient(tracking_uri), experiment)
    by_key = {run.data.tags.get("study_child_key"): run for run in runs if run.data.tags.get("study_role") == "child"}
    diverged = by_key["factor=1e+30/replicate=0"]
    assert diverged.info.status == "FAILED" and "training diverged" in diverged.data.tags["failed_reason"]
    assert by_key["factor=0.0001/replicate=0"].info.status == "FINISHED"
    (parent,) = [run for run in runs if run.data.tags.get("study_role") == "parent"]
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_children"] == "factor=1e+30/replicate=0"


def test_a_diverging_trial_is_failed_and_never_retried(tracking_uri, tmp_path, monkeypatch, capsys):
    from mnist_mlflow.studies.search import run_search
    from mnist_mlflow.studies.search_config import SearchConfig

    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  units: [16]\n  learning_rate: [0.001, 1.0e+300]\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = SearchConfig(
        space=str(space), storage=storage, study_name="diverging", epochs=1, max_train_examples=500, register_as=""
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "e2e-diverging-trial")
    first = run_search(config)
    assert first.trained == 1  # the diverged trial is not counted as trained
    assert "Traceback" not in capsys.readouterr().err
    again = run_search(config)
    assert again.trained == 0 and "0 trials trained by this worker" in capsys.readouterr().out
    trials = optuna.load_study(study_name="diverging", storage=storage).trials
    assert [(trial.params["learning_rate"], trial.state.name) for trial in trials] == [
        (1e300, "FAIL"),
        (0.001, "COMPLETE"),
    ]
    assert "training diverged" in trials[0].user_attrs["diverged"]
    client = MlflowClient(tracking_uri)
    parent = client.get_run(
        optuna.load_study(study_name="diverging", storage=storage).user_attrs["mlflow_parent_run_id"]
    )
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 1


def postgres_search(postgres, mlflow_server, tmp_path, study_name: str, units: list[int], epochs: int, examples: int):
    """A search over ``units`` in a fresh PostgreSQL database, tracked in the experiment e2e-<study_name>:
    (storage URL, worker command, worker environment)."""
    storage = postgres.create_database(f"{study_name}_{os.getpid()}")
    space = tmp_path / "space.yaml"
    space.write_text(f"parameters:\n  units: {units}\n")
    command = [
        sys.executable,
        SEARCH,
        "--space",
        str(space),
        "--storage",
        storage,
        "--study_name",
        study_name,
        "--epochs",
        str(epochs),
        "--max_train_examples",
        str(examples),
        "--register_as",
        "",
    ]
    return storage, command, python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=f"e2e-{study_name}")


@pytest.mark.slow  # a race of several workers, as test_workers_opening_a_fresh_postgres_database_together
def test_search_workers_started_together_share_one_study_and_parent_which_outlives_a_stopped_worker(
    mlflow_server, postgres, tmp_path
):
    """Three workers at the same moment on a fresh database: one creates the study (and keeps
    its parent run), the others discard the parent they made and join. Then one of them gets
    SIGTERM mid-trial: its trial is failed and queued again at once, the parent stays RUNNING
    for the others, they train the queued trial, and the last to finish closes the parent."""
    experiment = "e2e-together"
    storage, command, env = postgres_search(
        postgres, mlflow_server, tmp_path, "together", [8, 16, 32, 64], epochs=3, examples=1000
    )
    client = MlflowClient(mlflow_server.url)
    stopped, *others = [start(command, env, cwd=tmp_path) for _ in range(3)]

    def training_beside_another():
        running = [
            run
            for run in experiment_runs(client, experiment)
            if run.info.status == "RUNNING" and run.data.tags.get("study_role") == "child"
        ]
        workers = {run.data.tags["worker"]: run for run in running}
        mine = workers.get(f"{os.uname().nodename}:{stopped.pid}")
        return mine if mine is not None and len(workers) >= 2 else None

    try:
        cut, stderr = signal_when(
            stopped, training_beside_another, "the first worker training beside another", signal.SIGTERM
        )
        assert stopped.returncode == 143, stderr[-2000:]
        trial_number = int(cut.data.tags["optuna_trial_number"])
        trials = optuna.load_study(study_name="together", storage=storage).trials
        assert trials[trial_number].state.name == "FAIL"
        assert any(trial.system_attrs.get("failed_trial") == trial_number for trial in trials)
        parent_id = optuna.load_study(study_name="together", storage=storage).user_attrs["mlflow_parent_run_id"]
        assert client.get_run(parent_id).info.status == "RUNNING", "the other workers still use the parent"
        assert client.get_run(cut.info.run_id).info.status == "KILLED"
        for worker in others:
            stdout, stderr = worker.communicate(timeout=900)
            assert worker.returncode == 0, stdout[-2000:] + stderr[-2000:]
    finally:
        for worker in others:
            if worker.poll() is None:
                worker.kill()
    study = optuna.load_study(study_name="together", storage=storage)
    assert sorted(trial.params["units"] for trial in study.trials if trial.state.name == "COMPLETE") == [8, 16, 32, 64]
    parents = [run for run in experiment_runs(client, experiment) if run.data.tags.get("study_role") == "parent"]
    assert [run.info.run_id for run in parents] == [parent_id]
    assert client.get_run(parent_id).info.status == "FINISHED"


RESOLVE_EXPERIMENTS_AT = """
import os, sys, time
from mnist_mlflow import tracking
prefix, times = sys.argv[1], sys.argv[2:]
for round_number, at in enumerate(times):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = f"{prefix}-{round_number}"
    time.sleep(max(0.0, float(at) - time.time()))
    print(tracking.current_experiment_id(), flush=True)
"""


def test_entry_points_started_together_in_a_new_experiment_all_get_it(mlflow_server):
    """Each resolves MLFLOW_EXPERIMENT_NAME, and all but one find that another just created it.
    Four processes meet three times, each time at a new experiment."""
    first_meeting = time.time() + 5  # all four have imported MLflow by then
    times = [str(first_meeting + 2 * round_number) for round_number in range(3)]
    processes = [
        start(
            [sys.executable, "-c", RESOLVE_EXPERIMENTS_AT, "e2e-new-experiment", *times], python_env(mlflow_server.url)
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [stderr[-1000:] for _, stderr in outputs]
    rounds = list(zip(*(stdout.split() for stdout, _ in outputs)))
    assert len(rounds) == 3
    # One experiment per round, the same for all four processes, and a new one each round.
    assert [len(set(ids)) for ids in rounds] == [1, 1, 1]
    assert len({ids[0] for ids in rounds}) == 3
