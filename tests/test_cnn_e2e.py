"""End to end against real processes: `mlflow run . -e cnn` with registration, `promote`, and a
real `mlflow models serve` of the champion answering good and bad requests."""

from __future__ import annotations

import json
import re
import sys
import uuid

import mlflow
import numpy as np
import pytest
import requests
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import ServerProcess, free_port, python_env

pytestmark = pytest.mark.e2e


MAX_BATCH = 300
# The champion of the fixture (one epoch, 3,000 examples) on the first 200 test images.
CHAMPION_MIN_ACCURACY = 0.8


@pytest.fixture(scope="module")
def registered_cnn(mlflow_server):
    """One `mlflow run . -e cnn` (1 epoch, 3,000 examples) registered under a fresh name, then promoted."""
    model_name = f"cnn-e2e-{uuid.uuid4().hex[:8]}"
    experiment_name = f"e2e-cnn-{model_name}"
    env = python_env(mlflow_server.url)
    result = run_script(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(PROJECT_DIR),
            "-e",
            "cnn",
            "--env-manager",
            "local",
            "--experiment-name",
            experiment_name,
            "-P",
            "epochs=1",
            "-P",
            "max_train_examples=3000",
            "-P",
            f"register_as={model_name}",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    promote = run_script([sys.executable, "entrypoints/promote.py", "--model_name", model_name], env=env, timeout=120)
    assert promote.returncode == 0, promote.stderr
    client = MlflowClient(mlflow_server.url)
    run = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])[0]
    return client, run, model_name, promote.stdout


@pytest.fixture(scope="module")
def champion_server(registered_cnn, mlflow_server, tmp_path_factory):
    """A real `mlflow models serve` process serving models:/<name>@champion on a free loopback port."""
    _, _, model_name, _ = registered_cnn
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{model_name}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # A batch limit set at serve time, so that the oversized-batch check stays small.
    env = python_env(mlflow_server.url, MNIST_MLFLOW_MAX_BATCH=str(MAX_BATCH))
    with ServerProcess(command, port, tmp_path_factory.mktemp("serve"), "/ping", env=env) as server:
        yield server


