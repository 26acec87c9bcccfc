"""Studies end to end against a real `mlflow server`: `exercises` and `weight_decay` as parent
runs with nested children, their summaries, resuming by `sweep_id`, a killed run, bad input."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env

pytestmark = pytest.mark.e2e

TINY = "800"


def mlflow_run(server_url: str, experiment: str, entry_point: str, params: dict[str, str]):
    arguments = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(PROJECT_DIR),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for name, value in params.items():
        arguments += ["-P", f"{name}={value}"]
    result = run_script(arguments, env=python_env(server_url))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def study_runs(client: MlflowClient, experiment: str):
    """(parents, children, other runs) of an experiment."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("study_role") == "parent"]
    children = [run for run in runs if run.data.tags.get("study_role") == "child"]
    others = [run for run in runs if run not in parents and run not in children]
    return parents, children, others


def load_table(client: MlflowClient, run_id: str, path: str, tmp_path):
    """A table logged with mlflow.log_table, as column -> list of values."""
    import pandas as pd

    local = client.download_artifacts(run_id, path, str(tmp_path))
    return pd.read_json(io.StringIO(open(local).read()), orient="split")


@pytest.fixture(scope="module")
def exercises_study(mlflow_server):
    experiment = "e2e-exercises"
    result = mlflow_run(
        mlflow_server.url, experiment, "exercises", {"only": "1,4", "epochs": "1", "max_train_examples": TINY}
    )
    client = MlflowClient(mlflow_server.url)
    return client, result, *study_runs(client, experiment)


