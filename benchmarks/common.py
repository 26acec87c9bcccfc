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
