"""Helpers shared by the benchmark scripts: their folders, common flags, timing epochs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"
WORK_DIR = PROJECT_DIR / "benchmarks" / "work"


def benchmark_parser(description: str, default_epochs: int, default_repeats: int) -> argparse.ArgumentParser:
    """Flags every training benchmark has: ``--epochs`` and ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=default_epochs, help="at least 2; epoch 1 is warm-up")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="runs of each variant, alternating")
    return parser


def epoch_timer(times: dict[str, list[float]]):
    """A Keras callback that appends each epoch's wall and CPU seconds to ``times["wall"]`` and ``["cpu"]``."""
    import keras

    times.setdefault("wall", [])
    times.setdefault("cpu", [])

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times["wall"].append(time.perf_counter() - self.start)
            times["cpu"].append(time.process_time() - self.cpu_start)

    return EpochTimes()


def record_results(name: str, record: dict, table: str) -> None:
    """Writes ``benchmarks/results/<name>.json`` (the record, with the machine and the time) and
    ``<name>.md`` (the table), and prints the table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        **record,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(table)
    print(table)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (nearest rank), NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class ConnectionCounter:
    """Polls PostgreSQL's ``pg_stat_activity`` in a thread and keeps the most connections seen
    per database (its own poll not counted). A server that refuses the poll (full) is asked again."""

    def __init__(self, admin_url: str, interval_s: float = 0.25) -> None:
        import threading
        from collections import defaultdict

        self.admin_url = admin_url
        self.interval_s = interval_s
        self.peak: dict[str, int] = defaultdict(int)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.admin_url, poolclass=sqlalchemy.pool.NullPool)
        query = sqlalchemy.text(
            "select datname, count(*) from pg_stat_activity where datname is not null "
            "and pid <> pg_backend_pid() group by datname"
        )
        while not self.stopped.is_set():
            try:
                with engine.connect() as connection:
                    for name, count in connection.execute(query):
                        self.peak[name] = max(self.peak[name], int(count))
            except sqlalchemy.exc.OperationalError:
                pass
            self.stopped.wait(self.interval_s)

    def start(self) -> ConnectionCounter:
        self.thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.thread.join(10)
        return dict(self.peak)
