"""A run's link to the tracking server while it trains: watched, renewed, and nothing lost silently.

- :func:`bound_http_requests`: MLflow's client retries a failed request for minutes by default
  (and a black-holed server for far longer). The project bounds each request's retries, so
  that no call waits long on a server that is gone.
- :class:`RunWatch`: one daemon thread per process. For every run this process holds, it
  renews the run's lease every few seconds (:mod:`~.lease`), the heartbeat that lets any host
  tell later that nobody is working on the run; a lease taken over, or a run closed by someone
  else, stops the main thread. A study's parent is renewed only while none of its children is
  held here: a child's live lease keeps its parent alive (``runs.reconcile_runs``), so sixteen
  workers do not all beat one parent. When the server has not answered for
  ``MNIST_MLFLOW_SERVER_TIMEOUT_S`` seconds, it stops the main thread too.
- :func:`epoch_ledger`: a Keras callback that keeps every per-epoch metric value. MLflow's
  Keras callback sends them in the background and drops what the server did not take; at the end of
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
from mnist_mlflow.tracking import lease
from mnist_mlflow.tracking.server import SERVER_TIMEOUT_ENV, server_timeout_s, tracking_uri_shown

SPOOL_DIR_ENV = "MNIST_MLFLOW_SPOOL_DIR"
SPOOL_RECORD_KIND = "mnist_mlflow spool record"
LATE_METRICS_TAG = "metrics_delivered_late"


class TrackingServerLost(lifecycle.Terminated):
    """The tracking server stopped answering while this process held a run."""

    exit_status = 69  # EX_UNAVAILABLE

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
# What the server says when it is up but swamped (MLflow's "too many 5xx error responses").
OVERLOADED_SIGN = "too many"


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not be reached (not that it refused)."""
    import requests

    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return True
    message = str(error)
    return "API request to" in message and any(sign in message for sign in UNREACHABLE_SIGNS)


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
        # run id -> (the tracking URI it lives at, its lease; None for a shared study parent)
        self._runs: dict[str, tuple[str, lease.Lease | None]] = {}
        self._thread: threading.Thread | None = None
        self._last_answer = time.monotonic()
        self._stopping = False
        self._renewals = 0
        # Set when a held run is let go, so that the parents it kept alive are beaten at once.
        self._wake = threading.Event()

    def add(self, run_id: str, held: lease.Lease | None = None) -> None:
        """Renews ``run_id``'s lease (``held``), or, for a study parent that many workers share,
        only its heartbeat."""
        with self._lock:
            self._runs[run_id] = (mlflow.get_tracking_uri(), held)
            self._last_answer = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="mlflow-run-watch", daemon=True)
                self._thread.start()
        if held is None:
            # The first heartbeat at once, so that a run is never without one.
            self._beat(run_id, mlflow.get_tracking_uri())

    def remove(self, run_id: str) -> None:
        with self._lock:
            _uri, held = self._runs.pop(run_id, (None, None))
            parents_left = any(entry_held is None for _, entry_held in self._runs.values())
        if held is not None and parents_left:
            # The child's lease kept the study's parent alive until now: the parent is renewed
            # on the watch's thread right away, before the child's run ends.
            self._wake.set()

    def _beat(self, run_id: str, uri: str) -> None:
        until = lease.CLOCK.now() + lease.lease_duration_s()
        MlflowClient(tracking_uri=uri).set_tag(run_id, lease.LEASE_UNTIL_TAG, f"{until:.1f}")

    def _loop(self) -> None:
        while True:
            woken = self._wake.wait(lease.renewal_interval_s())
            self._wake.clear()
            with self._lock:
                runs = dict(self._runs)
            if not runs or self._stopping:
                continue
            holding_a_child = any(held is not None for _, held in runs.values())
            if not woken:
                self._renewals += 1
            # Every few renewals, the holder reads the run back too: a run closed by someone
            # else (by hand, say) is noticed within a minute by default.
            verify = self._renewals % lease.VERIFY_EVERY_RENEWALS == 0
            try:
                for run_id, (uri, held) in runs.items():
                    if held is None and not holding_a_child:
                        self._beat(run_id, uri)
                    elif held is not None and run_id in self._runs and not woken:
                        held.renew(verify=verify)
                self._last_answer = time.monotonic()
            except lease.LeaseLost as lost:
                self._stop(lost)
            except Exception as error:  # noqa: BLE001 - the watch must outlive any failure
                if not _unreachable(error) and OVERLOADED_SIGN not in str(error):
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
# run id -> epoch -> the background batch that sent the epoch's metrics (MLflow's RunOperations).
_sent: dict[str, dict[int, object]] = {}
# An epoch whose every value the server held already (a resumed run's): nothing was sent.
ALREADY_HELD = object()


def note_sent(run_id: str, epoch: int, operations) -> None:
    """Keeps the background batch that sent an epoch's metrics, to learn later whether it failed."""
    _sent.setdefault(run_id, {})[int(epoch)] = operations


