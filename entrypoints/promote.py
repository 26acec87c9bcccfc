"""The `promote` entry point: point the `champion` alias at the best version of a registered model.

python entrypoints/promote.py --model_name mnist-cnn
mlflow run . -e promote -P model_name=mnist-cnn --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/promote.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import exit_process, run_main, string_parser  # noqa: E402
from mnist_mlflow.config import ConfigError, check_name  # noqa: E402

DEFAULTS = {"model_name": "mnist-cnn", "metric": "val_accuracy"}
HELP = {
    "model_name": "registered model name",
    "metric": "validation metric to rank versions by (higher is better); test metrics are refused",
}


def main(argv=None) -> None:
    parser = string_parser(__doc__.splitlines()[0], DEFAULTS, HELP)
    args = parser.parse_args(argv)
    if not args.model_name.strip():
        raise ConfigError("model_name='' must name a registered model")
    check_name("model_name", args.model_name.strip())

    from mnist_mlflow import tracking

    tracking.prepare_tracking()
    promotion = tracking.promote_best_version(args.model_name.strip(), args.metric.strip())
    print(f"Versions of {promotion.model_name} by {promotion.metric} (higher is better; ties go to the newer):")
    for number, value in promotion.candidates:
        shown = "no score" if value is None else f"{value:.4f}"
        marker = "  <- chosen" if number == promotion.version else ""
        print(f"  version {number}: {shown}{marker}")
    moved = (
        ""
        if promotion.previous_version in (None, promotion.version)
        else f" (was version {promotion.previous_version})"
    )
    print(
        f"Alias '{promotion.alias}' -> {promotion.model_name} version {promotion.version}{moved}: "
        f"the highest {promotion.metric}, {promotion.value:.4f}."
    )
    print(
        "Serve it: mlflow models serve -m "
        f'"models:/{promotion.model_name}@{promotion.alias}" --env-manager local -p 5001'
    )


if __name__ == "__main__":
    exit_process(run_main(main))
