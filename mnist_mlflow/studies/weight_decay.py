"""The weight-decay replicate sweep (docs/experiments.md section 2) as a study.

784-500(relu)-300(relu)-10 trained with plain SGD; L2 weight decay on the first hidden kernel
(or on all of them); one child run per (factor, replicate). Replicate ``r`` of every factor
starts from the same seed, so factors are compared on equal footing, and all runs share one
train/validation split. This module holds the sweep's config, its children and its summary;
importing it loads neither TensorFlow nor MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mnist_mlflow.config import (
    MAX_SEED,
    REGULARIZED_LAYERS,
    SEED,
    ConfigError,
    DataConfig,
    DenseModelConfig,
    DenseRunConfig,
    TrainingConfig,
    max_train_examples_parameter,
    sweep_id_parameter,
)
from mnist_mlflow.parameters import (
    POSITIVE_NUMBER,
    Kind,
    Parameters,
    check_parameters,
    choice,
    numbers,
    parameter,
    whole_number,
)
from mnist_mlflow.studies.protocol import ChildSpec, StudySummary
from mnist_mlflow.studies.summaries import as_number, markdown_table, mean_std_ci

if TYPE_CHECKING:
    from mnist_mlflow.tracking import ChildRecord

HIDDEN_UNITS = (500, 300)
# LeCun's MNIST table: "3-layer NN, 500+300 HU, softmax, cross entropy, weight decay",
# 1.53% test error (Hinton, 2005).
LECUN_TABLE_ACCURACY = 0.9847


def linspace(start: float, stop: float, count: int) -> tuple[float, ...]:
    """``count`` evenly spaced values from ``start`` to ``stop``, like numpy.linspace."""
    if count == 1:
        return (start,)
    return tuple(start + (stop - start) * index / (count - 1) for index in range(count))


# numpy.linspace(1e-6, 1e-3, 5), the factors of docs/experiments.md section 2, to the ten digits
# every parameter, tag and child key writes them with: a factor read back from MLproject or a
# resumed study's parameters is then exactly the default one.
WEIGHT_DECAY_FACTORS = tuple(float(f"{factor:.10g}") for factor in linspace(1e-6, 1e-3, 5))


def _check_factors(name: str, factors: tuple[float, ...]) -> None:
    if not factors:
        raise ConfigError(f"{name}='' must list at least one weight-decay factor")
    for factor in factors:
        if not factor > 0:
            raise ConfigError(f"{name}: {factor!r} is not a positive weight-decay factor")
    if len(set(factors)) != len(factors):
        raise ConfigError(f"{name}={','.join(f'{factor:g}' for factor in factors)!r} lists a factor twice")


@dataclass(frozen=True)
class WeightDecayConfig(Parameters):
    """One weight-decay replicate sweep; mirrors :func:`run_weight_decay`.

    Replicate ``r`` of every factor trains with seed ``seed + r``; all share the split made
    with ``seed``.
    """

    factors: tuple[float, ...] = parameter(
        WEIGHT_DECAY_FACTORS,
        "comma list of L2 factors (default: numpy.linspace(1e-6, 1e-3, 5))",
        Kind(read=numbers().read, write=numbers().write, check=_check_factors),
    )
    replicates: int = parameter(3, "networks per factor; replicate r trains with seed + r", whole_number())
    epochs: int = parameter(10, "passes over the training data, for every child", whole_number())
    batch_size: int = parameter(32, "examples per training step", whole_number())
    learning_rate: float = parameter(0.1, "plain SGD's learning rate", POSITIVE_NUMBER)
    regularized_layers: str = parameter(
        "first", "which hidden kernels get the L2 penalty: all of them, or only the first", choice(*REGULARIZED_LAYERS)
    )
    max_train_examples: int = max_train_examples_parameter()
    seed: int = parameter(0, "the split's seed, and replicate 0's", SEED)
    sweep_id: str = sweep_id_parameter()

    def __post_init__(self) -> None:
        check_parameters(self)
        if self.seed + self.replicates - 1 > MAX_SEED:
            raise ConfigError(
                f"seed={self.seed} with replicates={self.replicates}: replicate r trains with seed + r, "
                f"which must stay at most {MAX_SEED} (2**32 - 1)"
            )


def replicate_seed(config: WeightDecayConfig, replicate: int) -> int:
    """The training seed of replicate ``replicate`` (0-based), the same for every factor."""
    return config.seed + replicate


def child_config(config: WeightDecayConfig, factor: float, replicate: int) -> DenseRunConfig:
    return DenseRunConfig(
        model=DenseModelConfig(
            hidden_units=HIDDEN_UNITS,
            activations=("relu",) * len(HIDDEN_UNITS),
            l2_factor=factor,
            regularized_layers=config.regularized_layers,
        ),
        training=TrainingConfig(
            optimizer="sgd",
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            epochs=config.epochs,
            seed=replicate_seed(config, replicate),
        ),
        data=DataConfig(seed=config.seed, max_train_examples=config.max_train_examples),
    )


def describe(config: WeightDecayConfig) -> str:
    layers = "the first hidden kernel" if config.regularized_layers == "first" else "every hidden kernel"
    return (
        f"Weight-decay replicate sweep (docs/experiments.md section 2). Varies: the L2 factor on {layers} "
        f"({len(config.factors)} factors). Repeats: {config.replicates} replicate networks per factor, "
        f"replicate r seeded {config.seed}+r for every factor. Holds fixed: 784-500-300-10 relu, SGD "
        f"learning rate {config.learning_rate:g}, batch {config.batch_size}, {config.epochs} epochs, "
        f"the split (seed {config.seed})."
    )


def weight_decay_tables(records: Sequence[ChildRecord], factors: Sequence[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per factor with statistics, one row per child run)."""
    runs = pd.DataFrame(
        [
            {
                "factor": as_number(record.params.get("l2")),
                "replicate": int(as_number(record.params.get("replicate"))),
                "val_accuracy": record.metrics.get("best_val_accuracy", float("nan")),
                "val_accuracy_epoch_1": record.val_accuracy_history[0] if record.val_accuracy_history else float("nan"),
                "test_accuracy": record.metrics.get("test_accuracy", float("nan")),
                "best_epoch": int(record.metrics.get("best_epoch", -1)) + 1,
                "mean_epoch_time_s": record.metrics.get("mean_epoch_time_s", float("nan")),
                "run_id": record.run_id,
            }
            for record in records
        ]
    )
    rows = []
    for factor in factors:
        group = runs[np.isclose(runs["factor"], factor, rtol=1e-9, atol=0)]
        mean, deviation, low, high = mean_std_ci(list(group["val_accuracy"]))
        rows.append(
            {
                "factor": factor,
                "replicates": len(group),
                "val_accuracy_mean": mean,
                "val_accuracy_std": deviation,
                "val_accuracy_ci95_low": low,
                "val_accuracy_ci95_high": high,
                "test_accuracy_mean": float(group["test_accuracy"].mean()),
                # docs/experiments.md's reference reports the means after one epoch.
                "val_accuracy_epoch_1_mean": float(group["val_accuracy_epoch_1"].mean()),
                "test_accuracies": ", ".join(f"{value:.4f}" for value in group["test_accuracy"]),
            }
        )
    return pd.DataFrame(rows), runs


