"""The search entry point against real servers: an `mlflow server`, PostgreSQL, and real kills.

Trials train one or two epochs on a few thousand examples, so accuracies are low; what is
checked is how trials, runs and the study fit together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import PROJECT_DIR, RUN_AND_REPORT_IMPORTS, run_script
from mlflow.tracking import MlflowClient

from harness.servers import free_port, python_env
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.study_storage import open_storage

pytestmark = pytest.mark.e2e

SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
SIX_POINT_GRID = "parameters:\n  units: [16, 32, 64]\n  dropout: [0.0, 0.5]\n"
FOUR_POINT_GRID = "parameters:\n  units: [16, 32]\n  dropout: [0.0, 0.5]\n"


def space_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def load_study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def children(client: MlflowClient, parent_run_id: str):
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def running_runs(client: MlflowClient, parent_run_id: str) -> list[str]:
    """The RUNNING runs of the parent's experiment: each test has an experiment of its own, so one
    test's leftovers never fail another."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return [
        f"{run.info.run_id} ({run.data.tags.get('mlflow.runName')})"
        for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    ]


@pytest.fixture()
def search_env(tracking_uri, request):
    """A worker's environment, with an MLflow experiment named after the test."""
    return python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME=f"search-{request.node.name}")


@pytest.fixture()
def in_process_experiment(request, monkeypatch):
    """For a search run in this process, as its entry point would run it: an MLflow experiment
    named after the test. These tests are about what the search records, not about its process
    (each process costs about 5 s of CPU in imports); the cut-off and bad-input tests start real
    workers."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"search-{request.node.name}")


def _stop_at_running_child(
    client: MlflowClient,
    storage: str,
    study_name: str,
    finished_before: int,
    process: subprocess.Popen,
    timeout_s: float = 300,
):
    """Waits until ``finished_before`` trials are finished and another trial is training, and
    leaves the worker stopped (SIGSTOP) right there; the caller signals it, then sends SIGCONT.

    The study is watched through one storage object (one local query a look). Once a trial
    runs, the worker is frozen before the tracking server is asked which run that trial has,
    so a slow answer on a busy machine cannot let the trials slip past; if the trial's run
    has no tags yet, the worker is let go on for a moment. The worker's exit ends the wait.
    """
    deadline = time.monotonic() + timeout_s
    # The project's own opener: the worker may be creating a fresh database's tables this moment.
    engine = open_storage(storage)
    study = None
    seen = "nothing yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"the worker ended (status {process.returncode}) before a trial could be cut off; last seen: {seen}\n"
                + process.stdout.read()[-4000:]
            )
        if study is None:
            try:
                study = optuna.load_study(study_name=study_name, storage=engine)
            except KeyError:
                time.sleep(0.05)
                continue
        trials = study.get_trials(deepcopy=False)
        complete = sum(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
        running = [trial.number for trial in trials if trial.state == optuna.trial.TrialState.RUNNING]
        parent_run_id = study.user_attrs.get("mlflow_parent_run_id") if running else None
        seen = f"{complete} complete, running {running}, parent {parent_run_id}"
        if complete >= finished_before and running and parent_run_id:
            process.send_signal(signal.SIGSTOP)
            runs = children(client, parent_run_id)
            finished = [run for run in runs if run.info.status == "FINISHED"]
            # A run is created a moment before its tags are written: wait for the trial's tags too.
            current = [run for run in runs if run.info.status == "RUNNING" and "optuna_trial_number" in run.data.tags]
            seen += f"; runs {[(run.info.run_name, run.info.status) for run in runs]}"
            if len(finished) >= finished_before and current:
                return parent_run_id, finished, current[0]
            process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(
        f"no trial was running after {finished_before} finished within {timeout_s} s; last seen: {seen}"
    )


def start_worker(command: list[str], env: dict[str, str], cwd) -> subprocess.Popen:
    """A worker whose Ctrl-C works even when this test runs where SIGINT is ignored (a background
    job of a non-interactive shell): Python turns SIGINT into KeyboardInterrupt only if the
    signal was left at its default by the parent."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


SIGNALS = {"kill": signal.SIGKILL, "interrupt": signal.SIGINT, "terminate": signal.SIGTERM}
EXIT_STATUS = {"kill": -signal.SIGKILL, "interrupt": 130, "terminate": 143}


