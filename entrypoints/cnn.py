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
    TRAINING_HELP,
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.config import CnnRunConfig  # noqa: E402

HELP = {
    "filters": "comma list of filter counts, one Conv2D (relu, valid padding) per entry",
    "kernel_size": "square kernel size of every convolution",
    "pooling": "comma list of true/false, one per convolution: 2x2 max-pool (stride 2) after it; empty = all true",
    "dense_units": "comma list of widths of the relu layers after the convolutions; empty = none",
    "dropout": "dropout rate just before the output layer, in [0, 1)",
    "precision": "float32, bfloat16 (mixed precision), or auto: bfloat16 where the CPU has bfloat16 matrix units",
    "register_as": "registered model name for the selected model; empty = do not register",
    **TRAINING_HELP,
}


def main(argv=None) -> None:
    # Empty pooling means a max-pool after every convolution, whatever their number.
    defaults = {**CnnRunConfig().as_params(), "pooling": ""}
    config = parse_config(CnnRunConfig, __doc__.splitlines()[0], HELP, argv, defaults)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.experiments import run_cnn

    run_cnn(config)


if __name__ == "__main__":
    exit_process(run_main(main))
