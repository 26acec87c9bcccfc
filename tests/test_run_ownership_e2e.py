"""Who holds a run, tested with real processes forced to overlap (SIGSTOP, SIGCONT, SIGKILL,
SIGTERM) against a real `mlflow server`: one holder at a time, a stale holder writes nothing,
a damaged checkpoint falls back, other software or data starts anew, and a SIGTERM at any
moment ends the run KILLED."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient
from test_reliability_e2e import experiment_runs, signal_when, start, wait_for

from harness.servers import python_env

pytestmark = pytest.mark.e2e

DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
EPOCHS = 120
DENSE_COMMAND = [sys.executable, DENSE, "--epochs", str(EPOCHS), "--max_train_examples", "1000", "--dropout", "0.2"]
# For the damaged-checkpoint tests, which need no overlap, only a kill after a few epochs and a resume.
SHORT_EPOCHS = 40
SHORT_DENSE_COMMAND = [DENSE_COMMAND[0], DENSE, "--epochs", str(SHORT_EPOCHS), *DENSE_COMMAND[4:]]
LEASE_TAG = "mnist_mlflow.lease"


def _running_with_checkpoint(client: MlflowClient, experiment: str, epoch: int):
    runs = [run for run in experiment_runs(client, experiment) if run.info.status == "RUNNING"]
    if len(runs) == 1 and int(runs[0].data.tags.get("mnist_mlflow.checkpoint_epoch", "-1")) >= epoch:
        return runs[0]
    return None


def _killed_run(client: MlflowClient, experiment: str, env: dict[str, str], epoch: int = 2, command=DENSE_COMMAND):
    """A dense run killed with SIGKILL once its checkpoint holds ``epoch``: (run id, its checkpoint epoch)."""
    process = start(command, env)
    run, _ = signal_when(
        process, lambda: _running_with_checkpoint(client, experiment, epoch), f"epoch {epoch + 1}", signal.SIGKILL
    )
    return run.info.run_id, int(client.get_run(run.info.run_id).data.tags["mnist_mlflow.checkpoint_epoch"])


def _fence(client: MlflowClient, run_id: str) -> int:
    return int(client.get_run(run_id).data.tags.get(LEASE_TAG, "0:").split(":")[0])


def _steps(client: MlflowClient, run_id: str, key: str = "val_accuracy") -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, key))


def _assert_whole(client: MlflowClient, run_id: str, epochs: int = EPOCHS) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy", "epoch_time_s"):
        assert _steps(client, run_id, key) == list(range(epochs)), f"{key}: each step exactly once"


def _lines(stderr: str) -> list[str]:
    """The project's own lines on stderr (TensorFlow's start-up chatter left out)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "stopped:", "interrupted"))]


def test_two_processes_resuming_one_killed_run_exactly_one_wins(mlflow_server, tmp_path):
    """The first resumer is frozen right after its claim, inside the gap (checkpoint download,
    build, compile) where both once printed "Resuming run"; the second must refuse."""
    client, experiment = MlflowClient(mlflow_server.url), "ownership-two-resumers"
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    run_id, _ = _killed_run(client, experiment, env)
    fence = _fence(client, run_id)

    first = start(DENSE_COMMAND, env, cwd=tmp_path)
    try:
        wait_for(lambda: _fence(client, run_id) > fence, "the first resumer's claim", process=first)
        first.send_signal(signal.SIGSTOP)
        assert client.get_run(run_id).info.status == "KILLED", "frozen before it reopened the run"
        second = run_script(DENSE_COMMAND, env, cwd=tmp_path)
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 75, second.stderr[-3000:]
    assert _lines(second.stderr) == [
        f"stopped: not resuming run {run_id}: another process holds run {run_id} (fence {fence + 1}) and renews it; "
        "that process carries on with it, and this one wrote nothing to it"
    ]
    assert "Resuming run" not in second.stdout and "Traceback" not in second.stderr
    assert first.returncode == 0, stderr[-3000:]
    assert f"Resuming run {run_id} (resume 1)" in stdout
    assert len(experiment_runs(client, experiment)) == 1, "the loser started no run"
    _assert_whole(client, run_id)


