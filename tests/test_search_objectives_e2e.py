"""The halving pruners and the accuracy-against-cost (Pareto) search, against a real `mlflow server`.

Searches run in this process on a few hundred examples; what is checked is where the pruners
stop trials, and that the Pareto front, its figure and the registered model follow the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_search_e2e import children, in_process_experiment, load_study, space_file  # noqa: F401

from mnist_mlflow.studies.search_config import SearchConfig

pytestmark = pytest.mark.e2e

# Learning rates of 1e-5 barely learn in a few epochs: a pruner has something to stop.
PRUNABLE_SPACE = (
    "sampler: random\nparameters:\n  units: [8, 32, 128]\n  learning_rate: [0.00001, 0.001, 0.01]\n"
    "  dropout: [0.0, 0.3]\n"
)


@pytest.mark.usefixtures("in_process_experiment")
# Eight trials each, in this process. The default run prunes with the median pruner
# (test_search_e2e); these two pruners' rungs are checked in the slow run.
@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_halving_pruners_stop_trials_only_at_their_rungs_and_never_at_the_last_epoch(tmp_path, tracking_uri, pruner):
    from mnist_mlflow.studies.search import run_search

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    epochs = 4
    run_search(
        SearchConfig(
            space=space_file(tmp_path, PRUNABLE_SPACE),
            storage=storage,
            study_name=f"halving-{pruner}",
            n_trials=8,
            pruner=pruner,
            epochs=epochs,
            max_train_examples=400,
            register_as="",
        )
    )
    study = load_study(storage, f"halving-{pruner}")
    pruned = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.PRUNED]
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert pruned, [(trial.number, trial.state, trial.intermediate_values) for trial in study.trials]
    # Rungs are judged at Optuna's steps 1 and 3 (after epochs 2 and 4), but epoch 4 is the last.
    assert {len(trial.intermediate_values) for trial in pruned} == {2}
    assert all(len(trial.intermediate_values) == epochs for trial in complete)
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    runs = {int(run.data.tags["optuna_trial_number"]): run for run in children(client, parent.info.run_id)}
    for trial in pruned:
        assert runs[trial.number].data.tags["optuna_trial_state"] == "PRUNED"
        assert runs[trial.number].data.tags["pruned_after_epoch"] == str(len(trial.intermediate_values))
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    assert parent.data.metrics["epochs_saved_by_pruning"] == sum(
        epochs - len(trial.intermediate_values) for trial in pruned
    )
    assert parent.data.params["pruner"] == pruner


def _dominated(point, others) -> bool:
    return any(
        other["val_accuracy"] >= point["val_accuracy"]
        and other["parameters"] <= point["parameters"]
        and (other["val_accuracy"] > point["val_accuracy"] or other["parameters"] < point["parameters"])
        for other in others
    )


@pytest.mark.slow
@pytest.mark.usefixtures("in_process_experiment")
def test_accuracy_and_parameters_search_keeps_the_pareto_front_and_registers_the_rule_s_choice(tmp_path, tracking_uri):
    """Trainable parameters are an exact cost, so the front and the choice can be checked exactly."""
    from mnist_mlflow.studies.search import run_search

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    within = 0.03
    result = run_search(
        SearchConfig(
            space=space_file(
                tmp_path, "sampler: random\nparameters:\n  units: [4, 16, 64]\n  learning_rate: [0.001, 0.01]\n"
            ),
            storage=storage,
            study_name="pareto-parameters",
            n_trials=6,
            epochs=2,
            max_train_examples=600,
            objective="accuracy_and_time",
            cost="parameters",
            pick_within=within,
            register_as="pareto-parameters",
        )
    )
    study = load_study(storage, "pareto-parameters")
    assert [direction.name for direction in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_accuracy", "parameters"]
    client = MlflowClient(tracking_uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    runs = [run for run in children(client, parent_id) if run.info.status == "FINISHED"]
    points = {}
    for run in runs:
        points[run.info.run_id] = {
            "val_accuracy": run.data.metrics["best_val_accuracy"],
            "parameters": int(run.data.params["trainable_parameters"]),
        }
    # Each trial's values in Optuna are its run's accuracy and its trainable parameters.
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE and "same_as_trial" not in trial.user_attrs:
            point = points[trial.user_attrs["mlflow_run_id"]]
            assert trial.values == pytest.approx([point["val_accuracy"], point["parameters"]])
    front_ids = {
        run_id
        for run_id, point in points.items()
        if not _dominated(point, [p for i, p in points.items() if i != run_id])
    }
    logged = json.loads(
        Path(client.download_artifacts(parent_id, "search/pareto_front.json", str(tmp_path))).read_text()
    )
    logged_rows = (
        [dict(zip(logged["columns"], row, strict=True)) for row in logged["data"]] if "columns" in logged else logged
    )
    assert {row["run_id"] for row in logged_rows} == front_ids
    best = max(points[run_id]["val_accuracy"] for run_id in front_ids)
    near = [run_id for run_id in front_ids if points[run_id]["val_accuracy"] >= best - within - 1e-12]
    chosen = min(near, key=lambda run_id: (points[run_id]["parameters"], -points[run_id]["val_accuracy"]))
    assert parent.data.tags["chosen_run_id"] == chosen
    assert [row["run_id"] for row in logged_rows if row["chosen"]] == [chosen]
    assert parent.data.metrics["chosen_cost"] == points[chosen]["parameters"]
    assert parent.data.metrics["pareto_front_size"] == len(front_ids)
    assert (
        "0.03" in parent.data.tags["selection_rule"]
        and "fewest trainable parameters" in parent.data.tags["selection_rule"]
    )
    artifacts = {item.path for item in client.list_artifacts(parent_id, "search")}
    assert {"search/pareto_front.png", "search/pareto_front.md", "search/parameter_importance.png"} <= artifacts
    # The registered model is the chosen trial's, and says so.
    version = client.get_model_version("pareto-parameters", result.registered_version)
    assert version.run_id == chosen
    assert result.summary.winner_run_id == chosen


def test_a_pareto_search_with_a_pruner_is_refused_in_one_line():
    from mnist_mlflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"pruner='median' cannot prune objective=accuracy_and_time"):
        SearchConfig(objective="accuracy_and_time", pruner="median")