def test_exercises_create_one_parent_with_exactly_the_two_children(exercises_study):
    _, _, parents, children, others = exercises_study
    assert len(parents) == 1 and not others
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study_kind"] == "exercises"
    assert len(children) == 2
    assert {child.data.tags["exercise"] for child in children} == {"1", "4"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mlflow.runName"] == f"dense-exercise-{child.data.tags['exercise']}"
        # The description states the question the exercise answers.
        assert child.data.tags["mlflow.note.content"].endswith("?")
        # Everything a dense run logs.
        assert child.data.params["epochs"] == "1"
        assert child.data.params["max_train_examples"] == TINY
        assert "trainable_parameters" in child.data.params
        assert {"best_val_accuracy", "test_accuracy", "mean_epoch_time_s", "val_accuracy", "epoch_time_s"} <= set(
            child.data.metrics
        )
    by_exercise = {child.data.tags["exercise"]: child for child in children}
    assert by_exercise["1"].data.params["hidden_units"] == "200,200"
    # One activation for every layer is recorded as MLproject's parameter is written: one name.
    assert by_exercise["4"].data.params["activation"] == "sigmoid"


def test_exercises_parent_holds_the_table_and_the_plot(exercises_study, tmp_path):
    client, _, parents, children, _ = exercises_study
    parent = parents[0]
    paths = {item.path for item in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/exercises.json", "summary/exercises.md", "summary/accuracy_vs_epoch_time.png"} <= paths
    table = load_table(client, parent.info.run_id, "summary/exercises.json", tmp_path)
    assert list(table["exercise"].astype(str)) == ["1", "4"]
    for _, row in table.iterrows():
        child = next(run for run in children if run.info.run_id == row["run_id"])
        assert row["val_accuracy"] == pytest.approx(child.data.metrics["best_val_accuracy"])
        assert row["test_accuracy"] == pytest.approx(child.data.metrics["test_accuracy"])
        assert row["mean_epoch_time_s"] == pytest.approx(child.data.metrics["mean_epoch_time_s"])
        assert int(row["trainable_parameters"]) == int(child.data.params["trainable_parameters"])
    assert (
        int(table.set_index(table["exercise"].astype(str)).loc["1", "trainable_parameters"])
        == 784 * 200 + 200 + 200 * 200 + 200 + 2010
    )
    best = table.loc[table["val_accuracy"].idxmax()]
    assert parent.data.tags["best_exercise"] == str(best["exercise"])
    winners = [run for run in children if client.get_run(run.info.run_id).data.tags.get("study_winner") == "true"]
    assert [run.info.run_id for run in winners] == [best["run_id"]]
    markdown = open(client.download_artifacts(parent.info.run_id, "summary/exercises.md", str(tmp_path))).read()
    assert "hidden width 200" in markdown and "sigmoid" in markdown


SWEEP = {"factors": "1e-5,1e-3", "replicates": "2", "epochs": "1", "max_train_examples": TINY, "sweep_id": "wd-e2e"}


@pytest.fixture(scope="module")
def weight_decay_sweep(mlflow_server):
    experiment = "e2e-weight-decay"
    first = mlflow_run(mlflow_server.url, experiment, "weight_decay", SWEEP)
    client = MlflowClient(mlflow_server.url)
    return client, experiment, first, *study_runs(client, experiment)


def test_weight_decay_has_one_child_per_factor_and_replicate(weight_decay_sweep):
    _, _, _, parents, children, _ = weight_decay_sweep
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert all(child.info.status == "FINISHED" for child in children)
    assert all(child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for child in children)
    keys = {(child.data.tags["weight_decay_factor"], child.data.tags["replicate"]) for child in children}
    assert keys == {("1e-05", "0"), ("1e-05", "1"), ("0.001", "0"), ("0.001", "1")}
    for child in children:
        assert child.data.params["hidden_units"] == "500,300"
        assert child.data.params["regularized_layers"] == "first"
        assert child.data.params["optimizer"] == "sgd"
        # Replicate r of every factor trains with the same seed; the split is shared.
        assert child.data.params["replicate_seed"] == child.data.tags["replicate"]
        assert child.data.params["seed"] == "0"


def test_weight_decay_summary_agrees_with_the_children(weight_decay_sweep, tmp_path):
    from scipy import stats

    client, _, _, parents, children, _ = weight_decay_sweep
    parent = client.get_run(parents[0].info.run_id)
    table = load_table(client, parent.info.run_id, "summary/weight_decay.json", tmp_path)
    means = {}
    for _, row in table.iterrows():
        group = [child for child in children if float(child.data.params["l2"]) == pytest.approx(row["factor"])]
        values = np.array([child.data.metrics["best_val_accuracy"] for child in group])
        assert row["replicates"] == len(group) == 2
        assert row["val_accuracy_mean"] == pytest.approx(values.mean())
        assert row["val_accuracy_std"] == pytest.approx(values.std(ddof=1))
        half = stats.t.ppf(0.975, 1) * values.std(ddof=1) / np.sqrt(2)
        assert row["val_accuracy_ci95_low"] == pytest.approx(values.mean() - half)
        assert row["val_accuracy_ci95_high"] == pytest.approx(values.mean() + half)
        first_epoch = [client.get_metric_history(child.info.run_id, "val_accuracy")[0].value for child in group]
        assert row["val_accuracy_epoch_1_mean"] == pytest.approx(np.mean(first_epoch))
        tests = sorted(float(value) for value in row["test_accuracies"].split(","))
        assert tests == pytest.approx(sorted(child.data.metrics["test_accuracy"] for child in group), abs=1e-4)
        means[row["factor"]] = values.mean()
    best_factor = max(means, key=means.get)
    assert float(parent.data.tags["best_factor"]) == pytest.approx(best_factor)
    assert parent.data.metrics["best_val_accuracy_mean"] == pytest.approx(means[best_factor])
    history = client.get_metric_history(parent.info.run_id, "val_accuracy_mean")
    assert sorted(point.step for point in history) == [0, 1]
    paths = {item.path for item in client.list_artifacts(parent.info.run_id, "summary")}
    assert {
        "summary/val_accuracy_vs_factor.png",
        "summary/val_accuracy_vs_factor_log.png",
        "summary/weight_decay.md",
    } <= paths


def test_same_sweep_id_again_trains_nothing_new(weight_decay_sweep, mlflow_server, tmp_path):
    client, experiment, _, parents, children, _ = weight_decay_sweep
    second = mlflow_run(mlflow_server.url, experiment, "weight_decay", SWEEP)
    assert "0 trained, 4 reused" in second.stdout
    parents_after, children_after, others = study_runs(client, experiment)
    assert [run.info.run_id for run in parents_after] == [parents[0].info.run_id]
    assert parents_after[0].info.status == "FINISHED"
    assert sorted(run.info.run_id for run in children_after) == sorted(run.info.run_id for run in children)
    # The second launch's own run only points at the study it resumed.
    assert len(others) == 1 and others[0].data.tags["resumed_study_run_id"] == parents[0].info.run_id
    # The summary was rewritten whole, not appended to.
    table = load_table(client, parents[0].info.run_id, "summary/weight_decay.json", tmp_path)
    assert len(table) == 2


def test_same_sweep_id_with_other_settings_is_refused_before_training(weight_decay_sweep, mlflow_server):
    client, experiment, *_ = weight_decay_sweep
    result = run_script(
        [
            sys.executable,
            "entrypoints/weight_decay.py",
            *[f"--{name}={value}" for name, value in {**SWEEP, "epochs": "2"}.items()],
        ],
        env=python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment),
    )
    assert result.returncode == 2
    assert "sweep_id='wd-e2e'" in result.stderr and "other settings" in result.stderr
    _, children, _ = study_runs(client, experiment)
    assert len(children) == 4


@pytest.mark.slow  # test_resume_e2e kills a sweep's child by default and checks its resume
def test_a_killed_sweep_resumes_and_never_counts_the_killed_run_as_finished(mlflow_server):
    experiment = "e2e-weight-decay-kill"
    client = MlflowClient(mlflow_server.url)
    arguments = [
        sys.executable,
        "entrypoints/weight_decay.py",
        "--factors",
        "1e-4",
        "--replicates",
        "2",
        "--epochs",
        "2",
        "--max_train_examples",
        "1500",
        "--sweep_id",
        "wd-kill",
    ]
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    process = subprocess.Popen(
        arguments, cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Kill the sweep while its second child is training, after its first FINISHED.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            experiment_object = client.get_experiment_by_name(experiment)
            if experiment_object is not None:
                _, children, _ = study_runs(client, experiment)
                if any(child.info.status == "FINISHED" for child in children) and any(
                    child.info.status == "RUNNING" for child in children
                ):
                    break
            assert process.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.3)
        else:
            pytest.fail("the sweep never reached its second child")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    _, children, _ = study_runs(client, experiment)
    finished_before = {child.info.run_id for child in children if child.info.status == "FINISHED"}
    killed = [child.info.run_id for child in children if child.info.status == "RUNNING"]
    assert len(finished_before) == 1 and len(killed) == 1

    result = run_script(arguments, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 trained, 1 reused" in result.stdout
    parents, children, _ = study_runs(client, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    statuses = {child.info.run_id: child.info.status for child in children}
    assert statuses[killed[0]] == "KILLED"
    finished = [child for child in children if child.info.status == "FINISHED"]
    assert len(finished) == 2 and finished_before < {child.info.run_id for child in finished}
    assert {child.data.tags["replicate"] for child in finished} == {"0", "1"}


@pytest.mark.parametrize(
    "script, arguments, named",
    [
        ("exercises.py", ["--suite", "cnn"], "suite='cnn'"),
        ("exercises.py", ["--only", "1,12"], "'12'"),
        ("exercises.py", ["--suite", "conv", "--only", "baseline"], "'baseline'"),
        ("weight_decay.py", ["--factors", "1e-4,0"], "factors"),
        ("weight_decay.py", ["--factors", "1e-4,-1e-3"], "-0.001"),
        ("weight_decay.py", ["--replicates", "0"], "replicates='0'"),
        ("weight_decay.py", ["--regularized_layers", "last"], "regularized_layers='last'"),
        ("weight_decay.py", ["--sweep_id", "it's"], "sweep_id"),
    ],
)
def test_bad_study_parameters_fail_clearly_before_any_run(script, arguments, named, mlflow_server):
    experiment = "e2e-bad-study"
    result = run_script(
        [sys.executable, f"entrypoints/{script}", *arguments],
        env=python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment),
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert MlflowClient(mlflow_server.url).get_experiment_by_name(experiment) is None


def test_parent_records_the_study_parameters_and_its_id(exercises_study):
    """The parent records the study's own parameters and id, so the study can be rerun or resumed."""
    _, result, parents, _, _ = exercises_study
    parent = parents[0]
    assert parent.data.params["only"] == "1,4" and parent.data.params["epochs"] == "1"
    assert parent.data.params["suite"] == "dense"
    study_id = parent.data.tags["study_id"]
    assert study_id.startswith("exercises-dense-")
    assert f"sweep_id={study_id}" in result.stdout
