"""The `cnn` entry point: a convolutional network on MNIST or Fashion-MNIST, tracked and registered.

python entrypoints/cnn.py --epochs 4
mlflow run . -e cnn -P filters=64,64 -P dense_units=128 --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/cnn.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import (  # noqa: E402
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.config import CnnRunConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(CnnRunConfig, __doc__.splitlines()[0], argv)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.tracked_run import run_cnn

    run_cnn(config)


if __name__ == "__main__":
    exit_process(run_main(main))
