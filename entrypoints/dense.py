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
    TRAINING_HELP,
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.config import DenseRunConfig  # noqa: E402

HELP = {
    "hidden_units": "comma list of hidden-layer widths",
    "activation": "one activation for every hidden layer, or a comma list with one per layer",
    "dropout": "dropout rate after every hidden layer, in [0, 1)",
    "l2": "L2 weight-decay factor on the hidden kernels",
    "regularized_layers": "which hidden kernels get the L2 penalty: all, or only the first",
    **TRAINING_HELP,
}


def main(argv=None) -> None:
    config = parse_config(DenseRunConfig, __doc__.splitlines()[0], HELP, argv)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.experiments import run_dense

    run_dense(config)


if __name__ == "__main__":
    exit_process(run_main(main))
