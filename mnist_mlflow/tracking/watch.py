"""A run's link to the tracking server while it trains: watched, renewed, and nothing lost silently.

- :func:`bound_http_requests`: MLflow's client retries a failed request for minutes by default
  (and a black-holed server for far longer). The project bounds each request's retries, so
  that no call waits long on a server that is gone.
- :class:`RunWatch`: one daemon thread per process. For every run this process holds, it
  checks every few seconds that the run is still RUNNING (someone else may have closed it) and
  renews the run's ``process_alive_until`` tag, the heartbeat that lets any host tell later
  that nobody is working on the run. When the server has not answered for
  ``MNIST_MLFLOW_SERVER_TIMEOUT_S`` seconds, it stops the main thread.
- :func:`epoch_ledger`: a Keras callback that keeps every per-epoch metric value. MLflow's
  autolog sends them in the background and drops what the server did not take; at the end of
  the run the ledger sends again what the server lacks. If the server is gone, the ledger is
  written to a local spool file, and the next command against that server delivers it
  (:func:`deliver_spooled_runs`) and closes the run FAILED, saying what came late.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.tracking.server import SERVER_TIMEOUT_ENV, server_timeout_s, tracking_uri_shown

# The heartbeat tag: until when (seconds since the epoch) the holder promises to either renew
# it or have stopped. A holder stops within its server timeout of losing the server.
ALIVE_UNTIL_TAG = "process_alive_until"
# The longest pause between two looks of the watch: a heartbeat costs two small requests.
MAX_WATCH_INTERVAL_S = 15.0
# Clocks of different hosts disagree a little; a heartbeat counts as expired only this much later.
CLOCK_SKEW_S = 30.0
SPOOL_DIR_ENV = "MNIST_MLFLOW_SPOOL_DIR"
LATE_METRICS_TAG = "metrics_delivered_late"


def watch_interval_s() -> float:
    """How often the watch looks at the server: four times per timeout, and at least every
    ``MAX_WATCH_INTERVAL_S``."""
    return max(1.0, min(MAX_WATCH_INTERVAL_S, server_timeout_s() / 4))


class TrackingServerLost(lifecycle.Terminated):
    """The tracking server stopped answering while this process held a run."""

    exit_status = 69  # EX_UNAVAILABLE

    def line(self) -> str:
        return f"error: {self.reason}"


class RunClosedElsewhere(lifecycle.Terminated):
    """Another process closed a run that this process was still working on."""

    exit_status = 1

    def line(self) -> str:
        return f"error: {self.reason}"


# What MLflow's "API request to ... failed with exception ..." says when nothing answered.
UNREACHABLE_SIGNS = (
    "Connection refused",
    "NewConnectionError",
    "timed out",
    "Connection aborted",
    "RemoteDisconnected",
)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not be reached (not that it refused)."""
    import requests

    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return True
    message = str(error)
    return "API request to" in message and any(
        sign in message
        for sign in (
            "Connection refused",
            "NewConnectionError",
            "timed out",
            "Connection aborted",
            "RemoteDisconnected",
        )
    )


def server_lost(error: BaseException, run_id: str | None = None) -> TrackingServerLost | None:
    """The stop an exception of the main thread stands for, if it says the server is gone."""
    if isinstance(error, TrackingServerLost):
        return error
    if not _unreachable(error):
        return None
    return TrackingServerLost(_lost_line(run_id, "did not answer a request, even after MLflow's retries"))


def _lost_line(run_id: str | None, what: str) -> str:
    held = f"; run {run_id} stays RUNNING there until it is back" if run_id else ""
    return f"the MLflow tracking server at {tracking_uri_shown()} {what}{held}"


