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
from mnist_mlflow.studies.search_config import SearchConfig  # noqa: E402
from mnist_mlflow.studies.study_storage import open_storage  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(SearchConfig, __doc__.splitlines()[0], argv)
    check_tracking_first()
    # A storage that cannot be opened is one line before TensorFlow is imported, too. The search
    # opens it again when it starts (a few milliseconds once its tables exist).
    # Its connection is given back at once: each worker holds only those the search uses.
    open_storage(config.resolved_storage()).engine.dispose()
    import_training_libraries()

    from mnist_mlflow.studies.search import run_search

    run_search(config)


if __name__ == "__main__":
    exit_process(run_main(main))