def test_a_suspended_process_whose_run_was_taken_over_writes_nothing_more(mlflow_server, tmp_path):
    """A job frozen past its lease (SLURM suspend, a paused VM) has its run closed and resumed by
    the next command; woken up, it stops with one line and writes nothing."""
    client, experiment = MlflowClient(mlflow_server.url), "ownership-suspended"
    # A short server timeout makes the lease short: 4 s, plus two renewals of 1 s.
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment, MNIST_MLFLOW_SERVER_TIMEOUT_S="4")
    stale = start(DENSE_COMMAND, env, cwd=tmp_path)
    try:
        run = wait_for(lambda: _running_with_checkpoint(client, experiment, 2), "epoch 3", process=stale)
        stale.send_signal(signal.SIGSTOP)
        time.sleep(10)  # Past the lease: 6 s, and the server clock's resolution.
        resumer = start(DENSE_COMMAND, env, cwd=tmp_path)
        wait_for(
            lambda: client.get_run(run.info.run_id).data.tags.get("resume_count") == "1",
            "the take-over",
            process=resumer,
        )
        stale.send_signal(signal.SIGCONT)
        stale_out, stale_err = stale.communicate(timeout=120)
        resumer_out, resumer_err = resumer.communicate(timeout=600)
    finally:
        for process in (stale, locals().get("resumer")):
            if process is not None and process.poll() is None:
                process.kill()
    assert stale.returncode == 1, stale_err[-3000:]
    (line,) = _lines(stale_err)
    assert line.startswith(f"error: run {run.info.run_id} was ") and "by another process" in line
    assert "Traceback" not in stale_err
    assert resumer.returncode == 0, resumer_err[-3000:]
    assert f"Resuming run {run.info.run_id} (resume 1)" in resumer_out
    _assert_whole(client, run.info.run_id)


def _checkpoint_file(mlflow_server, run_id: str, folder: str, name: str):
    """A file of the run's checkpoint folder (``a``, ``b`` or ``best``) in the server's store, or None."""
    return next((mlflow_server.root / "artifacts").glob(f"*/{run_id}/artifacts/checkpoint/{folder}/{name}"), None)


def _slot_file(mlflow_server, run_id: str, slot: str, name: str = "latest.weights.h5"):
    path = _checkpoint_file(mlflow_server, run_id, slot, name)
    assert path is not None, f"no {name} in slot {slot}"
    return path


def _whole_slot_epoch(mlflow_server, run_id: str, slot: str) -> int | None:
    """The epoch a checkpoint slot on the server holds, when every file its manifest names is there
    and matches its digest; None when a kill cut the slot's upload short."""
    import hashlib

    manifest_file = _checkpoint_file(mlflow_server, run_id, slot, "manifest.json")
    try:
        manifest = json.loads(manifest_file.read_text()) if manifest_file else None
    except (OSError, ValueError):
        manifest = None
    if manifest is None:
        return None
    for name, digest in manifest["sha256"].items():
        path = _checkpoint_file(mlflow_server, run_id, "best" if name.startswith("best-") else slot, name)
        if path is None or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return None
    return int(manifest["epoch"])


