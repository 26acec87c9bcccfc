"""One search worker that times its own Optuna storage calls and MLflow HTTP requests.

    BENCH_WORKER_RECORD=record.json python benchmarks/timed_worker.py --space random ...

It runs ``entrypoints/search.py`` with the same flags, after wrapping two things, and writes
what it measured to ``$BENCH_WORKER_RECORD`` when the search ends:

- every public method of Optuna's ``RDBStorage`` (the outermost call only, so that a method
  calling another is counted once), by method;
- every HTTP request of the process (``requests.Session.request``, which MLflow's client uses
  for the tracking API and the artifact proxy), by endpoint, with each request's latency and
  the bytes it uploaded;
- which of those requests the run-keeping machinery made: the lease and heartbeat, the status
  checks, the epoch ledger's checks and the checkpoints. A request is the machinery's when the
  project's innermost function on its thread's stack lives in ``tracking/watch.py``,
  ``tracking/lease.py`` or ``tracking/checkpoints.py``, or is ``session._end_run`` (the rule of
  ``machinery_requests.py``, which holds for this commit and for the one before the lease).

``bench_workers.py`` starts many of these against one PostgreSQL and one ``mlflow server``;
``bench_load.py`` replays the traffic they recorded. A measuring tool, not a product feature.
"""

from __future__ import annotations

import json
import os
import re
import resource
import runpy
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

# category -> [calls, seconds]; HTTP latencies kept one by one for percentiles.
TOTALS: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
UPLOADED_BYTES: dict[str, int] = defaultdict(int)
LATENCIES: list[tuple[str, float]] = []
MACHINERY_CALLS: dict[str, int] = defaultdict(int)
MACHINERY_FILES = ("watch.py", "lease.py", "checkpoints.py")
TRIALS_FINISHED = [0]
LOCK = threading.Lock()
DEPTH = threading.local()
FINISHED_STATES = {"COMPLETE", "PRUNED"}


def _add(category: str, seconds: float, uploaded: int = 0, latency: bool = False) -> None:
    with LOCK:
        TOTALS[category][0] += 1
        TOTALS[category][1] += seconds
        UPLOADED_BYTES[category] += uploaded
        if latency:
            LATENCIES.append((category, seconds))


def _wrap_storage() -> None:
    from optuna.storages import RDBStorage

    def timed(name, method):
        def wrapper(self, *args, **kwargs):
            depth = getattr(DEPTH, "value", 0)
            DEPTH.value = depth + 1
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                DEPTH.value = depth
                if depth == 0:
                    thread = "heartbeat-thread" if threading.current_thread() is not threading.main_thread() else ""
                    _add(f"optuna {name}{' (' + thread + ')' if thread else ''}", time.perf_counter() - started)
                    if name == "set_trial_state_values":
                        state = kwargs.get("state", args[1] if len(args) > 1 else None)
                        if getattr(state, "name", "") in FINISHED_STATES:
                            TRIALS_FINISHED[0] += 1

        return wrapper

    for name in dir(RDBStorage):
        method = getattr(RDBStorage, name)
        if not name.startswith("_") and callable(method) and not isinstance(method, type):
            setattr(RDBStorage, name, timed(name, method))


# /api/2.0/mlflow/runs/log-batch -> "mlflow runs/log-batch"; artifact paths are folded into one.
API = re.compile(r"/api/2\.0/mlflow/(?P<endpoint>[a-z\-/]+?)/?$")
ARTIFACTS = re.compile(r"/api/2\.0/mlflow-artifacts/artifacts")


def _category(method: str, url: str) -> str:
    path = url.split("://", 1)[-1].partition("/")[2].partition("?")[0]
    path = "/" + path
    found = API.search(path)
    if found:
        return f"mlflow {found['endpoint']}"
    if ARTIFACTS.search(path):
        return f"mlflow artifacts {method.upper()}"
    return f"http {method.upper()} {path[:40]}"


def _size(data) -> int:
    if data is None:
        return 0
    if isinstance(data, (bytes, bytearray, str)):
        return len(data)
    try:
        return os.fstat(data.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return 0


def _made_by_machinery() -> bool:
    """Whether the project's innermost function on this thread's stack is the machinery's."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if f"{os.sep}mnist_mlflow{os.sep}" in filename:
            name = os.path.basename(filename)
            return name in MACHINERY_FILES or (name == "session.py" and frame.f_code.co_name == "_end_run")
        frame = frame.f_back
    return False


def _wrap_http() -> None:
    import requests

    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        started = time.perf_counter()
        machinery = _made_by_machinery()
        try:
            return original(self, method, url, *args, **kwargs)
        finally:
            category = _category(method, url)
            _add(category, time.perf_counter() - started, _size(kwargs.get("data")), latency=True)
            if machinery:
                with LOCK:
                    MACHINERY_CALLS[category] += 1

    requests.Session.request = request


def write_record(path: str, wall_s: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "pid": os.getpid(),
        "wall_s": wall_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "trials_finished": TRIALS_FINISHED[0],
        "totals": {name: {"calls": calls, "seconds": seconds} for name, (calls, seconds) in sorted(TOTALS.items())},
        "uploaded_bytes": dict(UPLOADED_BYTES),
        "machinery_calls": dict(MACHINERY_CALLS),
        "latencies": LATENCIES,
    }
    Path(path).write_text(json.dumps(record))


def main() -> None:
    record_path = os.environ["BENCH_WORKER_RECORD"]
    _wrap_storage()
    _wrap_http()
    from mnist_mlflow.cli import exit_process, run_main

    search = runpy.run_path(str(PROJECT_DIR / "entrypoints" / "search.py"), run_name="timed_search")
    started = time.perf_counter()
    status = run_main(search["main"])
    write_record(record_path, time.perf_counter() - started)
    exit_process(status)


if __name__ == "__main__":
    main()
