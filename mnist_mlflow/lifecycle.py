"""How a process of this project ends: signals, a dying launcher, and who owns a run.

- SIGTERM (sent by ``timeout``, ``docker stop``, Kubernetes and batch schedulers) is handled
  like Ctrl-C: it raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, so
  every run this process holds ends KILLED and an Optuna trial is failed. During a fit the
  stop waits for the next step boundary (:func:`stops_at_boundaries`): raised inside
  TensorFlow's native code, it could abort the process.
- Under ``mlflow run`` the signal usually reaches the launcher, which does not pass SIGTERM
  on. :func:`watch_launcher` notices when the launcher is gone and stops this process the
  same way.
- :func:`process_identity` is recorded on every run (host, boot id, PID namespace, pid and
  process start time), so a run whose process died without warning can later be recognised
  and closed (:func:`process_is_gone`). A pid means something only inside its PID namespace
  and until the next boot: two containers on one host (``--network host``) share the host
  name but not their pids, so the identity holds all three, and a run whose identity names
  another namespace or boot is never judged from here.
- :func:`request_stop` lets a watching thread stop the main thread with a stated reason.

This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading
import time

import psutil

# Tags naming the process that holds a run.
HOST_TAG = "mnist_mlflow.process_host"
PID_TAG = "mnist_mlflow.process_id"
START_TAG = "mnist_mlflow.process_start_time"
# The kernel boot and the PID namespace in which PID_TAG names the process.
BOOT_TAG = "mnist_mlflow.process_boot_id"
PID_NAMESPACE_TAG = "mnist_mlflow.process_pid_namespace"
# Two start times of one process, read at different moments, agree to well within this.
START_TIME_TOLERANCE_S = 1.0
# How often the launcher watch looks at its launcher.
WATCH_INTERVAL_S = 1.0


class Terminated(KeyboardInterrupt):
    """This process was told to stop: SIGTERM, or its ``mlflow run`` launcher died.

    A ``KeyboardInterrupt``, so that everything that cleans up after Ctrl-C (runs end KILLED,
    Optuna fails the running trial) does the same here.
    """

    exit_status = 143

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def line(self) -> str:
        """The one line the process ends with."""
        return f"stopped: {self.reason}; the runs of this process ended KILLED"


def interruption_reason(error: BaseException) -> str:
    """Why a ``KeyboardInterrupt`` happened, for a run's ``killed_reason`` tag."""
    if isinstance(error, Terminated):
        return error.reason
    return "interrupted by Ctrl-C (SIGINT)"


# Stops requested by another thread (request_stop), raised by the SIGTERM handler in the main thread.
_pending_stops: list[Terminated] = []
# The stops this process was told of, once it was; see termination_from.
_termination_reason: list[Terminated] = []


# While above zero, the main thread is inside TensorFlow's fit or predict: a stop waits there
# for the next step boundary (stops_at_boundaries).
_boundary_depth = [0]
# Every stop this process was told of, until it is raised at a safe point (raise_pending_stop).
# Outside a fit the handler raises it at once as well; but raised inside a finaliser or a weakref
# callback (a garbage collection), Python prints "Exception ignored" and goes on, and the stop
# would be lost. The next safe point raises it again.
_waiting_stops: list[BaseException] = []


def _on_sigterm(signum, frame) -> None:
    stop = _pending_stops.pop() if _pending_stops else Terminated("terminated by SIGTERM")
    _termination_reason.append(stop)
    _waiting_stops.append(stop)
    if _boundary_depth[0]:
        return
    raise stop


def _on_sigint(signum, frame) -> None:
    stop = KeyboardInterrupt()
    _waiting_stops.append(stop)
    if _boundary_depth[0]:
        return
    raise stop


@contextlib.contextmanager
def stops_at_boundaries():
    """Inside the block (a fit or a predict), Ctrl-C and SIGTERM are recorded, not raised; the
    block's callbacks raise them at the next step boundary (:func:`raise_pending_stop`), and
    leaving the block raises one still waiting."""
    _boundary_depth[0] += 1
    try:
        yield
    finally:
        _boundary_depth[0] -= 1
    raise_pending_stop()


def raise_pending_stop() -> None:
    """At a safe point (a step boundary, a run's start or end): raises the stop this process was
    told of and has not yet raised where it took effect, if any (main thread only)."""
    if _waiting_stops and threading.current_thread() is threading.main_thread():
        stop = _waiting_stops[0]
        _waiting_stops.clear()
        raise stop


