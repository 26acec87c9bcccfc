"""A search's summary, from its trials: the trials table, the best trial, the best of N, the figures."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from mnist_mlflow import plots
from mnist_mlflow.studies import best_of_n, summaries
from mnist_mlflow.studies.protocol import Registration, StudySummary
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.search_keys import (
    BEST_EPOCH_ATTR,
    BEST_VAL_ACCURACY_ATTR,
    DIVERGED_ATTR,
    EPOCHS_TRAINED_ATTR,
    MODEL_URI_ATTR,
    PARAMETERS_ATTR,
    RUN_ID_ATTR,
    SAME_AS_TRIAL_ATTR,
    SECONDS_PER_EPOCH_ATTR,
    SURPLUS_ATTR,
    TEST_ACCURACY_ATTR,
    TRAIN_TIME_ATTR,
    WORKER_ATTR,
)
from mnist_mlflow.studies.search_spaces import SearchSpace
from mnist_mlflow.studies.search_workers import is_surplus, retried_trial_number

BEST_OF_N = (1, 5, 10, 20, 50, 100)
# docs/experiments.md section 4: the reference's expected best accuracy, from re-running the search.
REFERENCE_BEST_OF_N = {10: 0.975, 20: 0.980, 50: 0.982, 100: 0.981}


def trials_table(study, space: SearchSpace) -> pd.DataFrame:
    """One row per trial: number, state, the varied parameters and what the trial recorded."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number):
        attrs = trial.user_attrs
        retry_of = retried_trial_number(trial)
        state = "SURPLUS" if is_surplus(trial) else trial.state.name
        row = {"trial": trial.number, "state": state}
        row.update({name: trial.params.get(name) for name in space.parameters})
        row.update(
            {
                "val_accuracy": attrs.get(BEST_VAL_ACCURACY_ATTR, np.nan),
                "test_accuracy": attrs.get(TEST_ACCURACY_ATTR, np.nan),
                "best_epoch": attrs.get(BEST_EPOCH_ATTR, np.nan),
                "epochs_trained": attrs.get(EPOCHS_TRAINED_ATTR, len(trial.intermediate_values)),
                "train_time_s": attrs.get(TRAIN_TIME_ATTR, np.nan),
                "seconds_per_epoch": attrs.get(SECONDS_PER_EPOCH_ATTR, np.nan),
                "parameters": attrs.get(PARAMETERS_ATTR, np.nan),
                "worker": attrs.get(WORKER_ATTR, ""),
                "retry_of": "" if retry_of is None else retry_of,
                "run_id": attrs.get(RUN_ID_ATTR, ""),
                "note": attrs.get(SURPLUS_ATTR, "")
                or (f"diverged: {attrs[DIVERGED_ATTR]}" if DIVERGED_ATTR in attrs else "")
                or (f"same as trial {attrs['same_as_trial']}" if SAME_AS_TRIAL_ATTR in attrs else ""),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def grid_heatmap(table: pd.DataFrame, space: SearchSpace) -> tuple[str, list, str, list, np.ndarray] | None:
    """Rows, columns and the validation accuracy of each cell of a two-axis grid (NaN where unfinished)."""
    axes = [name for name, choices in space.parameters.items() if isinstance(choices, tuple) and len(choices) > 1]
    if not space.is_grid or len(axes) != 2:
        return None
    row_name, column_name = axes
    rows, columns = list(space.parameters[row_name]), list(space.parameters[column_name])
    matrix = np.full((len(rows), len(columns)), np.nan)
    finished = table[table["state"] == "COMPLETE"]
    for _, trial in finished.iterrows():
        row, column = rows.index(trial[row_name]), columns.index(trial[column_name])
        matrix[row, column] = np.nanmax([matrix[row, column], trial["val_accuracy"]])
    return row_name, rows, column_name, columns, matrix


def search_summary(study, config: SearchConfig, space: SearchSpace) -> StudySummary:
    """The search's summary, from its trials: the table, the best trial, best-of-N, the figures."""
    table = trials_table(study, space)
    summary = StudySummary(
        tables={"search/trials.json": table},
        texts={"search/space.json": json.dumps(space.describe(), indent=2)},
        metrics=_trial_counts(table, config.epochs),
    )
    if config.is_multi_objective():
        _add_pareto_front(summary, table, study, config, space)
    else:
        best = _best_trial(table)
        if best is not None:
            _describe_best(summary, best, study, config, space)
    trained = table[table["state"].isin(["COMPLETE", "PRUNED"])]
    _add_best_of_n(summary, trained, space)
    heatmap = grid_heatmap(table, space)
    if heatmap is not None:
        summary.figures["search/heatmap_val_accuracy.png"] = plots.heatmap_figure(*heatmap)
    if len(trained):
        summary.figures["search/best_so_far.png"] = plots.best_so_far_figure(
            list(trained["trial"]), list(trained["val_accuracy"]), list(trained["state"] == "PRUNED")
        )
    if config.resolved_sampler() != "grid" or heatmap is None:
        try:
            summary.figures["search/parameter_importance.png"] = plots.parameter_importance_figure(study)
        except (ValueError, RuntimeError) as error:
            note = f"no parameter-importance plot: {error}"
            print(f"Search {study.study_name}: {note}", flush=True)
            summary.tags["parameter_importance_note"] = note
    summary.texts["search/trials.md"] = summaries.markdown_table(
        table.drop(columns=["run_id", "note"]),
        {"val_accuracy": ".2%", "test_accuracy": ".2%", "train_time_s": ".1f", "seconds_per_epoch": ".2f"},
    )
    return summary


def _trial_counts(table: pd.DataFrame, epochs: int) -> dict[str, float]:
    """How many trials ended in each state, the epochs trained and saved, the training time."""
    if not len(table):
        return {
            name: 0.0
            for name in (
                "trials_complete",
                "trials_pruned",
                "trials_failed",
                "trials_surplus",
                "trials_reused",
                "epochs_trained",
                "train_time_s",
                "epochs_saved_by_pruning",
            )
        }
    pruned = table[table["state"] == "PRUNED"]
    return {
        "trials_complete": int((table["state"] == "COMPLETE").sum()),
        "trials_pruned": len(pruned),
        "trials_failed": int((table["state"] == "FAIL").sum()),
        "trials_surplus": int((table["state"] == "SURPLUS").sum()),
        "trials_reused": int(table["note"].str.startswith("same as").sum()),
        "epochs_trained": float(table["epochs_trained"].sum()),
        "train_time_s": float(np.nansum(table["train_time_s"])),
        "epochs_saved_by_pruning": float(len(pruned) * epochs - pruned["epochs_trained"].sum()),
    }


def _best_trial(table: pd.DataFrame):
    """The COMPLETE trial with the best validation accuracy; of equals, the earliest. None if none completed."""
    complete = table[table["state"] == "COMPLETE"]
    if not len(complete):
        return None
    return complete.sort_values(["val_accuracy", "trial"], ascending=[False, True]).iloc[0]


def measured_points(table: pd.DataFrame, cost: str) -> pd.DataFrame:
    """The COMPLETE trials with both a validation accuracy and ``cost``. A trial that reused a
    twin's result is its twin, not a second point."""
    finished = table[(table["state"] == "COMPLETE") & ~table["note"].str.startswith("same as")]
    return finished[np.isfinite(finished["val_accuracy"].astype(float)) & np.isfinite(finished[cost].astype(float))]


def pareto_front(table: pd.DataFrame, cost: str) -> pd.DataFrame:
    """The measured points no other beats on both validation accuracy (higher) and ``cost``
    (lower), by increasing cost."""
    finished = measured_points(table, cost)
    keep = []
    for index, trial in finished.iterrows():
        better_or_equal = (finished["val_accuracy"] >= trial["val_accuracy"]) & (finished[cost] <= trial[cost])
        strictly = (finished["val_accuracy"] > trial["val_accuracy"]) | (finished[cost] < trial[cost])
        if not (better_or_equal & strictly).any():
            keep.append(index)
    return finished.loc[keep].sort_values([cost, "val_accuracy", "trial"], ascending=[True, False, True])


def choose_from_front(front: pd.DataFrame, cost: str, within: float):
    """The selection rule: the cheapest trial of the front whose validation accuracy is within
    ``within`` of the front's best; of equal cost, the more accurate, then the earlier."""
    best = front["val_accuracy"].max()
    near = front[front["val_accuracy"] >= best - within - 1e-12]
    return near.sort_values([cost, "val_accuracy", "trial"], ascending=[True, False, True]).iloc[0]


def selection_rule(config: SearchConfig) -> str:
    what = "seconds per epoch" if config.cost == "seconds_per_epoch" else "trainable parameters"
    if config.pick_within == 0:
        return f"the most accurate trial of the Pareto front (of equals, the fewest {what})"
    return (
        f"the trial of the Pareto front with the fewest {what} whose validation accuracy is within "
        f"{config.pick_within:g} ({config.pick_within:.2%}) of the best; set pick_within to change it"
    )


def _add_pareto_front(summary: StudySummary, table: pd.DataFrame, study, config: SearchConfig, space: SearchSpace):
    """A Pareto study's front (table and figure), the rule that picks one trial of it, and that trial."""
    cost = config.cost
    front = pareto_front(table, cost)
    summary.metrics["pareto_front_size"] = float(len(front))
    summary.tags["selection_rule"] = selection_rule(config)
    if not len(front):
        return
    chosen = choose_from_front(front, cost, config.pick_within)
    columns = ["trial", *space.parameters, "val_accuracy", "test_accuracy", "seconds_per_epoch", "parameters", "run_id"]
    shown = front[columns].assign(chosen=front["trial"] == chosen["trial"])
    summary.tables["search/pareto_front.json"] = shown
    summary.texts["search/pareto_front.md"] = (
        f"Pareto front of validation accuracy against {cost.replace('_', ' ')}. "
        f"Chosen by rule: {selection_rule(config)}.\n\n"
        + summaries.markdown_table(
            shown.drop(columns=["run_id"]),
            {"val_accuracy": ".2%", "test_accuracy": ".2%", "seconds_per_epoch": ".3f", "parameters": ",.0f"},
        )
    )
    points = measured_points(table, cost)
    summary.figures["search/pareto_front.png"] = plots.pareto_front_figure(
        [int(number) for number in points["trial"]],
        [float(value) for value in points[cost]],
        [float(value) for value in points["val_accuracy"]],
        list(points["trial"].isin(front["trial"])),
        int(chosen["trial"]),
        "Mean seconds per epoch" if cost == "seconds_per_epoch" else "Trainable parameters",
        config.pick_within,
    )
    summary.metrics.update(
        best_val_accuracy=float(front["val_accuracy"].max()),
        chosen_cost=float(chosen[cost]),
    )
    _describe_best(summary, chosen, study, config, space, prefix="chosen")
    summary.printed += f"; {cost} {float(chosen[cost]):g}, chosen as {selection_rule(config)}"


def _describe_best(
    summary: StudySummary, best, study, config: SearchConfig, space: SearchSpace, prefix: str = "best"
) -> None:
    """The best (or chosen) trial's metrics and tags, the winner, its registration and the line printed about it."""
    best_params = {name: _plain(best[name]) for name in space.parameters}
    summary.metrics.update(
        {
            f"{prefix}_val_accuracy": float(best["val_accuracy"]),
            f"{prefix}_test_accuracy": float(best["test_accuracy"]),
            f"{prefix}_trial_number": float(best["trial"]),
        }
    )
    summary.tags.update(
        {
            f"{prefix}_params": json.dumps(best_params),
            f"{prefix}_run_id": str(best["run_id"]),
            f"{prefix}_trial": str(int(best["trial"])),
        }
    )
    summary.tags.update({f"{prefix}_{name}": str(value) for name, value in best_params.items()})
    summary.winner_run_id = str(best["run_id"])
    model_uri = study.trials[int(best["trial"])].user_attrs.get(MODEL_URI_ATTR)
    if config.register_as and model_uri:
        summary.registration = Registration(
            model_uri,
            config.register_as,
            str(best["run_id"]),
            float(best["val_accuracy"]),
            float(best["test_accuracy"]),
        )
    summary.printed = (
        f"{prefix.capitalize()} trial {int(best['trial'])}: val_accuracy "
        f"{best['val_accuracy']:.4f}, test_accuracy {best['test_accuracy']:.4f}, "
        + ", ".join(f"{name}={value}" for name, value in best_params.items())
    )


def _add_best_of_n(summary: StudySummary, trained: pd.DataFrame, space: SearchSpace) -> None:
    """The expected best of N trials drawn from this search: table, metrics and plot.

    The pool is every trial that trained; a pruned one enters with the best accuracy it reached
    (a lower bound of what it would have reached: pruning keeps the figures on the safe side).
    """
    pool = [float(value) for value in trained["val_accuracy"] if np.isfinite(value)]
    rows = best_of_n.best_of_n_table(pool, BEST_OF_N) if pool else []
    if not rows:
        return
    frame = pd.DataFrame(
        {
            "N": [row.n for row in rows],
            "expected_best": [row.expected for row in rows],
            "standard_deviation": [row.standard_deviation for row in rows],
            "p10": [row.low for row in rows],
            "p90": [row.high for row in rows],
            "pool_size": [row.pool_size for row in rows],
        }
    )
    # The reference re-ran the random search of section 4; its figures belong on that space only.
    on_reference_space = space.name == "random"
    if on_reference_space:
        frame["reference"] = [REFERENCE_BEST_OF_N.get(row.n, np.nan) for row in rows]
    summary.tables["search/best_of_n.json"] = frame
    summary.texts["search/best_of_n.md"] = summaries.markdown_table(
        frame, {"expected_best": ".2%", "standard_deviation": ".2%", "p10": ".2%", "p90": ".2%", "reference": ".1%"}
    )
    summary.metrics.update({f"expected_best_at_{row.n}": row.expected for row in rows})
    reference = {n: value for n, value in REFERENCE_BEST_OF_N.items() if n <= len(pool)} if on_reference_space else None
    summary.figures["search/best_of_n.png"] = plots.best_of_n_figure(
        [row.n for row in rows],
        [row.expected for row in rows],
        [row.low for row in rows],
        [row.high for row in rows],
        len(pool),
        reference,
        title=f"Expected best of N trials drawn from this search ({space.name} space)",
    )


def _plain(value: Any) -> Any:
    """A NumPy scalar as a plain Python number (for JSON and tags)."""
    return value.item() if hasattr(value, "item") else value
