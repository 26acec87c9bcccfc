"""The `dense` entry point: a fully connected network on MNIST or Fashion-MNIST, tracked in MLflow.

python entrypoints/dense.py --hidden_units 200,200 --epochs 5
mlflow run . -e dense -P hidden_units=200,200 --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/dense.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import (  # noqa: E402
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.config import DenseRunConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(DenseRunConfig, __doc__.splitlines()[0], argv)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.tracked_run import run_dense

    run_dense(config)


if __name__ == "__main__":
    exit_process(run_main(main))
