"""The `weight_decay` entry point: the L2 replicate sweep of a 784-500-300-10 network as one parent run.

python entrypoints/weight_decay.py --factors 1e-5,1e-3 --replicates 2 --epochs 1
mlflow run . -e weight_decay --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/weight_decay.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import (  # noqa: E402
    check_tracking_first,
    exit_process,
    import_training_libraries,
    parse_config,
    run_main,
)
from mnist_mlflow.studies.weight_decay import WeightDecayConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(WeightDecayConfig, __doc__.splitlines()[0], argv)
    check_tracking_first()
    import_training_libraries()

    from mnist_mlflow.studies.weight_decay import run_weight_decay

    run_weight_decay(config)


if __name__ == "__main__":
    exit_process(run_main(main))
