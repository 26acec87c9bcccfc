"""The `promote` entry point: point the `champion` alias at the best version of a registered model.

Versions are ranked by their logged models' validation figures (mlflow.search_logged_models), and
the best one is evaluated again on its validation split (mlflow.models.evaluate) before the alias moves.

python entrypoints/promote.py --model_name mnist-cnn
python entrypoints/promote.py --model_name mnist-cnn --min_val_accuracy 0.99
mlflow run . -e promote -P model_name=mnist-cnn --env-manager local
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/promote.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import exit_process, parse_config, run_main  # noqa: E402
from mnist_mlflow.config import PromoteConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(PromoteConfig, __doc__.splitlines()[0], argv)

    from mnist_mlflow import tracking

    tracking.prepare_tracking()
    from mnist_mlflow.tracked_run import validation_split

    promotion = tracking.promote_best_version(
        config.model_name, validation_split, config.metric, min_val_accuracy=config.min_val_accuracy
    )
    print(f"Versions of {promotion.model_name} by {promotion.metric} (higher is better; ties go to the newer):")
    for candidate in sorted(promotion.candidates, key=lambda item: int(item.version)):
        shown = "no score" if candidate.value is None else f"{candidate.value:.4f}"
        source = "" if candidate.source == "logged model" else f" ({candidate.source})"
        marker = "  <- chosen" if candidate.version == promotion.version else ""
        print(f"  version {candidate.version}: {shown}{source}{marker}")
    print(
        f"Evaluated version {promotion.version} with mlflow.models.evaluate on {promotion.evaluated_on}: "
        f"accuracy {promotion.evaluated_accuracy:.4f} (at least {config.min_val_accuracy:g} asked)."
    )
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