def wait_for_sent(run_id: str) -> None:
    """Waits until every background batch of the run's epochs has been answered (or failed).

    A wait on the batches themselves, not ``mlflow.flush_async_logging``: a flush stops and
    restarts MLflow's logging thread, which notices the stop only when its wait on an empty
    queue times out.
    """
    for operations in list(_sent.get(run_id, {}).values()):
        _confirmed(operations)


def _confirmed(operations) -> bool:
    """Whether a background batch is known to have reached the server (waits for its answer)."""
    if operations is ALREADY_HELD:
        return True
    if operations is None:
        return False
    try:
        operations.wait()
    except Exception:  # noqa: BLE001 - any failure means: ask the server
        return False
    return True


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
    """Sends again the ledger's values the server lacks; returns what was sent, or None.

    Only the epochs whose background batch failed (or was never sent) are looked up in the
    server's metric history: a batch that failed may still have been written, and nothing is
    sent twice.
    """
    points = _ledgers.pop(run_id, {})
    sent = _sent.pop(run_id, {})
    if not points:
        return None
    epochs = {step for steps in points.values() for step in steps}
    unconfirmed = {epoch for epoch in epochs if not _confirmed(sent.get(epoch))}
    if not unconfirmed:
        return None
    doubtful = {
        key: {step: point for step, point in steps.items() if step in unconfirmed} for key, steps in points.items()
    }
    client = MlflowClient()
    missing = send_missing(client, run_id, {key: steps for key, steps in doubtful.items() if steps})
    if not missing:
        return None
    text = _steps_text(missing)
    client.set_tag(run_id, LATE_METRICS_TAG, text[:5000])
    return text


def spool_dir() -> Path:
    return Path(os.environ.get(SPOOL_DIR_ENV) or Path.home() / ".cache" / "mnist_mlflow" / "undelivered")


def spool_run(run_id: str, reason: str) -> tuple[Path | None, int]:
    """Writes what run ``run_id`` could not send (its ledger and why it stopped) to the spool;
    returns the file, or None when the spool cannot be written, and how many epochs it holds."""
    points = _ledgers.pop(run_id, {})
    _sent.pop(run_id, None)
    epochs = len({step for steps in points.values() for step in steps})
    folder = spool_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}.json"
        record = {
            "kind": SPOOL_RECORD_KIND,
            "tracking_uri": tracking_uri_shown(),
            "run_id": run_id,
            "reason": reason,
            "metrics": {
                key: {str(step): list(point) for step, point in steps.items()} for key, steps in points.items()
            },
        }
        path.write_text(json.dumps(record))
        return path, epochs
    except OSError:
        return None, epochs


def _read_record(path: Path) -> dict:
    """A spool record, checked to be one of ours; raises ValueError otherwise."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or record.get("kind", SPOOL_RECORD_KIND) != SPOOL_RECORD_KIND:
        raise ValueError("it is not a spool record of this project")
    if not isinstance(record.get("run_id"), str) or not isinstance(record.get("metrics"), dict):
        raise ValueError("it lacks a run id or metrics")
    return record


def _set_aside(path: Path, why: str) -> str:
    """Renames a spool file that cannot be delivered, so that no command reads it again."""
    aside = path.with_name(path.name + ".unreadable")
    with contextlib.suppress(OSError):
        path.rename(aside)
    return f"Set aside {path} ({why}) as {aside.name}; no command reads it again"


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
            record = _read_record(path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            lines.append(_set_aside(path, str(error)[:200]))
            continue
        if record.get("tracking_uri") != shown:
            continue
        run_id = record["run_id"]
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted":
                lines.append(f"Run {run_id} was deleted at {shown}; dropping its spool record {path.name}")
            else:
                lines.append(_deliver_record(client, run, record))
        except (ValueError, KeyError, TypeError) as error:
            lines.append(_set_aside(path, f"its metrics cannot be read: {error}"[:200]))
            continue
        except mlflow.exceptions.MlflowException as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(error, "error_code", "")):
                continue  # The server cannot take it yet; the record waits for the next command.
            lines.append(f"Run {run_id} no longer exists at {shown}; dropping its spool record {path.name}")
        except Exception as error:  # noqa: BLE001 - an unreachable server: try again next time
            if _unreachable(error):
                continue
            raise
        with contextlib.suppress(OSError):
            path.unlink()
    return lines


def _deliver_record(client: MlflowClient, run, record: dict) -> str:
    """Sends a spooled run the metric values it lacks and closes it FAILED; returns the line."""
    run_id = run.info.run_id
    points = {
        key: {int(step): (float(value), int(timestamp)) for step, (value, timestamp) in steps.items()}
        for key, steps in record["metrics"].items()
    }
    missing = send_missing(client, run_id, points)
    late = _steps_text(missing) if missing else "none"
    client.set_tag(run_id, LATE_METRICS_TAG, late[:5000])
    if run.info.status == "RUNNING":
        client.set_tag(run_id, "failed_reason", str(record.get("reason", "its server was lost"))[:5000])
        client.set_terminated(run_id, status="FAILED")
    return (
        f"Run {run_id} had stopped when its tracking server was unreachable; "
        f"delivered the metric values it could not send ({late}); the run is FAILED"
    )


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
