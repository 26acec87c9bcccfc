"""The `exercises` entry point: a suite of course exercises as one parent run with a child run per exercise.

python entrypoints/exercises.py --suite dense --only 1,4 --epochs 1
mlflow run . -e exercises -P suite=conv --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/exercises.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import (  # noqa: E402
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.studies.exercises import ExercisesConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(ExercisesConfig, __doc__.splitlines()[0], argv)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.studies.exercises import run_exercises

    run_exercises(config)


if __name__ == "__main__":
    exit_process(run_main(main))
