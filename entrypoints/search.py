"""The `search` entry point: grid, random or TPE hyperparameter search with Optuna, one child run per trial.

python entrypoints/search.py --space grid --epochs 1 --max_train_examples 2000
mlflow run . -e search --env-manager local -P space=random -P pruner=median
# More workers (on this or other machines) join with the same storage and study_name:
mlflow run . -e search -P storage=postgresql://user:password@host/optuna -P study_name=X
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/search.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import (  # noqa: E402
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.studies.search_spaces import DEFAULT_SEARCH_STORAGE, SearchConfig  # noqa: E402
from mnist_mlflow.studies.study_storage import open_storage  # noqa: E402

HELP = {
    "space": "grid or random (docs/experiments.md section 4), or the path of a YAML space file",
    "sampler": "grid, random or tpe; empty: the space's default (grid for grid, random for random)",
    "n_trials": "cap on the trials of the study over all workers; 0: the grid size for grid, 50 otherwise",
    "epochs": "passes over the training data per trial",
    "pruner": "none, or median: stop a trial whose validation accuracy is below the median at the same epoch",
    "storage": f"Optuna storage URL shared by all workers; empty: {DEFAULT_SEARCH_STORAGE} in the working directory",
    "study_name": "the Optuna study to create or join; empty: search-<space>[-<sampler>]",
    "max_train_examples": "cap on training examples for quick runs; 0 means all",
    "seed": "seed for the split, every trial's initial weights, and the sampler",
    "register_as": "registered model name for the best trial's model; empty: do not register",
}


def main(argv=None) -> None:
    config = parse_config(SearchConfig, __doc__.splitlines()[0], HELP, argv)
    check_tracking_first()
    # A storage that cannot be opened is one line before TensorFlow is imported, too. The search
    # opens it again when it starts (a few milliseconds once its tables exist).
    open_storage(config.resolved_storage())
    import_training_libraries()

    from mnist_mlflow.studies.search import run_search

    run_search(config)


if __name__ == "__main__":
    exit_process(run_main(main))
