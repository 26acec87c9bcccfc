"""The default `cnn` run with three seeds: does every one clear 99.2% test accuracy?

Runs ``entrypoints/cnn.py`` with its defaults and ``--seed 0``, ``1`` and ``2`` one after the
other, tracked to a real ``mlflow server`` on loopback, and prints each run's selected epoch,
validation and test accuracy and seconds per epoch, with the spread. Results go to
``benchmarks/results/cnn_seeds.json`` and ``cnn_seeds.md``. About 2 minutes per seed on 2 cores.

    python benchmarks/cnn_seeds.py
    python benchmarks/cnn_seeds.py --seeds 0,1,2,3,4 -- --max_shift 0   # extra flags go to cnn.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import PROJECT_DIR, WORK_DIR, record_results

TARGET = 0.992


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="cnn_seeds", help="results file name under benchmarks/results/")
    parser.add_argument("extra", nargs="*", help="flags passed on to entrypoints/cnn.py (after --)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]

    from mlflow.tracking import MlflowClient

    from harness.servers import python_env, tracking_server

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    runs = []
    with tracking_server(WORK_DIR / "mlflow-cnn-seeds") as server:
        client = MlflowClient(server.url)
        for seed in seeds:
            print(f"== seed {seed}", flush=True)
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    str(PROJECT_DIR / "entrypoints" / "cnn.py"),
                    "--seed",
                    str(seed),
                    "--register_as",
                    "",
                    *args.extra,
                ],
                env=python_env(server.url, MLFLOW_EXPERIMENT_NAME="cnn-seeds"),
                cwd=WORK_DIR,
                check=True,
            )
            wall = time.perf_counter() - start
            experiment_id = client.get_experiment_by_name("cnn-seeds").experiment_id
            run = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
            metrics = run.data.metrics
            runs.append(
                {
                    "seed": seed,
                    "best_epoch": int(metrics["best_epoch"]) + 1,
                    "val_accuracy": metrics["best_val_accuracy"],
                    "test_accuracy": metrics["test_accuracy"],
                    "mean_epoch_time_s": metrics["mean_epoch_time_s"],
                    "train_time_s": metrics["train_time_s"],
                    "process_s": wall,
                    "params": dict(run.data.params),
                }
            )
    tests = [run["test_accuracy"] for run in runs]
    lines = [
        "| seed | selected epoch | val accuracy | test accuracy | s per epoch | training s |",
        "|---|---|---|---|---|---|",
        *[
            f"| {run['seed']} | {run['best_epoch']} | {run['val_accuracy']:.2%} | {run['test_accuracy']:.2%} "
            f"| {run['mean_epoch_time_s']:.2f} | {run['train_time_s']:.0f} |"
            for run in runs
        ],
        "",
        f"Test accuracy: mean {statistics.mean(tests):.2%}, range {min(tests):.2%}-{max(tests):.2%} "
        f"(spread {100 * (max(tests) - min(tests)):.2f} points); "
        f"{sum(test >= TARGET for test in tests)} of {len(tests)} at or above {TARGET:.1%}.",
    ]
    text = "\n".join(lines) + "\n"
    record_results(args.name, {"runs": runs, "extra_flags": args.extra}, text)


if __name__ == "__main__":
    main()
