"""What MLflow's system metrics cost a short run: a tiny dense run with them on and off.

    python benchmarks/bench_system_metrics.py --repeats 5      # about 3 minutes on 2 cores

Every run logs MLflow's system metrics, sampled every 10 s (MLflow's default); the test suite's
runs are shorter than that. This runs the ``dense`` entry point on 500 examples for 2 epochs
against a real `mlflow server`, with ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` true and false
alternating, and compares the whole command's wall time. It also times, in this process, what
the monitor itself adds to a run: its start and its stop (joining its thread, flushing).

Results: ``benchmarks/results/system_metrics.md`` and ``.json``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROJECT_DIR, benchmark_parser, record_results

from harness.servers import python_env, tracking_server

DENSE = [str(PROJECT_DIR / "entrypoints" / "dense.py"), "--epochs", "2", "--max_train_examples", "500"]


def monitor_start_and_stop_s(repeats: int = 20) -> list[float]:
    """MLflow's system-metrics monitor started and stopped on a run, ``repeats`` times."""
    import logging

    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    times = []
    with mlflow.start_run() as run:
        for _ in range(repeats):
            started = time.perf_counter()
            monitor = SystemMetricsMonitor(run.info.run_id)
            monitor.start()
            monitor.finish()
            times.append(time.perf_counter() - started)
    mlflow.set_tracking_uri(None)
    return times


def main() -> None:
    args = benchmark_parser(__doc__.splitlines()[0], default_epochs=2, default_repeats=5).parse_args()
    times: dict[str, list[float]] = {"true": [], "false": []}
    with tracking_server(Path(tempfile.mkdtemp(prefix="bench-system-metrics-"))) as server:
        for repeat in range(args.repeats):
            for setting in ("true", "false"):
                env = python_env(
                    server.url,
                    MLFLOW_EXPERIMENT_NAME=f"bench-system-metrics-{setting}",
                    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=setting,
                )
                started = time.perf_counter()
                subprocess.run([sys.executable, *DENSE], env=env, check=True, capture_output=True)
                times[setting].append(time.perf_counter() - started)
                print(f"repeat {repeat + 1} system metrics {setting}: {times[setting][-1]:.2f} s", flush=True)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s ({min(values):.2f} to {max(values):.2f})"

    differences = [on - off for on, off in zip(times["true"], times["false"])]
    monitor = monitor_start_and_stop_s()
    table = "\n".join(
        [
            "# System metrics: what they cost a short run",
            "",
            f"`python benchmarks/bench_system_metrics.py --repeats {args.repeats}`: a `dense` run of 500 examples "
            "and 2 epochs, the whole command, system metrics on and off alternating; median (min to max).",
            "",
            "| system metrics | command wall time |",
            "|---|---|",
            f"| on (the project's default) | {spread(times['true'])} |",
            f"| off | {spread(times['false'])} |",
            f"| on less off, pair by pair | {spread(differences)} |",
            "",
            "The monitor itself, started and stopped on a run in one process (20 times): "
            f"{1000 * statistics.median(monitor):.0f} ms ({1000 * min(monitor):.0f} to {1000 * max(monitor):.0f}).",
            "The whole commands' spread is far wider than that.",
            "",
        ]
    )
    record = {"args": vars(args), "wall_s": times, "difference_s": differences, "monitor_s": monitor}
    record_results("system_metrics", record, table)


if __name__ == "__main__":
    main()