class RunWatch:
    """The process's one watching thread (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # run id -> (the tracking URI it lives at, whether its status is checked)
        self._runs: dict[str, tuple[str, bool]] = {}
        self._thread: threading.Thread | None = None
        self._last_answer = time.monotonic()
        self._stopping = False

    def add(self, run_id: str, check_status: bool = True) -> None:
        """Watches ``run_id``; ``check_status=False`` only renews its heartbeat (a shared study parent)."""
        with self._lock:
            self._runs[run_id] = (mlflow.get_tracking_uri(), check_status)
            self._last_answer = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="mlflow-run-watch", daemon=True)
                self._thread.start()
        # The first heartbeat at once, so that a run is never without one.
        self._renew(run_id, mlflow.get_tracking_uri())

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _renew(self, run_id: str, uri: str) -> None:
        until = time.time() + server_timeout_s() + 2 * watch_interval_s()
        MlflowClient(tracking_uri=uri).set_tag(run_id, ALIVE_UNTIL_TAG, f"{until:.0f}")

    def _loop(self) -> None:
        while True:
            time.sleep(watch_interval_s())
            with self._lock:
                runs = dict(self._runs)
            if not runs or self._stopping:
                continue
            try:
                for run_id, (uri, check_status) in runs.items():
                    if check_status:
                        run = MlflowClient(tracking_uri=uri).get_run(run_id)
                        if run.info.status != "RUNNING" and run_id in self._runs:
                            self._stop(RunClosedElsewhere(closed_elsewhere_line(run)))
                            break
                    self._renew(run_id, uri)
                self._last_answer = time.monotonic()
            except Exception as error:  # noqa: BLE001 - the watch must outlive any failure
                if not _unreachable(error) and "too many" not in str(error):
                    continue
                silent_for = time.monotonic() - self._last_answer
                if silent_for > server_timeout_s():
                    holder = next(iter(runs))
                    self._stop(
                        TrackingServerLost(
                            _lost_line(holder, f"has not answered for {silent_for:.0f} s ({SERVER_TIMEOUT_ENV})")
                        )
                    )

    def _stop(self, stop: lifecycle.Terminated) -> None:
        self._stopping = True
        lifecycle.request_stop(stop)


WATCH = RunWatch()


def closed_elsewhere_line(run) -> str:
    """What a process says when it finds its run closed by someone else."""
    reason = run.data.tags.get("killed_reason") or run.data.tags.get("failed_reason") or "no reason given"
    return (
        f"run {run.info.run_id} was closed {run.info.status} by another process while this one was "
        f"still training it ({reason[:200]}); stopping without touching it"
    )


def check_still_running(run_id: str) -> None:
    """Raises :class:`RunClosedElsewhere` when someone else has closed the run in the meantime."""
    run = MlflowClient().get_run(run_id)
    if run.info.status != "RUNNING":
        raise RunClosedElsewhere(closed_elsewhere_line(run))


def forget_active_run() -> None:
    """Lets go of this thread's active run without writing anything to the server.

    MLflow's ``end_run`` always writes the run's status, which must not happen when another
    process closed the run or when the server is gone. This does what it does otherwise: the
    run leaves the active-run stack, so neither the ``with`` block nor MLflow's exit handler
    ends it. It relies on MLflow's private ``_active_run_stack`` (tested against MLflow's own
    behaviour in tests/test_mid_run_failures_e2e.py).
    """
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        MLFLOW_RUN_ID.unset()
        stack.pop()


def silence_background_logging() -> None:
    """MLflow's background logging threads print a traceback for each batch they cannot send;
    once the process knows the server is gone and has said so, those add nothing."""
    for name in ("mlflow.utils.async_logging", "mlflow.utils.async_logging.async_logging_queue"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


# --- The ledger of per-epoch metrics ---

_ledgers: dict[str, dict[str, dict[int, tuple[float, int]]]] = {}


def epoch_ledger(run_id: str):
    """A Keras callback that keeps every epoch's metrics of run ``run_id`` (see the module docstring)."""
    import keras

    points = _ledgers.setdefault(run_id, {})

    class EpochLedger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            now_ms = int(time.time() * 1000)
            for key, value in (logs or {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    points.setdefault(key, {})[int(epoch)] = (float(value), now_ms)

    return EpochLedger()


def _steps_text(missing: dict[str, list[int]]) -> str:
    steps = sorted({step for values in missing.values() for step in values})
    shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
    return f"{sum(map(len, missing.values()))} values of {', '.join(sorted(missing))} at steps {shown}"


def send_missing(client: MlflowClient, run_id: str, points: Mapping[str, Mapping[int, tuple[float, int]]]):
    """Logs the ``points`` (key -> step -> (value, timestamp)) that the run's metric history
    lacks, in batches; returns the steps sent, by key."""
    from mlflow.entities import Metric

    missing: dict[str, list[int]] = {}
    metrics = []
    for key, by_step in points.items():
        have = {point.step for point in client.get_metric_history(run_id, key)}
        for step, (value, timestamp) in sorted(by_step.items()):
            if step not in have:
                missing.setdefault(key, []).append(step)
                metrics.append(Metric(key, float(value), int(timestamp), step))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return missing


def deliver_ledger(run_id: str) -> str | None:
    """Sends again the ledger's values the server lacks; returns what was sent, or None."""
    points = _ledgers.pop(run_id, {})
    if not points:
        return None
    mlflow.flush_async_logging()
    client = MlflowClient()
    missing = send_missing(client, run_id, points)
    if not missing:
        return None
    text = _steps_text(missing)
    client.set_tag(run_id, LATE_METRICS_TAG, text[:5000])
    return text


def spool_dir() -> Path:
    return Path(os.environ.get(SPOOL_DIR_ENV) or Path.home() / ".cache" / "mnist_mlflow" / "undelivered")


def spool_run(run_id: str, reason: str) -> Path | None:
    """Writes what run ``run_id`` could not send (its ledger and why it stopped) to the spool."""
    points = _ledgers.pop(run_id, {})
    folder = spool_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}.json"
        record = {
            "tracking_uri": tracking_uri_shown(),
            "run_id": run_id,
            "reason": reason,
            "metrics": {
                key: {str(step): list(point) for step, point in steps.items()} for key, steps in points.items()
            },
        }
        path.write_text(json.dumps(record))
        return path
    except OSError:
        return None


def deliver_spooled_runs() -> list[str]:
    """Delivers the spooled records of this tracking server; returns one line per run delivered.

    Each run gets the metric values it lacks and is closed FAILED with the reason it stopped,
    if it is still RUNNING. A record the server cannot take yet stays for the next command.
    """
    folder = spool_dir()
    if not folder.is_dir():
        return []
    shown = tracking_uri_shown()
    lines = []
    client = MlflowClient()
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if record.get("tracking_uri") != shown:
                continue
            run_id = record["run_id"]
            run = client.get_run(run_id)
            points = {
                key: {int(step): (value, timestamp) for step, (value, timestamp) in steps.items()}
                for key, steps in record["metrics"].items()
            }
            missing = send_missing(client, run_id, points)
            late = _steps_text(missing) if missing else "none"
            client.set_tag(run_id, LATE_METRICS_TAG, late[:5000])
            if run.info.status == "RUNNING":
                client.set_tag(run_id, "failed_reason", record["reason"][:5000])
                client.set_terminated(run_id, status="FAILED")
            lines.append(
                f"Run {run_id} had stopped when its tracking server was unreachable; "
                f"delivered the metric values it could not send ({late}); the run is FAILED"
            )
        except (OSError, ValueError, KeyError, TypeError):
            lines.append(f"Ignoring the unreadable spool record {path}")
        except mlflow.exceptions.MlflowException as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(error, "error_code", "")):
                continue  # The server cannot take it yet; the record waits for the next command.
            lines.append(f"Run {path.stem} no longer exists at {shown}; dropping its spool record")
        except Exception as error:  # noqa: BLE001 - an unreachable server: try again next time
            if _unreachable(error):
                continue
            raise
        with contextlib.suppress(OSError):
            path.unlink()
    return lines


def upload_failure(error: BaseException) -> str | None:
    """One line for a failed artifact or model upload (a full disk, most often), or None.

    With a tracking server, its artifact store answers HTTP 500 and only the server's log says
    why; with a local store, the write fails with ``ENOSPC`` here.
    """
    import errno
    import re

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        active = mlflow.active_run()
        where = error.filename or (mlflow.get_artifact_uri() if active else "the artifact store")
        return f"writing the run's artifacts to {where} failed: no space left on device"
    message = str(error)
    if "mlflow-artifacts" not in message and "artifact" not in message.lower():
        return None
    status = re.search(r"too many (\d{3}) error responses|status code (\d{3})|HTTP (\d{3})", message)
    if status is None:
        return None
    code = next(group for group in status.groups() if group)
    artifact = re.search(r"/mlflow-artifacts/artifacts/(?:[^/\s']+/){2}artifacts/([^\s'?]+)", message)
    what = f"artifact {artifact.group(1)}" if artifact else "an artifact"
    return (
        f"uploading {what} to the artifact store of {tracking_uri_shown()} failed with HTTP {code}, "
        "even after MLflow's retries; the server's log says why (often a full disk)"
    )
