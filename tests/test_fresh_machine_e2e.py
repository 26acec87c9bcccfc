"""The first run on a fresh machine: an empty tfds data directory, and several processes that
start at the same moment (search workers on a new node, containers sharing a data volume)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import PROJECT_DIR
from mlflow.tracking import MlflowClient

from harness.servers import python_env
from mnist_mlflow import data

pytestmark = pytest.mark.e2e


def test_three_entry_points_started_together_on_an_empty_tfds_folder_all_finish(mlflow_server, tmp_path):
    """tfds renames its finished folder into place without a lock: processes that prepared MNIST
    at the same time used to fail (FileExistsError). They now take turns, and one prepares it."""
    if not os.environ.get(data.DATA_DIR_ENV):
        pytest.skip(f"needs {data.DATA_DIR_ENV} to prepare MNIST offline")
    tfds_dir = tmp_path / "tensorflow_datasets"
    env = python_env(mlflow_server.url, TFDS_DATA_DIR=str(tfds_dir))
    commands = {
        "dense": ["entrypoints/dense.py", "--epochs", "1", "--max_train_examples", "300", "--hidden_units", "16"],
        "cnn": ["entrypoints/cnn.py", "--epochs", "1", "--max_train_examples", "300"],
        "dense seed 1": [
            "entrypoints/dense.py",
            "--epochs",
            "1",
            "--max_train_examples",
            "300",
            "--hidden_units",
            "16",
            "--seed",
            "1",
        ],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, *command],
            cwd=PROJECT_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in commands.items()
    }
    outputs = {name: process.communicate(timeout=600) for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}: {outputs[name][1][-3000:]}"
    printed = {name: output for name, (output, _) in outputs.items()}
    # One process prepared MNIST; the others found it prepared and cached when their turn came.
    assert sum("Preparing mnist" in output for output in printed.values()) == 1, printed
    assert len(list(tfds_dir.glob(f"mnist/*/{data.ARRAY_CACHE_FOLDER}/{data.ARRAY_CACHE_MANIFEST}"))) == 1
    client = MlflowClient(mlflow_server.url)
    for name, output in printed.items():
        run_id = re.search(r"/runs/(\w+)\?workflowType=machine_learning", output).group(1)
        assert client.get_run(run_id).info.status == "FINISHED", name
