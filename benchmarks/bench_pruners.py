"""The search's pruners measured on the course's random space: none, median, ASHA and Hyperband.

    python benchmarks/bench_pruners.py                          # about 35 minutes on 2 cores
    python benchmarks/bench_pruners.py --max-train-examples 0   # the whole training split

Each pruner runs one search of the ``random`` space (docs/experiments.md section 4), 50 trials,
seed 0, 10 epochs per trial, one after the other in this one command, each in its own study and
its own MLflow store. The trials are the same for every pruner: the sampler draws trial k from
(seed, k). What differs is when a trial is stopped. For each pruner this reports:

- the epochs trained, of 500;
- the whole command's wall time, and the time its trials spent in Keras's ``fit``;
- the best validation accuracy found, and that trial's test accuracy;
- the expected best of N trials (N = 5, 10, 20), from the search's own best-of-N analysis,
  where a pruned trial counts with the accuracy it had when stopped.

By default each trial trains on 12,000 examples (a quarter of the training split), so that the
four searches fit in one sitting; the validation split is the whole one. The pruners' relative
figures are what this measures.

Results: ``benchmarks/results/pruners.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROJECT_DIR, RESULTS_DIR, record_results

from harness.servers import python_env

PRUNERS = ("none", "median", "successive_halving", "hyperband")
SEARCH = PROJECT_DIR / "entrypoints" / "search.py"


def run_search(pruner: str, trials: int, epochs: int, max_train_examples: int, folder: Path) -> dict:
    """One search with ``pruner``, in its own folder; what its parent run recorded, and its wall time."""
    folder.mkdir(parents=True)
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    command = [
        sys.executable,
        str(SEARCH),
        "--space",
        "random",
        "--n_trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--pruner",
        pruner,
        "--seed",
        "0",
        "--max_train_examples",
        str(max_train_examples),
        "--storage",
        f"sqlite:///{folder}/optuna.db",
        "--register_as",
        "",
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=folder,
        env=python_env(tracking_uri, MLFLOW_EXPERIMENT_NAME=f"bench-pruner-{pruner}"),
        stdout=(folder / "search.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    wall_s = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"the {pruner} search failed with status {completed.returncode}; see {folder}/search.log")
    return {**read_search(pruner, folder), "wall_s": wall_s}


def read_search(pruner: str, folder: Path) -> dict:
    """What the parent run of the search in ``folder`` recorded."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(f"bench-pruner-{pruner}")
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.study_kind = 'search' and tags.study_role = 'parent' and attributes.status = 'FINISHED'",
        max_results=5,
    )
    parent = next(run for run in parents if "trials_complete" in run.data.metrics)
    metrics = parent.data.metrics
    return {
        "pruner": pruner,
        "folder": str(folder),
        "train_time_s": metrics["train_time_s"],
        "epochs_trained": metrics["epochs_trained"],
        "trials_complete": metrics["trials_complete"],
        "trials_pruned": metrics["trials_pruned"],
        "best_val_accuracy": metrics.get("best_val_accuracy"),
        "best_test_accuracy": metrics.get("best_test_accuracy"),
        "best_params": parent.data.tags.get("best_params"),
        **{f"expected_best_at_{n}": metrics.get(f"expected_best_at_{n}") for n in (5, 10, 20, 50)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=12000, help="0: the whole training split")
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument(
        "--reread",
        metavar="FOLDER",
        help="write the results again from the searches kept in FOLDER, with the wall times of pruners.json",
    )
    args = parser.parse_args()
    rows = []
    if args.reread:
        previous = json.loads((RESULTS_DIR / "pruners.json").read_text())
        walls = {row["pruner"]: row["wall_s"] for row in previous["rows"]}
        args.trials, args.epochs = previous["trials"], previous["epochs"]
        args.max_train_examples = previous["max_train_examples"]
        rows = [
            {**read_search(pruner, Path(args.reread) / pruner), "wall_s": walls[pruner]}
            for pruner in args.pruners.split(",")
        ]
    root = Path(tempfile.mkdtemp(prefix="bench-pruners-"))
    for pruner in [] if args.reread else args.pruners.split(","):
        print(f"Searching with pruner={pruner} ...", flush=True)
        row = run_search(pruner, args.trials, args.epochs, args.max_train_examples, root / pruner)
        print(f"  {row}", flush=True)
        rows.append(row)
    total_epochs = args.trials * args.epochs

    def percent(value) -> str:
        return "n/a" if value is None else f"{value:.2%}"

    lines = [
        f"# Pruners on the random space: {args.trials} trials, seed 0, {args.epochs} epochs each, "
        f"{args.max_train_examples or 'all'} training examples\n",
        "Generated by `python benchmarks/bench_pruners.py`; one search per pruner, one after the other "
        "in one command. The trials drawn are the same for every pruner. Expected best of N counts a "
        "pruned trial with the accuracy it had when stopped.\n",
        "| pruner | epochs trained | wall time | time in fit | pruned | best val | its test | E[best of 5] | "
        "E[best of 10] | E[best of 20] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['pruner']} | {row['epochs_trained']:.0f} of {total_epochs} | {row['wall_s'] / 60:.1f} min | "
            f"{row['train_time_s'] / 60:.1f} min | "
            f"{row['trials_pruned']:.0f} | {percent(row['best_val_accuracy'])} | "
            f"{percent(row['best_test_accuracy'])} | "
            f"{percent(row['expected_best_at_5'])} | {percent(row['expected_best_at_10'])} | "
            f"{percent(row['expected_best_at_20'])} |"
        )
    record_results(
        "pruners",
        {
            "trials": args.trials,
            "epochs": args.epochs,
            "max_train_examples": args.max_train_examples,
            "seed": 0,
            "rows": rows,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