def test_cnn_run_logs_what_cnn_users_look_at(registered_cnn, tmp_path):
    client, run, model_name, _ = registered_cnn
    assert run.info.status == "FINISHED"
    assert run.data.tags["entry_point"] == "cnn"
    assert run.data.tags["model_family"] == "cnn"
    assert run.data.params["trainable_parameters"] == "65642"
    assert run.data.params["filters"] == "32,32"
    assert run.data.params["register_as"] == model_name
    # The defaults: shifted images, and bfloat16 exactly where this CPU has bfloat16 matrix units.
    from mnist_mlflow.models import cpu_multiplies_bfloat16

    assert run.data.params["max_shift"] == "2" and run.data.params["precision"] == "auto"
    bfloat16 = cpu_multiplies_bfloat16()
    assert run.data.params["compute_dtype"] == ("bfloat16" if bfloat16 else "float32")
    assert run.data.params["jit_compile"] == ("False" if bfloat16 else "True")
    assert ("-bf16-" in run.info.run_name) == bfloat16 and run.info.run_name.endswith("-bs32-shift2")
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/misclassified.png",
        "evaluation/predictions.png",
        "evaluation/confusion_matrix.png",
        "evaluation/confusion_matrix.csv",
        "evaluation/classification_report.json",
    } <= artifacts
    summary = client.download_artifacts(run.info.run_id, "model_summary.txt", str(tmp_path))
    text = open(summary).read()
    # Per-layer output shapes: the second pooling leaves 5x5x32.
    assert "(None, 5, 5, 32)" in text and "65,642" in text
    for metric in ("epoch_time_s", "val_accuracy"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 1


def test_registered_version_carries_run_and_scores(registered_cnn):
    client, run, model_name, promote_output = registered_cnn
    [version] = client.search_model_versions(f"name='{model_name}'")
    assert version.tags["run_id"] == run.info.run_id
    assert float(version.tags["val_accuracy"]) == pytest.approx(run.data.metrics["best_val_accuracy"], abs=1e-6)
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    assert client.get_model_version_by_alias(model_name, "champion").version == version.version
    assert "champion" in promote_output and f"version {version.version}" in promote_output


def _post(server, payload=None, data=None):
    return requests.post(
        server.url + "/invocations",
        json=payload,
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def test_served_champion_classifies_real_test_images(champion_server, small_splits):
    images = small_splits.test_images[:200].astype(np.float32)
    response = _post(champion_server, {"inputs": images.tolist()})
    assert response.status_code == 200, response.text[:500]
    probabilities = np.asarray(response.json()["predictions"])
    assert probabilities.shape == (200, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    accuracy = np.mean(probabilities.argmax(axis=1) == small_splits.test_labels[:200])
    # Chance is 10%. One epoch on 3,000 examples reaches about 88-93% here, by the seed's order.
    assert accuracy >= CHAMPION_MIN_ACCURACY


def test_the_compact_request_form_gives_the_same_answers(champion_server, small_splits):
    """Flat 784-pixel rows inside `inputs`: one list per image instead of 28 x 28 one-pixel lists."""
    images = small_splits.test_images[:50].astype(np.float32)
    nested = _post(champion_server, {"inputs": images.tolist()})
    compact = _post(champion_server, {"inputs": images.reshape(50, 784).tolist()})
    assert compact.status_code == 200, compact.text[:300]
    np.testing.assert_allclose(
        np.asarray(compact.json()["predictions"]), np.asarray(nested.json()["predictions"]), atol=1e-6
    )
    # The checks apply to this form too.
    bad = images.reshape(50, 784).tolist()
    bad[3][100] = 999.0
    refused = _post(champion_server, {"inputs": bad})
    assert refused.status_code == 400 and refused.json()["message"].startswith("image 3 holds a pixel outside 0..255")
    # MLflow's dataframe forms are refused with a message that names the key to use.
    dataframe = _post(
        champion_server,
        {"dataframe_split": {"columns": ["image"], "data": [[row] for row in images[:2].reshape(2, 784).tolist()]}},
    )
    assert dataframe.status_code == 400 and "'inputs' key" in dataframe.json()["message"]


def test_the_champion_keeps_mlflow_s_pyfunc_contract(registered_cnn, mlflow_server, small_splits, tmp_path):
    """What users do with a registered model outside `mlflow models serve`: load it in a notebook
    and predict on a NumPy array or a DataFrame, and `mlflow models predict` with the README's request."""
    import mlflow
    import pandas as pd

    _, _, model_name, _ = registered_cnn
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        champion = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
        images = small_splits.test_images[:200]
        probabilities = np.asarray(champion.predict(images))
        assert probabilities.shape == (200, 10)
        assert np.mean(probabilities.argmax(axis=1) == small_splits.test_labels[:200]) >= CHAMPION_MIN_ACCURACY
        flat = pd.DataFrame(images.reshape(200, 784))
        np.testing.assert_allclose(np.asarray(champion.predict(flat)), probabilities, atol=1e-5)
    finally:
        mlflow.set_tracking_uri(None)
    # The README's request: one blank image, as JSON.
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"inputs": np.zeros((1, 28, 28, 1)).tolist()}))
    output = tmp_path / "predictions.json"
    result = run_script(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            f"models:/{model_name}@champion",
            "-i",
            str(request),
            "-t",
            "json",
            "-o",
            str(output),
            "--env-manager",
            "local",
        ],
        env=python_env(mlflow_server.url),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.asarray(json.loads(output.read_text())["predictions"])
    assert predictions.shape == (1, 10)
    np.testing.assert_allclose(predictions.sum(), 1.0, rtol=1e-4)


def test_the_server_froze_the_garbage_collector_after_loading(champion_server):
    """What makes batches of nested images fast under `mlflow models serve` (served_model.py)."""
    assert re.search(r"mnist-mlflow: froze \d+ loaded objects", champion_server.log_path.read_text())


@pytest.mark.parametrize(
    "payload, raw",
    [
        ({"inputs": np.zeros((2, 28, 28, 3)).tolist()}, None),  # wrong shape
        ({"inputs": [[["a"] * 28] * 28]}, None),  # strings
        ({"inputs": []}, None),  # empty list
        ({"instances_typo": np.zeros((1, 28, 28, 1)).tolist()}, None),  # no "inputs"
        (None, b"this is not json"),
    ],
    ids=["wrong-shape", "strings", "empty", "missing-inputs", "not-json"],
)
def test_bad_payloads_get_4xx_and_the_server_keeps_serving(champion_server, small_splits, payload, raw):
    response = _post(champion_server, payload=payload, data=raw)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.text.strip()
    assert requests.get(champion_server.url + "/ping", timeout=10).status_code == 200
    good = _post(champion_server, {"inputs": small_splits.test_images[:20].astype(np.float32).tolist()})
    assert good.status_code == 200
    assert np.mean(np.asarray(good.json()["predictions"]).argmax(axis=1) == small_splits.test_labels[:20]) >= 0.8


def _image_with(value) -> list:
    image = np.zeros((28, 28, 1)).tolist()
    image[14][14][0] = value
    return [image]