def test_a_damaged_checkpoint_falls_back_to_the_other_slot(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    # The SIGKILL may land while the other slot is being rewritten with the next epoch; then both
    # slots are unusable once the test damages the latest (the slow test below checks that case),
    # and the test kills a new run.
    for attempt in range(3):
        experiment = f"ownership-damaged-slot-{attempt}"
        env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
        run_id, _ = _killed_run(client, experiment, env, epoch=3, command=SHORT_DENSE_COMMAND)
        latest = client.get_run(run_id).data.tags["mnist_mlflow.checkpoint_slot"]
        other_epoch = _whole_slot_epoch(mlflow_server, run_id, "b" if latest == "a" else "a")
        if other_epoch is not None:
            break
    else:
        pytest.fail("three kills in a row each cut the other slot's upload short")
    weights = _slot_file(mlflow_server, run_id, latest)
    weights.write_bytes(weights.read_bytes()[:1000])

    result = run_script(SHORT_DENSE_COMMAND, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"The latest checkpoint of run {run_id} cannot be used (slot {latest}: latest.weights.h5 does not match "
        "its SHA-256 digest); trying the other slot"
    ) in result.stdout
    # The other slot holds the epoch before (or, when the kill came between its upload and the tag
    # that names it, the epoch after).
    assert (
        f"Resuming run {run_id} (resume 1) from its checkpoint after epoch {other_epoch + 1} of {SHORT_EPOCHS}"
        in result.stdout
    ), result.stdout[-2000:]
    _assert_whole(client, run_id, SHORT_EPOCHS)


@pytest.mark.slow
def test_with_both_slots_damaged_a_new_run_starts_and_says_why(mlflow_server, tmp_path):
    client, experiment = MlflowClient(mlflow_server.url), "ownership-damaged-both"
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    run_id, _ = _killed_run(client, experiment, env, epoch=3, command=SHORT_DENSE_COMMAND)
    for slot in ("a", "b"):
        _slot_file(mlflow_server, run_id, slot, "manifest.json").write_text("[]")

    result = run_script(SHORT_DENSE_COMMAND, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Neither checkpoint of run {run_id} can be used (slot " in result.stdout
    assert "starting a new run" in result.stdout and "Resuming run" not in result.stdout
    (killed,) = [run for run in experiment_runs(client, experiment) if run.info.run_id == run_id]
    assert killed.info.status == "KILLED"
    (new,) = [run for run in experiment_runs(client, experiment) if run.info.run_id != run_id]
    _assert_whole(client, new.info.run_id, SHORT_EPOCHS)


@pytest.mark.slow  # a changed parameter (test_resume_e2e) takes the same path by default
def test_a_run_of_other_software_is_not_resumed_and_the_line_says_what_differs(mlflow_server, tmp_path):
    client, experiment = MlflowClient(mlflow_server.url), "ownership-other-software"
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    run_id, _ = _killed_run(client, experiment, env, epoch=1)
    # As if the killed run had been trained by an older TensorFlow on other data.
    recorded = json.loads(client.get_run(run_id).data.tags["mnist_mlflow.fingerprint"])
    client.set_tag(
        run_id, "mnist_mlflow.fingerprint", json.dumps({**recorded, "tensorflow": "2.0.0", "data": "0" * 16})
    )

    result = run_script(DENSE_COMMAND, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Not resuming run {run_id} (killed after epoch " in result.stdout
    assert f"data {'0' * 16} there, {recorded['data']} here" in result.stdout
    assert f"tensorflow 2.0.0 there, {recorded['tensorflow']} here" in result.stdout
    assert len(experiment_runs(client, experiment)) == 2


@pytest.mark.parametrize("round_number", [0, *(pytest.param(number, marks=pytest.mark.slow) for number in range(1, 4))])
def test_a_sigterm_at_a_random_moment_of_training_ends_the_run_killed(mlflow_server, tmp_path, round_number):
    """A few SIGTERMs at random moments (benchmarks/sigterm_loop.py sends a hundred)."""
    client, experiment = MlflowClient(mlflow_server.url), f"ownership-sigterm-{round_number}"
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    process = start(DENSE_COMMAND, env, cwd=tmp_path)
    try:
        wait_for(lambda: _running_with_checkpoint(client, experiment, 0), "the first epoch", process=process)
        time.sleep(random.Random(round_number).uniform(0, 1.5))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert _lines(stderr) == ["stopped: terminated by SIGTERM; the runs of this process ended KILLED"]
    (run,) = experiment_runs(client, experiment)
    assert run.info.status == "KILLED" and run.data.tags["killed_reason"] == "terminated by SIGTERM"


def test_sigterm_during_a_fit_waits_for_the_step_boundary(tmp_path):
    """Inside a fit, the handler records the stop; the callback raises it between two steps."""
    code = (
        "import os, signal\n"
        "from mnist_mlflow import lifecycle\n"
        "lifecycle.install_signal_handlers()\n"
        "with lifecycle.stops_at_boundaries():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('still inside', flush=True)\n"
        "    try:\n"
        "        lifecycle.raise_pending_stop()\n"
        "    except lifecycle.Terminated as stop:\n"
        "        print('raised at the boundary:', stop.reason, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR, timeout=60)
    assert result.stdout.splitlines() == ["still inside", "raised at the boundary: terminated by SIGTERM"]


def test_leases_are_judged_on_the_server_s_clock_not_on_a_skewed_local_one(mlflow_server, monkeypatch):
    """A host whose clock runs two minutes ahead must not take a live lease for expired."""
    import mlflow

    from mnist_mlflow.tracking import lease

    real_time = time.time
    monkeypatch.setattr(lease.time, "time", lambda: real_time() + 120)
    monkeypatch.setattr(lease, "CLOCK", lease.ServerClock())
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        server_now = lease.CLOCK.now()
        assert abs(server_now - real_time()) < 3, "the offset from the server's Date header undoes the skew"
        live = {lease.LEASE_UNTIL_TAG: f"{real_time() + 30:.1f}"}
        assert not lease.lease_expired(live)
        assert lease.lease_expired({lease.LEASE_UNTIL_TAG: f"{real_time() - 30:.1f}"})
    finally:
        mlflow.set_tracking_uri(None)


def test_a_sigterm_swallowed_by_a_finaliser_is_raised_at_the_next_safe_point(tmp_path):
    """Seen in CI: a SIGTERM raised inside a weakref callback during a garbage collection is
    printed as "Exception ignored" and lost; the stop must still take effect."""
    code = (
        "import os, signal\n"
        "from mnist_mlflow import lifecycle\n"
        "lifecycle.install_signal_handlers()\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        sum(range(1000))\n"
        "Finalised()\n"
        "print('went on', flush=True)\n"
        "try:\n"
        "    lifecycle.raise_pending_stop()\n"
        "except lifecycle.Terminated as stop:\n"
        "    print('raised at the safe point:', stop.reason, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR, timeout=60)
    assert "Exception ignored" in result.stderr, "the finaliser swallowed the first raise"
    assert result.stdout.splitlines() == ["went on", "raised at the safe point: terminated by SIGTERM"]
