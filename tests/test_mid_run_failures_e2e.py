"""When the world fails mid-run, against real parts: a killed `mlflow server`, a killed PostgreSQL,
a full filesystem (a small tmpfs), and a neighbouring PID namespace.

Each test makes the failure happen to a real entry point while it works, then checks the one
line it ends with, its exit status, and the state its runs are left in.
"""

from __future__ import annotations

import json
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
# Long enough to outlive the server's timeout after four epochs; the resume trains the rest.
RESUMED_DENSE = [DENSE, "--epochs", "100", "--max_train_examples", "300", "--batch_size", "100"]
# The tests' server timeout: the run must stop within it (plus one watch interval and a retry).
TIMEOUT_S = 6


def _env(server_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {
        "MNIST_MLFLOW_SERVER_TIMEOUT_S": str(TIMEOUT_S),
        "MNIST_MLFLOW_SPOOL_DIR": str(tmp_path / "spool"),
        "MLFLOW_EXPERIMENT_NAME": "mid-run",
    }
    return python_env(server_url, **{**settings, **extra})


def _piped(env: dict[str, str]) -> dict:
    return dict(cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_run(client: MlflowClient, experiment: str = "mid-run"):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0] if len(runs) == 1 else None


def _epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, "val_accuracy"))


def _error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's and absl's start-up chatter."""
    noise = ("WARNING: All log messages", "I0000", "W0000", "oneDNN", "cuda", "E0000", "INFO mlflow.store.db")
    # Optuna's own log lines, such as "[I 2026-...] A new study created in RDB".
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not any(word in line for word in noise) and not line.startswith("[I ")
    ]


def test_a_killed_tracking_server_stops_the_run_in_bounded_time_and_loses_no_metric(tmp_path):
    root = tmp_path / "server"
    server = tracking_server(root).start()
    client = MlflowClient(server.url)
    env = _env(server.url, tmp_path)
    process = subprocess.Popen([sys.executable, *LONG_DENSE], **_piped(env))
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
        assert (
            "did not answer" in after.data.tags["failed_reason"]
            or "has not answered" in after.data.tags["failed_reason"]
        )
        assert _epochs_logged(client, run.info.run_id) == trained_epochs
        assert "val_accuracy" in after.data.tags["metrics_delivered_late"]
        assert not (tmp_path / "spool" / f"{run.info.run_id}.json").exists()
    finally:
        server.stop()


@pytest.mark.slow  # the lost server and its spool are checked by default in the test above
def test_a_lost_server_and_an_unwritable_spool_say_what_was_not_kept_and_the_resume_logs_each_step_once(tmp_path):
    root = tmp_path / "server"
    server = tracking_server(root).start()
    client = MlflowClient(server.url)
    (tmp_path / "a-file").write_text("not a folder")
    spool = tmp_path / "a-file" / "spool"
    env = _env(server.url, tmp_path, MNIST_MLFLOW_SPOOL_DIR=str(spool))
    process = subprocess.Popen([sys.executable, *RESUMED_DENSE], **_piped(env))
    try:
        run = wait_for(lambda: _one_run(client), "the run to start", process=process)
        wait_for(lambda: len(_epochs_logged(client, run.info.run_id)) >= 4, "four epochs", process=process)
        server.kill()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 69, (stdout[-2000:], stderr[-3000:])
    (line,) = _error_lines(stderr)
    assert f"the spool folder {spool} cannot be written (MNIST_MLFLOW_SPOOL_DIR)" in line
    assert " epoch(s) could not be kept either" in line

    # Back on the same store: the same command closes the run (its process is gone) and resumes
    # it from its checkpoint; the epochs it trains again are not logged a second time.
    server = tracking_server(root, port=server.port).start()
    try:
        result = run_script([sys.executable, *RESUMED_DENSE], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Resuming run {run.info.run_id} (resume 1)" in result.stdout
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        for key in ("val_accuracy", "loss", "epoch_time_s"):
            steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(100)), key
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
    process = subprocess.Popen([sys.executable, *command], **_piped(env))
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


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


needs_pid_namespaces = pytest.mark.skipif(
    not _unshare_available(), reason="creating PID namespaces needs unshare and the right to use it (root here)"
)
IN_NEW_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _python_of(process: subprocess.Popen):
    """The Python process under ``unshare`` (the namespace's pid 1), as the host sees it."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    return next(child for child in children if "python" in child.name())


@pytest.mark.slow  # a dozen processes in two PID namespaces
@needs_pid_namespaces
def test_runs_in_another_pid_namespace_are_never_taken_for_dead_in_either_direction(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    env = _env(mlflow_server.url, tmp_path, MLFLOW_EXPERIMENT_NAME="pid-namespaces")
    common = dict(cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inside = subprocess.Popen([*IN_NEW_PID_NAMESPACE, sys.executable, *LONG_DENSE], **common)
    host = subprocess.Popen([sys.executable, *LONG_DENSE], **common)
    try:

        def two_training():
            found = client.get_experiment_by_name("pid-namespaces")
            runs = client.search_runs([found.experiment_id]) if found else []
            training = [run for run in runs if run.info.status == "RUNNING" and "val_accuracy" in run.data.metrics]
            return training if len(training) == 2 else None

        runs = wait_for(two_training, "both runs to train", process=inside)
        by_namespace = {run.data.tags["mnist_mlflow.process_pid_namespace"]: run for run in runs}
        assert len(by_namespace) == 2, "the two runs should record different PID namespaces"
        # The run inside the namespace records pid 1, which on the host is a real, other process.
        assert {run.data.tags["mnist_mlflow.process_id"] for run in runs} >= {"1"}

        from_host = run_script([sys.executable, RECONCILE, "--experiment", "pid-namespaces"], env)
        from_inside = run_script(
            [*IN_NEW_PID_NAMESPACE, sys.executable, RECONCILE, "--experiment", "pid-namespaces"], env
        )
        for result in (from_host, from_inside):
            assert result.returncode == 0, result.stderr[-3000:]
            assert "0 run(s) closed KILLED" in result.stdout, result.stdout
        assert all(client.get_run(run.info.run_id).info.status == "RUNNING" for run in runs)

        # Someone closes the host's live run anyway (say, an older reconcile): the process says
        # so in one line and leaves the run as that someone left it.
        host_run = next(run for run in runs if run.data.tags["mnist_mlflow.process_id"] != "1")
        client.set_tag(host_run.info.run_id, "killed_reason", "closed by hand")
        client.set_terminated(host_run.info.run_id, status="KILLED")
        stdout, stderr = host.communicate(timeout=120)
        lines = _error_lines(stderr)
        assert host.returncode == 1, (stdout[-2000:], stderr[-3000:])
        assert len(lines) == 1 and "was closed KILLED by another process" in lines[0], lines
        after = client.get_run(host_run.info.run_id)
        assert after.info.status == "KILLED" and after.data.tags["killed_reason"] == "closed by hand"

        # The run inside the namespace still ends as a stopped run should.
        _python_of(inside).send_signal(signal.SIGTERM)
        inside.communicate(timeout=120)
        inside_run = next(run for run in runs if run.data.tags["mnist_mlflow.process_id"] == "1")
        assert client.get_run(inside_run.info.run_id).info.status == "KILLED"
    finally:
        for process in (inside, host):
            process.kill()


@pytest.fixture()
def full_filesystem(tmp_path):
    """A real, small tmpfs, filled to the last byte; skipped where tmpfs cannot be mounted."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (folder / "mlruns").mkdir()
        with open(folder / "filler", "wb") as filler:
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


SHORT_DENSE = [DENSE, "--epochs", "2", "--max_train_examples", "300"]


def _assert_failed_upload(client: MlflowClient, result, started: float, where: str):
    lines = _error_lines(result.stderr)
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and where in lines[0], lines[0]
    assert time.monotonic() - started < 90
    run = _one_run(client, "full-disk")
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_reason"] == lines[0].removeprefix("error: ")
    # What was logged before the upload failed is kept (the first upload comes before training).
    assert run.data.params["epochs"] == "2" and run.data.params["trainable_parameters"]
    print(lines[0])


def test_a_full_artifact_store_behind_the_server_is_one_line_and_a_failed_reason(tmp_path, full_filesystem):
    root = tmp_path / "server"
    root.mkdir()
    (root / "artifacts").symlink_to(full_filesystem / "mlruns")
    with tracking_server(root) as server:
        env = _env(server.url, tmp_path, MLFLOW_EXPERIMENT_NAME="full-disk")
        started = time.monotonic()
        result = run_script([sys.executable, *SHORT_DENSE], env)
        _assert_failed_upload(MlflowClient(server.url), result, started, f"artifact store of {server.url}")


def test_a_full_disk_under_a_local_store_is_one_line_and_a_failed_reason(tmp_path, full_filesystem):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(store, tmp_path, MLFLOW_EXPERIMENT_NAME="full-disk")
    started = time.monotonic()
    # The working directory is the full filesystem, so the runs' artifacts go to its ./mlruns.
    result = run_script([sys.executable, *SHORT_DENSE], env, cwd=full_filesystem)
    _assert_failed_upload(MlflowClient(store), result, started, "no space left on device")
    assert f"to {full_filesystem}/mlruns/" in result.stderr


def test_a_killed_study_database_is_one_line_and_every_run_of_the_worker_ends_stated(mlflow_server, tmp_path):
    from urllib.parse import quote

    from harness.servers import PostgresServer

    search_space_file = tmp_path / "two.yaml"
    search_space_file.write_text("parameters:\n  units: [16, 32]\n")
    search_space_file = str(search_space_file)

    password = "pg:s3cret@%"
    client = MlflowClient(mlflow_server.url)
    with PostgresServer(password=password) as database:
        storage = database.url.replace("search@", f"search:{quote(password, safe='')}@")
        env = _env(mlflow_server.url, tmp_path, MLFLOW_EXPERIMENT_NAME="dead-database", **database.client_env())
        command = [SEARCH, "--space", search_space_file, "--epochs", "300", "--max_train_examples", "300"]
        process = subprocess.Popen([sys.executable, *command, "--storage", storage], **_piped(env))
        try:

            def training_child():
                found = client.get_experiment_by_name("dead-database")
                runs = client.search_runs([found.experiment_id]) if found else []
                return [run for run in runs if run.data.tags.get("study_role") == "child" and run.data.metrics]

            wait_for(training_child, "a trial to train", process=process)
            database.kill()
            stdout, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
    lines = _error_lines(stderr)
    assert process.returncode == 1, (stdout[-2000:], stderr[-3000:])
    assert len(lines) == 1, lines
    shown = database.url.replace("search@", "search:***@")
    assert f"error: the study storage {shown} cannot be reached" in lines[0], lines[0]
    assert "s3cret" not in stdout + stderr
    found = client.get_experiment_by_name("dead-database")
    runs = client.search_runs([found.experiment_id])
    assert runs and all(run.info.status in ("FAILED", "KILLED") for run in runs), [r.info.status for r in runs]
    for run in runs:
        reason = run.data.tags.get("failed_reason") or run.data.tags.get("killed_reason")
        assert "study storage" in reason, (run.data.tags.get("study_role"), reason)