@pytest.mark.slow  # three cut-offs and three resumes
def test_a_search_cut_off_three_ways_resumes_each_time_without_repeating_finished_trials(
    tmp_path, tracking_uri, search_env
):
    """One study, cut off mid-trial three times, each time after one more trial has finished,
    and started again with the same command after each cut: Ctrl-C and SIGTERM (Optuna fails the
    trial and queues it again at once), then SIGKILL (the next worker's heartbeat check finds
    the dead trial). The last start finishes the study."""
    space = space_file(tmp_path, FOUR_POINT_GRID)
    study_name = "resume-three-ways"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [
        sys.executable,
        SEARCH,
        "--space",
        space,
        "--storage",
        storage,
        "--study_name",
        study_name,
        "--epochs",
        "2",
        "--max_train_examples",
        "1000",
        "--register_as",
        "",
    ]
    client = MlflowClient(tracking_uri)
    finished_ids, cut_trials, cut_run_ids = set(), [], []
    for finished_before, how in enumerate(("interrupt", "terminate", "kill"), start=1):
        worker = start_worker(command, search_env, tmp_path)
        try:
            parent_run_id, finished, cut = _stop_at_running_child(
                client, storage, study_name, finished_before, process=worker
            )
            worker.send_signal(SIGNALS[how])
            worker.send_signal(signal.SIGCONT)
            output = worker.communicate(timeout=120)[0]
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == EXIT_STATUS[how], (how, output[-3000:])
        cut_trial = int(cut.data.tags["optuna_trial_number"])
        cut_trials.append(cut_trial)
        cut_run_ids.append(cut.info.run_id)
        if how != "kill":
            # Failed by Optuna and queued again before the process exited; the search's parent,
            # which no other worker uses, ends KILLED with the reason; so does the trial's run.
            trials = load_study(storage, study_name).trials
            assert trials[cut_trial].state == optuna.trial.TrialState.FAIL, how
            assert [trial.state for trial in trials if trial.system_attrs.get("failed_trial") == cut_trial] == [
                optuna.trial.TrialState.WAITING
            ]
            reason = "interrupted by Ctrl-C (SIGINT)" if how == "interrupt" else "terminated by SIGTERM"
            for run_id in (parent_run_id, cut.info.run_id):
                run = client.get_run(run_id)
                assert (run.info.status, run.data.tags.get("killed_reason")) == ("KILLED", reason), how
        finished_ids |= {
            run.info.run_id
            for run in client.search_runs(
                [client.get_run(parent_run_id).info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
            )
        }
        assert len(finished_ids) >= finished_before

    again = run_script(command, search_env, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stopped sending heartbeats" in again.stdout

    study = load_study(storage, study_name)
    states = {trial.number: trial.state for trial in study.trials}
    assert [states[number] for number in cut_trials] == [optuna.trial.TrialState.FAIL] * 3
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    points = [(trial.params["units"], trial.params["dropout"]) for trial in complete]
    assert len(points) == 4 and len(set(points)) == 4, points
    for cut_trial in cut_trials:
        retry = [trial for trial in complete if trial.system_attrs.get("failed_trial") == cut_trial]
        assert len(retry) == 1 and retry[0].params == study.trials[cut_trial].params

    runs = children(client, parent_run_id)
    by_status = {}
    for run in runs:
        by_status.setdefault(run.info.status, []).append(run)
    assert len(by_status["FINISHED"]) == 4
    # Runs finished before each cut are kept, not trained again.
    assert finished_ids <= {run.info.run_id for run in by_status["FINISHED"]}
    assert [client.get_run(run_id).info.status for run_id in cut_run_ids] == ["KILLED"] * 3
    assert running_runs(client, parent_run_id) == []
    assert client.get_run(parent_run_id).info.status == "FINISHED"


def test_random_search_with_median_pruning_logs_best_so_far_and_importance(
    tmp_path, tracking_uri, in_process_experiment
):
    space = space_file(
        tmp_path,
        "sampler: random\nparameters:\n  units: [8, 32, 128]\n  "
        "learning_rate: [0.00001, 0.001, 0.01]\n  dropout: [0.0, 0.3]\n",
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    from mnist_mlflow.studies.search import run_search

    run_search(
        SearchConfig(
            space=space,
            storage=storage,
            study_name="random-pruned",
            n_trials=7,
            pruner="median",
            epochs=4,
            max_train_examples=500,
            register_as="",
        )
    )
    study = load_study(storage, "random-pruned")
    assert len(study.trials) == 7
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    runs = children(client, parent.info.run_id)
    pruned_trials = {trial.number for trial in study.trials if trial.state == optuna.trial.TrialState.PRUNED}
    tagged_pruned = {
        int(run.data.tags["optuna_trial_number"]) for run in runs if run.data.tags["optuna_trial_state"] == "PRUNED"
    }
    # Pruning starts once 5 trials have finished; a later trial below the median at its third
    # epoch is pruned (with this seed, some are: a learning rate of 1e-5 barely learns).
    assert pruned_trials and tagged_pruned == pruned_trials
    for run in runs:
        if int(run.data.tags["optuna_trial_number"]) in pruned_trials:
            assert int(run.data.tags["pruned_after_epoch"]) < 4
    assert parent.data.metrics["trials_pruned"] == len(pruned_trials)
    epochs = sum(len(trial.intermediate_values) for trial in study.trials)
    assert parent.data.metrics["epochs_trained"] == epochs
    assert parent.data.metrics["epochs_saved_by_pruning"] == 7 * 4 - epochs
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/best_so_far.png", "search/parameter_importance.png", "search/best_of_n.png"} <= artifacts
    assert "search/heatmap_val_accuracy.png" not in artifacts


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sampler", "annealing"], "sampler='annealing' is not one of: grid, random, tpe"),
        (["--space", "SPACE_FILE"], "is not valid YAML at line"),
        (["--storage", "postgresql://search@127.0.0.1:UNUSED_PORT/optuna"], "cannot be opened"),
        (["--storage", "sqlite:////nonexistent-folder/optuna.db"], "cannot be opened"),
    ],
)
def test_bad_input_fails_fast_and_creates_no_run(tmp_path, tracking_uri, args, expected):
    (tmp_path / "broken.yaml").write_text("parameters:\n  units: [16, 32\n")
    args = [
        arg.replace("SPACE_FILE", str(tmp_path / "broken.yaml")).replace("UNUSED_PORT", str(free_port()))
        for arg in args
    ]
    client = MlflowClient(tracking_uri)
    before = len(client.search_runs([experiment.experiment_id for experiment in client.search_experiments()]))
    start = time.monotonic()
    command = [sys.executable, "-c", RUN_AND_REPORT_IMPORTS, SEARCH, *args, "--epochs", "1"]
    result = run_script(command, python_env(tracking_uri), timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "tensorflow imported: False" in result.stdout
    assert elapsed < 60
    after = len(client.search_runs([experiment.experiment_id for experiment in client.search_experiments()]))
    assert after == before


def test_unreachable_tracking_server_is_reported_before_any_training(tmp_path):
    env = python_env(f"http://127.0.0.1:{free_port()}")
    result = run_script(
        [sys.executable, SEARCH, "--epochs", "1", "--storage", f"sqlite:///{tmp_path / 'o.db'}"],
        env,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "cannot be reached" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert not (tmp_path / "o.db").exists()
    assert os.listdir(tmp_path) == []


def test_random_trial_that_repeats_a_finished_one_reuses_its_result(tmp_path, tracking_uri, in_process_experiment):
    """Two combinations and five draws: repeats take the earlier trial's result instead of training again."""
    space = space_file(tmp_path, "sampler: random\nparameters:\n  units: [16, 32]\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    from mnist_mlflow.studies.search import run_search

    run_search(
        SearchConfig(
            space=space,
            storage=storage,
            study_name="repeats",
            n_trials=5,
            epochs=1,
            max_train_examples=500,
            register_as="",
        )
    )
    study = load_study(storage, "repeats")
    trials = study.trials
    assert len(trials) == 5 and all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    runs = children(client, parent.info.run_id)
    trained = [trial for trial in trials if "same_as_trial" not in trial.user_attrs]
    reused = [trial for trial in trials if "same_as_trial" in trial.user_attrs]
    assert len(trained) == len(runs) == len({tuple(trial.params.items()) for trial in trained}) <= 2
    for trial in reused:
        original = trials[trial.user_attrs["same_as_trial"]]
        assert original.params == trial.params and original.value == trial.value
        assert trial.user_attrs["mlflow_run_id"] == original.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["trials_reused"] == len(reused) >= 3
    assert parent.data.metrics["epochs_trained"] == len(trained)
