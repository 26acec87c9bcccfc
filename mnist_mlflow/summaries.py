"""The summaries a study's parent run holds: tables, statistics and plots built from its children.

Everything is computed from what the children recorded in MLflow (their metrics and params),
so a summary after a resumed study covers the reused children exactly like the new ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from mnist_mlflow import plots, tracking
from mnist_mlflow.studies import ChildOutcome
from mnist_mlflow.weight_decay import LECUN_TABLE_ACCURACY


def _number(value: str | float | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def exercises_table(outcomes: Sequence[ChildOutcome]) -> pd.DataFrame:
    """One row per exercise: what changed, accuracies, time per epoch, total time, parameters."""
    rows = []
    for outcome in outcomes:
        metrics = outcome.metrics
        rows.append(
            {
                "exercise": outcome.spec.tags.get("exercise", outcome.spec.key),
                "change": outcome.params.get("exercise_change", ""),
                "val_accuracy": metrics.get("best_val_accuracy", float("nan")),
                "test_accuracy": metrics.get("test_accuracy", float("nan")),
                "mean_epoch_time_s": metrics.get("mean_epoch_time_s", float("nan")),
                "train_time_s": metrics.get("train_time_s", float("nan")),
                "trainable_parameters": int(_number(outcome.params.get("trainable_parameters"))),
                "best_epoch": int(metrics.get("best_epoch", -1)) + 1,
                "run_id": outcome.run_id,
            }
        )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame, formats: dict[str, str]) -> str:
    """A GitHub Markdown table; ``formats`` maps column names to format specs such as ``.2%``."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    lines = [header, rule]
    # Records keep each column's type; iterrows would turn the whole row into floats.
    for row in frame.to_dict("records"):
        cells = []
        for column in frame.columns:
            value = row[column]
            spec = formats.get(column)
            if spec and isinstance(value, (int, float, np.floating, np.integer)) and not pd.isna(value):
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


EXERCISE_FORMATS = {
    "val_accuracy": ".2%", "test_accuracy": ".2%", "mean_epoch_time_s": ".2f", "train_time_s": ".1f",
    "trainable_parameters": ",d",
}


def log_exercises_summary(parent: tracking.StudyParent, outcomes: Sequence[ChildOutcome], reference_id: str) -> pd.DataFrame:
    """Logs the comparison table, its Markdown and the accuracy-against-time plot on the parent."""
    table = exercises_table(outcomes)
    best = table.loc[table["val_accuracy"].idxmax()]
    figure = plots.accuracy_vs_time_figure(
        [f"{exercise}" for exercise in table["exercise"]],
        list(table["mean_epoch_time_s"]),
        list(table["val_accuracy"]),
        highlight=reference_id,
        title="Exercises: best validation accuracy against mean seconds per epoch",
    )
    markdown = markdown_table(table.drop(columns=["run_id"]), EXERCISE_FORMATS)
    tracking.log_study_summary(
        parent,
        tables={"summary/exercises.json": table},
        texts={"summary/exercises.md": markdown},
        figures={"summary/accuracy_vs_epoch_time.png": figure},
        metrics={"best_val_accuracy": float(best["val_accuracy"]), "best_test_accuracy": float(best["test_accuracy"])},
        tags={"best_exercise": str(best["exercise"]), "best_run_id": str(best["run_id"])},
        winner_run_id=str(best["run_id"]),
    )
    plots.close(figure)
    print(markdown, flush=True)
    return table


def mean_std_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and a Student-t confidence interval of the mean.

    With one value the standard deviation and interval are undefined and returned as NaN.
    """
    from scipy import stats

    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    mean = float(array.mean())
    if len(array) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    deviation = float(array.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1)) * deviation / math.sqrt(len(array))
    return mean, deviation, mean - half_width, mean + half_width


def weight_decay_tables(outcomes: Sequence[ChildOutcome], factors: Sequence[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per factor with statistics, one row per child run)."""
    runs = pd.DataFrame(
        [
            {
                "factor": _number(outcome.params.get("l2")),
                "replicate": int(_number(outcome.params.get("replicate"))),
                "val_accuracy": outcome.metrics.get("best_val_accuracy", float("nan")),
                "val_accuracy_epoch_1": outcome.val_accuracy_history[0] if outcome.val_accuracy_history else float("nan"),
                "test_accuracy": outcome.metrics.get("test_accuracy", float("nan")),
                "best_epoch": int(outcome.metrics.get("best_epoch", -1)) + 1,
                "mean_epoch_time_s": outcome.metrics.get("mean_epoch_time_s", float("nan")),
                "run_id": outcome.run_id,
            }
            for outcome in outcomes
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
                # EXPERIMENTS.md's reference reports the means after one epoch.
                "val_accuracy_epoch_1_mean": float(group["val_accuracy_epoch_1"].mean()),
                "test_accuracies": ", ".join(f"{value:.4f}" for value in group["test_accuracy"]),
            }
        )
    return pd.DataFrame(rows), runs


WEIGHT_DECAY_FORMATS = {
    "factor": ".6g", "val_accuracy_mean": ".2%", "val_accuracy_std": ".3%", "val_accuracy_ci95_low": ".2%",
    "val_accuracy_ci95_high": ".2%", "test_accuracy_mean": ".2%", "val_accuracy": ".2%", "test_accuracy": ".2%",
    "mean_epoch_time_s": ".2f", "val_accuracy_epoch_1_mean": ".2%", "val_accuracy_epoch_1": ".2%",
}


def log_weight_decay_summary(
    parent: tracking.StudyParent, outcomes: Sequence[ChildOutcome], factors: Sequence[float]
) -> pd.DataFrame:
    """Logs the per-factor statistics, the per-run table, the error-bar plots and the best factor."""
    by_factor, runs = weight_decay_tables(outcomes, factors)
    best = by_factor.loc[by_factor["val_accuracy_mean"].idxmax()]
    figures = {
        f"summary/val_accuracy_vs_factor{suffix}.png": plots.error_bar_figure(
            list(by_factor["factor"]), list(by_factor["val_accuracy_mean"]), list(by_factor["val_accuracy_std"]),
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
    tracking.log_study_summary(
        parent,
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
    )
    for figure in figures.values():
        plots.close(figure)
    print(markdown, flush=True)
    return by_factor
