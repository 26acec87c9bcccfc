"""End to end against a real `mlflow server`: `mlflow run . -e dense`, bad input, reproducibility."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest
from conftest import PROJECT_DIR, RUN_AND_REPORT_IMPORTS, run_script
from mlflow.tracking import MlflowClient

from harness.servers import free_port, python_env

pytestmark = pytest.mark.e2e

EXPECTED_PARAMS = {
    "hidden_units": "50,50",
    "activation": "relu",
    "optimizer": "adam",
    "batch_size": "100",
    "epochs": "2",
    "dataset": "mnist",
    "seed": "0",
    "max_train_examples": "2000",
    "train_examples": "2000",
    "validation_examples": "6000",
    "test_examples": "10000",
    "trainable_parameters": "42310",
    # 2,000 examples in batches of 100: one compiled step walks through all 20 batches.
    "batches_per_step": "20",
    "jit_compile": "True",
    "compute_dtype": "float32",
    "max_shift": "0",
}


@pytest.fixture(scope="module")
def dense_launch(mlflow_server):
    """One `mlflow run . -e dense` with 2 epochs on 2,000 examples, shared by the checks below.

    It is started without --experiment-name, as users often do: MLflow's launcher then puts the
    run in the Default experiment (id 0) before any project code runs. Other tests of this
    session may put runs there too, so the run is found by the id in the link it prints.
    """
    result = run_script(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(PROJECT_DIR),
            "-e",
            "dense",
            "--env-manager",
            "local",
            "-P",
            "epochs=2",
            "-P",
            "max_train_examples=2000",
        ],
        env=python_env(mlflow_server.url),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # The run ends with a link that opens it in the UI's model-training view.
    link = re.search(
        rf"View this run in the MLflow UI: "
        rf"{re.escape(mlflow_server.url)}/#/experiments/(\d+)/runs/(\w+)\?workflowType=machine_learning\n",
        result.stdout,
    )
    assert link, result.stdout[-3000:]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(link.group(2))
    assert run.info.experiment_id == link.group(1)
    return client, run, result


@pytest.fixture(scope="module")
def dense_run(dense_launch):
    client, run, _ = dense_launch
    return client, run


def test_mlflow_run_without_an_experiment_name_says_where_the_run_went(dense_launch):
    """The launcher puts the run in Default before any project code runs: the entry point says so."""
    _, run, result = dense_launch
    assert (
        "note: mlflow run put this run in MLflow's Default experiment; add --experiment-name mnist-dense"
        in result.stdout
    )
    assert run.info.experiment_id == "0"


def test_run_is_finished_named_and_tagged(dense_run):
    _, run = dense_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "dense-50x50-relu-adam-lr0.001-bs100"
    assert run.data.tags["entry_point"] == "dense"
    assert run.data.tags["dataset"] == "mnist"
    assert run.data.tags["model_family"] == "dense"


def test_params_include_entry_point_keras_and_data_sizes(dense_run):
    _, run = dense_run
    params = run.data.params
    for name, value in EXPECTED_PARAMS.items():
        assert params.get(name) == value, name
    assert float(params["learning_rate"]) == 0.001
    assert float(params["validation_fraction"]) == 0.1
    # The optimizer's settings, recorded by MLflow's Keras callback (mlflow.tensorflow.MlflowCallback).
    assert params["opt_name"] == "adam"
    assert float(params["opt_learning_rate"]) == pytest.approx(0.001)


def test_per_epoch_histories_and_summary_metrics(dense_run):
    client, run = dense_run
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s", "epoch_cpu_time_s"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(point.step for point in history) == [0, 1], metric
    epoch_times = [point.value for point in client.get_metric_history(run.info.run_id, "epoch_time_s")]
    assert all(seconds > 0 for seconds in epoch_times)
    metrics = run.data.metrics
    for metric in ("test_loss", "test_accuracy", "train_time_s", "examples_per_s"):
        assert metric in metrics, metric
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert metrics["train_time_s"] >= sum(epoch_times) * 0.99
    assert metrics["examples_per_s"] == pytest.approx(2000 * 2 / metrics["train_time_s"], rel=1e-6)
    val_history = [
        p.value for p in sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda p: p.step)
    ]
    assert metrics["best_val_accuracy"] == pytest.approx(max(val_history))


def test_artifacts(dense_run, tmp_path):
    client, run = dense_run
    run_id = run.info.run_id
    local = client.download_artifacts(run_id, "evaluation", str(tmp_path))
    csv_lines = (tmp_path / "evaluation" / "confusion_matrix.csv").read_text().strip().splitlines()
    counts = np.array([[int(cell) for cell in line.split(",")[1:]] for line in csv_lines[1:]])
    assert counts.shape == (10, 10)
    assert counts.sum() == 10000
    # Rows are true labels: each row sums to that digit's count in the test split.
    assert counts.sum(axis=1)[1] == 1135
    assert np.trace(counts) / 10000 == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-4)
    report = json.loads((tmp_path / "evaluation" / "classification_report.json").read_text())
    assert set(str(digit) for digit in range(10)) <= set(report)
    assert {"precision", "recall", "f1-score", "support"} <= set(report["7"])
    png = (tmp_path / "evaluation" / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert local
    history_png = client.download_artifacts(run_id, "plots/history.png", str(tmp_path))
    assert open(history_png, "rb").read(4) == b"\x89PNG"


def test_dataset_inputs(dense_run):
    _, run = dense_run
    inputs = {
        next(tag.value for tag in item.tags if tag.key == "mlflow.data.context"): item
        for item in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation", "test"}
    assert inputs["training"].dataset.name == "mnist-training"
    assert json.loads(inputs["training"].dataset.profile)["features_shape"][0] == 2000
    assert json.loads(inputs["validation"].dataset.profile)["features_shape"][0] == 6000
    assert all(item.dataset.digest for item in inputs.values())
    assert inputs["training"].dataset.digest != inputs["test"].dataset.digest


def test_logged_model_predicts_on_raw_test_images(dense_run, small_splits, mlflow_server, monkeypatch):
    import mlflow

    _, run = dense_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    assert logged.name == "dense-50x50-relu-adam-lr0_001-bs100"
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    raw = small_splits.test_images[:64].astype(np.float32)
    probabilities = np.asarray(model.predict(raw.tolist()))
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    accuracy = np.mean(probabilities.argmax(axis=1) == small_splits.test_labels[:64])
    assert accuracy > 0.5
    # The logged example shows the contract: raw pixels, (n, 28, 28, 1).
    assert np.asarray(model.input_example).shape[1:] == (28, 28, 1)


def test_same_seed_gives_identical_tracked_histories(tracking_uri):
    from mnist_mlflow.config import DenseRunConfig
    from mnist_mlflow.tracked_run import run_dense

    config = DenseRunConfig.from_params({"epochs": "2", "max_train_examples": "1000", "seed": "3"})
    first = run_dense(config)
    second = run_dense(config)
    client = MlflowClient(tracking_uri)

    def history(run_id):
        points = sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda point: point.step)
        return [point.value for point in points]

    assert first.run_id != second.run_id
    assert len(history(first.run_id)) == 2
    assert history(first.run_id) == history(second.run_id)
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]


BAD_PARAMETERS = [
    ("hidden_units", "50,abc"),
    ("hidden_units", "0"),
    ("activation", "wiggle"),
    ("optimizer", "adagrad"),
    ("activation", "relu,tanh,relu"),
    ("validation_fraction", "1.5"),
    ("dataset", "cifar10"),
]


@pytest.mark.parametrize("name, value", BAD_PARAMETERS)
def test_bad_parameter_exits_with_one_clear_line_and_creates_no_run(name, value, mlflow_server):
    client = MlflowClient(mlflow_server.url)
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = run_script(
        [sys.executable, "entrypoints/dense.py", f"--{name}", value],
        env=python_env(mlflow_server.url),
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and value.split(",")[-1] in lines[0]
    assert "Traceback" not in result.stderr
    after = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert after == before


def test_bad_parameter_under_mlflow_run_ends_the_run_failed(mlflow_server):
    experiment_name = "e2e-dense-bad"
    result = run_script(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(PROJECT_DIR),
            "-e",
            "dense",
            "--env-manager",
            "local",
            "--experiment-name",
            experiment_name,
            "-P",
            "hidden_units=50,abc",
        ],
        env=python_env(mlflow_server.url),
    )
    assert result.returncode != 0
    assert "hidden_units='50,abc'" in result.stdout + result.stderr
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


@pytest.mark.parametrize("entry_point", ["dense", "cnn", "exercises", "weight_decay", "search"])
def test_unreachable_tracking_server_is_one_line_before_tensorflow_is_imported(entry_point, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    script = str(PROJECT_DIR / "entrypoints" / f"{entry_point}.py")
    start = time.monotonic()
    result = run_script(
        [sys.executable, "-c", RUN_AND_REPORT_IMPORTS, script, "--epochs", "1"],
        env=python_env(uri),
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) cannot be reached (ConnectionError); "
        "start it or point the variable at a running server"
    ]
    assert "tensorflow imported: False" in result.stdout
    assert elapsed < 30