WEIGHT_DECAY_FORMATS = {
    "factor": ".6g",
    "val_accuracy_mean": ".2%",
    "val_accuracy_std": ".3%",
    "val_accuracy_ci95_low": ".2%",
    "val_accuracy_ci95_high": ".2%",
    "test_accuracy_mean": ".2%",
    "val_accuracy": ".2%",
    "test_accuracy": ".2%",
    "mean_epoch_time_s": ".2f",
    "val_accuracy_epoch_1_mean": ".2%",
    "val_accuracy_epoch_1": ".2%",
}


def weight_decay_summary(records: Sequence[ChildRecord], factors: Sequence[float]) -> StudySummary:
    """The per-factor statistics, the per-run table, the error-bar plots and the best factor."""
    from mnist_mlflow import plots

    by_factor, runs = weight_decay_tables(records, factors)
    best = by_factor.loc[by_factor["val_accuracy_mean"].idxmax()]
    figures = {
        f"summary/val_accuracy_vs_factor{suffix}.png": plots.error_bar_figure(
            list(by_factor["factor"]),
            list(by_factor["val_accuracy_mean"]),
            list(by_factor["val_accuracy_std"]),
            reference=LECUN_TABLE_ACCURACY,
            reference_label=f"LeCun's table, 500+300 HU with weight decay: {LECUN_TABLE_ACCURACY:.2%} (test)",
            log_x=log_x,
        )
        for suffix, log_x in (("", False), ("_log", True))
    }
    markdown = (
        markdown_table(by_factor, WEIGHT_DECAY_FORMATS)
        + f"\nBest factor by mean validation accuracy: {best['factor']:.6g} "
        + f"({best['val_accuracy_mean']:.2%}); test accuracy of its models: {best['test_accuracies']}.\n\n"
        + markdown_table(runs.drop(columns=["run_id"]), WEIGHT_DECAY_FORMATS)
    )
    return StudySummary(
        tables={"summary/weight_decay.json": by_factor, "summary/weight_decay_runs.json": runs},
        texts={"summary/weight_decay.md": markdown},
        figures=figures,
        metrics={
            "best_factor": float(best["factor"]),
            "best_val_accuracy_mean": float(best["val_accuracy_mean"]),
            "best_test_accuracy_mean": float(best["test_accuracy_mean"]),
        },
        # One step per factor, in the order given, so the MLflow UI can chart them.
        stepped_metrics={
            "factor": list(by_factor["factor"]),
            "val_accuracy_mean": list(by_factor["val_accuracy_mean"]),
            "val_accuracy_std": list(by_factor["val_accuracy_std"].fillna(0.0)),
            "test_accuracy_mean": list(by_factor["test_accuracy_mean"]),
            "val_accuracy_epoch_1_mean": list(by_factor["val_accuracy_epoch_1_mean"]),
        },
        tags={"best_factor": f"{best['factor']:.10g}"},
        printed=markdown,
    )


