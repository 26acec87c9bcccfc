"""Which experiment runs go to, and the links the project prints, against a real sqlite store."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow import tracking


@pytest.fixture()
def sqlite_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        # Set first, so that what choose_experiment sets is undone after the test.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracking.server, "_chosen_experiment_id", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_each_kind_of_work_has_its_own_experiment_by_default(sqlite_store, monkeypatch):
    experiment_id = tracking.choose_experiment(tracking.experiment_name_for("weight_decay"))
    assert MlflowClient().get_experiment(experiment_id).name == "mnist-weight-decay"
    # The process's runs go there too, and nothing is left in the environment for the
    # processes it starts (an `mlflow run --experiment-name` would refuse a second choice).
    with tracking.start_run(tracking.RunPlacement("a-run", {})) as run_id:
        assert MlflowClient().get_run(run_id).info.experiment_id == experiment_id
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ and "MLFLOW_EXPERIMENT_NAME" not in os.environ


def test_mlflow_s_own_ways_of_choosing_win(sqlite_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    experiment_id = tracking.choose_experiment("mnist-cnn")
    assert MlflowClient().get_experiment(experiment_id).name == "mine"
    assert MlflowClient().get_experiment_by_name("mnist-cnn") is None


def test_a_local_store_prints_the_ui_command_and_the_model_training_link(sqlite_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    (line,) = tracking.runs_view_lines("3")
    assert f"`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}`" in line
    assert line.endswith("http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")


def test_a_server_link_opens_the_model_training_view_without_the_password():
    mlflow.set_tracking_uri("http://alice:s3cret@tracking.example:5000/")
    try:
        (run_line,) = tracking.runs_view_lines("7", run_id="abc")
    finally:
        mlflow.set_tracking_uri(None)
    assert "s3cret" not in run_line and "alice" not in run_line
    assert run_line.endswith(": http://tracking.example:5000/#/experiments/7/runs/abc?workflowType=machine_learning")


def test_an_error_mangled_by_a_sigterm_still_ends_the_run_killed(sqlite_store, monkeypatch):
    """A SIGTERM raised inside TensorFlow's native code once came out as a SystemError; after a
    stop was requested, any error is that stop: the run ends KILLED and Terminated goes on."""
    from mnist_mlflow import cli, lifecycle

    monkeypatch.setattr(lifecycle, "_termination_reason", [lifecycle.Terminated("terminated by SIGTERM")])
    tracking.choose_experiment("mnist-dense")
    with pytest.raises(lifecycle.Terminated) as raised:
        with tracking.start_run(tracking.RunPlacement("a-run", {})) as run_id:
            raise SystemError("Objects/listobject.c:338: bad argument to internal function")
    assert raised.value.reason == "terminated by SIGTERM"
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.KILLED_REASON_TAG] == "terminated by SIGTERM"

    # Outside a run, the entry point still exits with 143 and one line.
    def main(argv):
        raise SystemError("bad argument to internal function")

    assert cli.run_main(main) == 143


def test_without_a_stop_an_error_is_an_error(sqlite_store, monkeypatch):
    from mnist_mlflow import cli, lifecycle

    monkeypatch.setattr(lifecycle, "_termination_reason", [])
    tracking.choose_experiment("mnist-dense")
    with pytest.raises(SystemError):
        with tracking.start_run(tracking.RunPlacement("a-run", {})) as run_id:
            raise SystemError("a real bug")
    run = MlflowClient().get_run(run_id)
    # A run that did not finish says why, even for an error nobody foresaw.
    assert run.info.status == "FAILED" and run.data.tags["failed_reason"] == "SystemError: a real bug"

    def main(argv):
        raise SystemError("a real bug")

    with pytest.raises(SystemError):
        cli.run_main(main)


def test_a_session_that_fails_while_it_starts_still_ends_its_run(sqlite_store, monkeypatch):
    """A with statement skips __exit__ when __enter__ raises; the run must not stay RUNNING."""
    from mnist_mlflow.tracking import session as session_module

    experiment_id = tracking.choose_experiment("mnist-dense")

    def broken() -> str:
        raise RuntimeError("the announcement failed")

    monkeypatch.setattr(session_module, "tracking_uri_shown", broken)
    session = tracking.RunSession(tracking.RunPlacement("a-run", {}), tracking.Fingerprint({"parameters": "p"}))
    with pytest.raises(RuntimeError):
        with session:
            pass
    (run,) = MlflowClient().search_runs([experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_reason"] == "RuntimeError: the announcement failed"