@pytest.mark.parametrize(
    "inputs, message",
    [
        (_image_with(float("nan")), "image 0 holds a value that is not a finite number"),
        (_image_with(float("inf")), "image 0 holds a value that is not a finite number"),
        (_image_with(1e30), "image 0 holds a pixel outside 0..255"),
        (_image_with(-3.0), "image 0 holds a pixel outside 0..255"),
        (_image_with(1e308), "image 0 holds a pixel out of range"),
        ([[["255"]] * 28] * 28, "inputs must be numbers"),
        ([[[" 3 "]] * 28] * 28, "inputs must be numbers"),
        ([[["1e2"]] * 28] * 28, "inputs must be numbers"),
        ([[[True]] * 28] * 28, "inputs must be numbers"),
        ([[True] + [0.5] * 783], "inputs must be numbers: raw pixel intensities 0-255, not true or false"),
        (_image_with(False), "inputs must be numbers: raw pixel intensities 0-255, not true or false"),
        (_image_with(10**400), "image 0 holds a pixel out of range"),
        ({"a": np.zeros((3, 28, 28, 1)).tolist()}, "inputs must be a list of images, not a mapping"),
        (
            np.zeros((MAX_BATCH + 1, 28, 28, 1)).tolist(),
            f"a request may hold at most {MAX_BATCH} images; got {MAX_BATCH + 1}",
        ),
    ],
    ids=[
        "nan",
        "infinity",
        "1e30",
        "negative",
        "1e308",
        "numeric-string",
        "padded-string",
        "exponent-string",
        "boolean",
        "booleans-among-numbers",
        "a-boolean-among-zeros",
        "ten-to-the-400",
        "mapping",
        "oversized-batch",
    ],
)
def test_what_is_not_an_image_gets_400_with_a_message_that_does_not_echo_it(
    champion_server, small_splits, inputs, message
):
    # Python's json writes NaN and Infinity as the bare words that JavaScript's JSON.stringify
    # would not, but that many clients send; MLflow's parser reads them.
    response = _post(champion_server, data=json.dumps({"inputs": inputs}).encode())
    assert response.status_code == 400, (response.status_code, response.text[:300])
    answer = response.json()
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].startswith(message), answer["message"][:300]
    # The message names the problem; it does not repeat the request's pixels.
    assert len(answer["message"]) < 200 and "[[" not in answer["message"]
    good = _post(champion_server, {"inputs": small_splits.test_images[:5].astype(np.float32).tolist()})
    assert good.status_code == 200


def test_null_pixels_get_4xx(champion_server):
    response = _post(champion_server, {"inputs": _image_with(None)})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


def test_predict_client_reads_png_files_and_reports_unreadable_ones(champion_server, small_splits, tmp_path):
    from PIL import Image

    # Use test images the served model gets right with confidence, so the check is about the client.
    response = _post(champion_server, {"inputs": small_splits.test_images[:50].astype(np.float32).tolist()})
    probabilities = np.asarray(response.json()["predictions"])
    confident = [
        index
        for index in range(50)
        if probabilities[index].argmax() == small_splits.test_labels[index] and probabilities[index].max() > 0.9
    ][:6]
    assert len(confident) >= 3
    paths = []
    for index in confident:
        path = tmp_path / f"test_{index}.png"
        Image.fromarray(small_splits.test_images[index, :, :, 0]).save(path)
        paths.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = run_script(
        [sys.executable, "-m", "mnist_mlflow.predict", "--url", champion_server.url, str(broken), *map(str, paths)],
        env=python_env(),
        timeout=120,
    )
    assert result.returncode == 1
    assert "broken.png" in result.stderr
    printed = dict(re.findall(r"(test_\d+)\.png: (\d) \(probability", result.stdout))
    assert printed == {f"test_{index}": str(small_splits.test_labels[index]) for index in confident}


def test_promote_breaks_a_tie_for_the_newer_version(registered_cnn, tracking_uri):
    from mnist_mlflow import tracking
    from mnist_mlflow.tracked_run import validation_split

    client, run, model_name, _ = registered_cnn
    source = client.get_model_version(model_name, "1").source
    assert source.startswith("models:/m-")
    tied_name = f"promote-{uuid.uuid4().hex[:8]}"
    first = mlflow.register_model(source, tied_name).version
    second = mlflow.register_model(source, tied_name).version
    promotion = tracking.promote_best_version(tied_name, validation_split)
    assert promotion.version == str(second) != str(first)
    assert [candidate.source for candidate in promotion.candidates] == ["logged model", "logged model"]
    assert promotion.value == pytest.approx(run.data.metrics["best_val_accuracy"])
    assert client.get_model_version_by_alias(tied_name, "champion").version == str(second)


def test_promote_refuses_unknown_models_and_test_metrics(mlflow_server):
    env = python_env(mlflow_server.url)
    missing = run_script(
        [sys.executable, "entrypoints/promote.py", "--model_name", "no-such-model"], env=env, timeout=60
    )
    assert missing.returncode == 2
    assert "no-such-model" in missing.stderr and "Traceback" not in missing.stderr
    leaky = run_script(
        [sys.executable, "entrypoints/promote.py", "--model_name", "x", "--metric", "test_accuracy"],
        env=env,
        timeout=60,
    )
    assert leaky.returncode == 2 and "test_accuracy" in leaky.stderr
