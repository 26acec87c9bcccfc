"""MLflow 3's model-centric view against a real `mlflow server`: a tiny search's logged models, one
series per quantity, `promote` ranking by logged models behind its evaluation gate, and the
search's progress lines beside the parent's progress metric."""

from __future__ import annotations

import re
import sys
import uuid

import mlflow
import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env

pytestmark = pytest.mark.e2e

SEARCH = str(PROJECT_DIR / "entrypoints" / "search.py")
PROMOTE = str(PROJECT_DIR / "entrypoints" / "promote.py")
THREE_POINT_GRID = "name: models-view\nparameters:\n  units: [8, 32, 64]\n"
PROGRESS_LINE = re.compile(r"^\[(\d+)/(\d+)\] best val_accuracy (\d\.\d{4}) \(trial (\d+)\) · .+ elapsed · (.+)$")


@pytest.fixture(scope="module")
def tiny_search(mlflow_server, tmp_path_factory):
    """One `search` worker of a three-point grid, two epochs on 500 examples."""
    folder = tmp_path_factory.mktemp("models_view")
    (folder / "space.yaml").write_text(THREE_POINT_GRID)
    experiment = f"models-view-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, SEARCH, "--space", "space.yaml", "--epochs", "2", "--max_train_examples", "500"]
    command += ["--storage", f"sqlite:///{folder / 'optuna.db'}", "--register_as", ""]
    result = run_script(command, python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment), cwd=folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parent = next(run for run in runs if run.data.tags.get("study_role") == "parent")
    children = [run for run in runs if run.data.tags.get("study_role") == "child"]
    mlflow.set_tracking_uri(mlflow_server.url)
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    return client, experiment_id, parent, children, models, result.stdout


def _linked(model, key):
    return [(point.value, point.dataset_name) for point in model.metrics if point.key == key]


def test_each_trial_s_model_has_its_own_name_and_figures_on_their_data_sets(tiny_search):
    client, _, _, children, models, _ = tiny_search
    assert len(children) == 3 and len(models) == 3
    by_run = {model.source_run_id: model for model in models}
    assert len({model.name for model in models}) == 3
    for child in children:
        model = by_run[child.info.run_id]
        assert model.name == child.info.run_name.replace(".", "_") and model.name.startswith("trial-")
        best_val_accuracy = child.data.metrics["best_val_accuracy"]
        assert _linked(model, "val_accuracy") == [(pytest.approx(best_val_accuracy), "mnist-validation")]
        assert _linked(model, "test_accuracy") == [(pytest.approx(child.data.metrics["test_accuracy"]), "mnist-test")]
        assert {name for value, name in _linked(model, "train_time_s")} == {"mnist-training"}
        # The model is addressed by its id, and loads.
        assert mlflow.pyfunc.load_model(f"models:/{model.model_id}").metadata.model_id == model.model_id


def test_each_run_has_one_series_per_quantity(tiny_search):
    client, _, _, children, _, _ = tiny_search
    for child in children:
        keys = set(child.data.metrics)
        assert not {key for key in keys if key.startswith("validation_")}, keys
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s"):
            steps = [point.step for point in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [0, 1], (key, steps)
        for key in ("best_val_accuracy", "test_accuracy"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 1, key


def test_the_progress_lines_count_to_n_and_the_parent_s_metric_matches(tiny_search):
    client, _, parent, children, _, stdout = tiny_search
    lines = [PROGRESS_LINE.match(line) for line in stdout.splitlines() if line.startswith("[")]
    lines = [match for match in lines if match]
    assert [(int(match[1]), int(match[2])) for match in lines] == [(1, 3), (2, 3), (3, 3)], stdout[-3000:]
    assert lines[-1][5] == "done"
    best = max(children, key=lambda run: run.data.metrics["best_val_accuracy"])
    assert float(lines[-1][3]) == pytest.approx(best.data.metrics["best_val_accuracy"], abs=1e-4)
    assert lines[-1][4] == best.data.tags["optuna_trial_number"]
    history = client.get_metric_history(parent.info.run_id, "children_done")
    assert sorted((point.step, point.value) for point in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(parent.info.run_id).data.metrics["children_total"] == 3


def test_promote_ranks_by_the_logged_models_and_its_gate_refuses_a_weaker_model(tiny_search, mlflow_server):
    client, _, _, children, models, _ = tiny_search
    name = f"models-view-{uuid.uuid4().hex[:6]}"
    for model in models:
        mlflow.register_model(f"models:/{model.model_id}", name)
    env = python_env(mlflow_server.url, MLFLOW_EXPERIMENT_NAME="models-view-maintenance")
    promoted = run_script([sys.executable, PROMOTE, "--model_name", name], env, timeout=300)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    champion = client.get_model_version_by_alias(name, "champion")
    best = max(children, key=lambda run: (run.data.metrics["best_val_accuracy"], run.info.start_time))
    by_model = {model.model_id: model for model in models}
    assert by_model[champion.source.removeprefix("models:/")].source_run_id == best.info.run_id
    evaluated = re.search(r"accuracy (\d\.\d{4}) \(at least 0 asked\)", promoted.stdout)
    assert float(evaluated[1]) == pytest.approx(best.data.metrics["best_val_accuracy"], abs=1e-3), promoted.stdout

    # The evaluation is a run of its own, its figures linked to the champion's logged model.
    gated = by_model[champion.source.removeprefix("models:/")]
    linked = {point.key for point in client.get_logged_model(gated.model_id).metrics}
    assert "accuracy_score" in linked

    refused = run_script(
        [sys.executable, PROMOTE, "--model_name", name, "--min_val_accuracy", "0.999"], env, timeout=300
    )
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error")]
    assert lines == [refused.stderr.strip().splitlines()[-1]] and len(lines) == 1
    assert f"below min_val_accuracy=0.999; 'champion' stays at version {champion.version}" in lines[0]
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
