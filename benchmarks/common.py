"""Helpers shared by the benchmark scripts: running an entry point with tracking, timing epochs."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"
WORK_DIR = PROJECT_DIR / "benchmarks" / "work"
NOTEBOOK_MARKER = "NOTEBOOK_TIMES "


def benchmark_parser(description: str, default_epochs: int, default_repeats: int) -> argparse.ArgumentParser:
    """Flags every training benchmark has: ``--epochs``, ``--repeats`` and the hidden ``--notebook-only``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=default_epochs, help="at least 2; epoch 1 is warm-up")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="runs of each variant, alternating")
    parser.add_argument("--notebook-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, notebook_way) -> argparse.Namespace | None:
    """Parses and checks the flags. With ``--notebook-only``, runs the notebook way, prints its
    epoch times for the parent process and returns None."""
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is excluded as warm-up")
    if args.notebook_only:
        print(NOTEBOOK_MARKER + json.dumps(notebook_way(args)), flush=True)
        return None
    return args


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


def run_entry_point(script: str, args: list[str], tracking_uri: str, experiment: str):
    """Runs ``entrypoints/<script>`` with tracking on; returns ({"wall": [...], "cpu": [...]} epoch seconds, the run)."""
    from mlflow.tracking import MlflowClient

    from harness.servers import python_env

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    subprocess.run(
        [sys.executable, str(PROJECT_DIR / "entrypoints" / script), *args],
        env=python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME=experiment),
        cwd=WORK_DIR,
        check=True,
    )
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    times = {}
    for kind, metric in (("wall", "epoch_time_s"), ("cpu", "epoch_cpu_time_s")):
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda point: point.step)
        times[kind] = [point.value for point in history]
    return times, run


def notebook_in_subprocess(script: str, epochs: int, extra_args: list[str]) -> dict[str, list[float]]:
    """Runs ``script --notebook-only`` in a fresh process and returns the epoch times it prints."""
    return run_in_subprocess(script, ["--notebook-only", "--epochs", str(epochs), *extra_args], NOTEBOOK_MARKER)


def alternate_notebook_and_project(
    benchmark_script: str, repeats: int, epochs: int, entry_point: str, entry_args: list[str], tracking_uri: str,
    experiment: str, notebook_args: list[str] = (),
) -> tuple[list[list[float]], list[list[float]], list]:
    """Runs the notebook way and the project entry point in turn, ``repeats`` times each.

    Alternating spreads this noisy machine's slow spells over both. Returns the notebook's
    epoch times, the project's epoch times (each ``{"wall": runs, "cpu": runs}``, one list of
    epoch seconds per run) and the project's runs.
    """
    notebook_runs, project_runs, runs = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}, []
    for repeat in range(repeats):
        for label, results in (("notebook way", notebook_runs), (f"project {entry_point} entry point with tracking", project_runs)):
            print(f"== repeat {repeat + 1}/{repeats}: {label}", flush=True)
            if results is notebook_runs:
                times = notebook_in_subprocess(benchmark_script, epochs, list(notebook_args))
            else:
                times, run = run_entry_point(f"{entry_point}.py", ["--epochs", str(epochs), *entry_args], tracking_uri, experiment)
                runs.append(run)
            for kind in ("wall", "cpu"):
                results[kind].append(times[kind])
            print(f"   epoch seconds: wall {[round(t, 2) for t in times['wall']]}, cpu {[round(t, 2) for t in times['cpu']]}", flush=True)
    return notebook_runs, project_runs, runs


def run_in_subprocess(script: str, args: list[str], marker: str):
    """Runs a benchmark script in a fresh process and parses the JSON it prints after ``marker``."""
    from harness.servers import python_env

    output = subprocess.run(
        [sys.executable, script, *args], env=python_env(), capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.split(marker, 1)[1].splitlines()[0])


def steady_epochs(runs: list[list[float]]) -> list[float]:
    """Every epoch's seconds but each run's first, which holds tracing and compilation."""
    return [seconds for times in runs for seconds in (times[1:] if len(times) > 1 else times)]


def summarise(runs: list[list[float]]) -> dict[str, float]:
    """Median and mean seconds per steady epoch; the median resists this noisy machine's spikes."""
    epochs = steady_epochs(runs)
    return {"median": statistics.median(epochs), "mean": statistics.mean(epochs)}


def compare(notebook_runs: dict[str, list[list[float]]], project_runs: dict[str, list[list[float]]]) -> dict:
    """Medians and means of steady epochs, wall and CPU, with the speed-ups they give."""
    comparison = {}
    for kind in ("wall", "cpu"):
        notebook, project = summarise(notebook_runs[kind]), summarise(project_runs[kind])
        comparison[kind] = {
            "notebook": notebook,
            "project": project,
            "speedup_median": notebook["median"] / project["median"],
            "speedup_mean": notebook["mean"] / project["mean"],
        }
    return comparison


def comparison_rows(comparison: dict, notebook_label: str, project_label: str) -> str:
    """Markdown rows: each variant's wall and CPU seconds per epoch, then the speed-ups."""
    wall, cpu = comparison["wall"], comparison["cpu"]
    return (
        f"| {notebook_label} | {wall['notebook']['median']:.2f} ({wall['notebook']['mean']:.2f}) | {cpu['notebook']['median']:.2f} |\n"
        f"| {project_label} | {wall['project']['median']:.2f} ({wall['project']['mean']:.2f}) | {cpu['project']['median']:.2f} |\n"
        f"| speed-up | {wall['speedup_median']:.2f}x ({wall['speedup_mean']:.2f}x) | {cpu['speedup_median']:.2f}x |\n"
    )


def write_results(name: str, result: dict, table: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {**result, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(table)
    print(table)