def children(config: WeightDecayConfig) -> list[ChildSpec]:
    """One child run per (factor, replicate)."""
    return [
        ChildSpec(
            key=f"factor={factor:.10g}/replicate={replicate}",
            run_name=f"wd-l2={factor:.3g}-r{replicate}",
            config=child_config(config, factor, replicate),
            tags={"weight_decay_factor": f"{factor:.10g}", "replicate": str(replicate)},
            params={"replicate": replicate, "replicate_seed": replicate_seed(config, replicate)},
            description=(
                f"Weight-decay factor {factor:g}, replicate {replicate} "
                f"(replicates are numbered from 0 to {config.replicates - 1})."
            ),
        )
        for factor in config.factors
        for replicate in range(config.replicates)
    ]


def run_weight_decay(config: WeightDecayConfig):
    """Trains every (factor, replicate) as a child of one parent run and logs the sweep's summary.

    Returns the :class:`mnist_mlflow.studies.engine.StudyResult`.
    """
    from mnist_mlflow.studies import engine

    study_id = config.sweep_id or engine.new_study_id("weight_decay")
    return engine.run_study(
        engine.ListStudy(
            kind="weight_decay",
            study_id=study_id,
            run_name=f"weight-decay-{study_id.rsplit('-', 1)[-1]}",
            params={**config.as_params(), "sweep_id": study_id},
            description=describe(config),
            children=children(config),
            summarise_records=lambda records: weight_decay_summary(records, config.factors),
        )
    )