def request_stop(stop: Terminated) -> None:
    """Raises ``stop`` in the main thread as soon as it runs Python code again (from any thread).

    The main thread may be deep in TensorFlow or in an HTTP request; a signal to this process
    is the one thing that reaches it there, so the stop travels as SIGTERM. Without the
    project's SIGTERM handler (a notebook), nothing is raised.
    """
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    _pending_stops.append(stop)
    os.kill(os.getpid(), signal.SIGTERM)


def termination_from(error: BaseException) -> Terminated | None:
    """The stop that ``error`` really is, or None.

    The SIGTERM handler raises :class:`Terminated` wherever the main thread is. When that is
    inside TensorFlow's native code, the exception can come out mangled (seen: ``SystemError:
    bad argument to internal function`` from a training step). Any error raised after a stop
    was requested is taken for that stop, so that the runs still end KILLED and the process
    still exits with status 143.
    """
    if isinstance(error, Terminated):
        return error
    if _termination_reason and not isinstance(error, KeyboardInterrupt):
        return _termination_reason[-1]
    return None


def install_signal_handlers() -> None:
    """Makes SIGTERM raise :class:`Terminated` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def signals_deferred():
    """Ignores Ctrl-C and SIGTERM while a few closing calls run (the process is already stopping)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _read_first_line(path: str) -> str:
    try:
        with open(path) as file:
            return file.readline().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """This kernel's boot id (Linux), or "" where there is none."""
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    """The PID namespace this process lives in, such as ``pid:[4026531836]`` (Linux), or ""."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_identity() -> dict[str, str]:
    """This process, as tags for the runs it holds: host, boot, PID namespace, pid and start time."""
    pid = os.getpid()
    return {
        HOST_TAG: platform.node(),
        BOOT_TAG: boot_id(),
        PID_NAMESPACE_TAG: pid_namespace(),
        PID_TAG: str(pid),
        START_TAG: f"{process_start_time(pid):.2f}",
    }


def process_is_gone(tags: dict[str, str]) -> bool | None:
    """Whether the process named by a run's tags has ended, when that can be known from here.

    True only on evidence that holds where the process ran: the same host, the same boot and
    the same PID namespace as this process, and no process of that pid started at that time.
    None (do not judge) when the tags lack any of these, or name another host, boot or
    namespace: a container beside this one, another machine of the same name, or a run
    recorded before the boot and namespace were.
    """
    try:
        host, pid, start = tags[HOST_TAG], int(tags[PID_TAG]), float(tags[START_TAG])
        boot, namespace = tags[BOOT_TAG], tags[PID_NAMESPACE_TAG]
    except (KeyError, ValueError):
        return None
    if host != platform.node() or not boot or boot != boot_id() or not namespace or namespace != pid_namespace():
        return None
    started = process_start_time(pid)
    return started is None or abs(started - start) > START_TIME_TOLERANCE_S


def find_launcher() -> psutil.Process | None:
    """The ``mlflow run`` process this process was started by, if any.

    With ``--env-manager local`` the launcher runs the entry point through ``bash -c``; with
    conda or uv, through a shell that activates the environment first. So the launcher is the
    nearest ancestor whose command line is ``mlflow run``.
    """
    try:
        for ancestor in psutil.Process().parents():
            words = [os.path.basename(word) for word in ancestor.cmdline()]
            if "run" in words and any(word.startswith("mlflow") for word in words[: words.index("run")]):
                return ancestor
    except (psutil.Error, ValueError):
        return None
    return None


def watch_launcher(interval_s: float = WATCH_INTERVAL_S) -> psutil.Process | None:
    """Stops this process (like SIGTERM) when its ``mlflow run`` launcher ends, in a daemon thread.

    Returns the launcher watched, or None when this process was not started by ``mlflow run``.
    """
    launcher = find_launcher()
    if launcher is None:
        return None

    def alive() -> bool:
        # A launcher killed before its own parent reaped it lingers as a zombie: that is ended too.
        try:
            return launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(interval_s)
        # As request_stop, but the signal is sent even without the project's handler: then
        # SIGTERM's default action ends the process, as the launcher's end means it should.
        _pending_stops.append(Terminated(f"its mlflow run launcher (pid {launcher.pid}) ended"))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return launcher
