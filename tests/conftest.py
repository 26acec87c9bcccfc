"""Shared fixtures: offline data, a real MLflow tracking server on loopback, small slices.

Tests train on small slices for one or two epochs so the whole suite stays fast; full-size
runs belong in benchmarks/ and the documented results.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.servers import tracking_server

PROJECT_DIR = Path(__file__).resolve().parent.parent
SHARED_DATA_DIR = (PROJECT_DIR / "../shared/data").resolve()

# Offline data: use the shared copies of the canonical files when they are beside the project.
if "MNIST_MLFLOW_DATA_DIR" not in os.environ and SHARED_DATA_DIR.is_dir():
    os.environ["MNIST_MLFLOW_DATA_DIR"] = str(SHARED_DATA_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A search takes a worker for dead after 20 s without a heartbeat (one every 5 s). The tests
# kill workers on purpose and would wait that out each time: here a heartbeat every 2 s, and
# 8 s of silence is death (still four missed heartbeats, for a loaded machine).
os.environ.setdefault("MNIST_MLFLOW_HEARTBEAT_INTERVAL_S", "2")
os.environ.setdefault("MNIST_MLFLOW_HEARTBEAT_GRACE_S", "8")
# What runs could not send when a test killed their tracking server stays out of ~/.cache.
os.environ.setdefault("MNIST_MLFLOW_SPOOL_DIR", tempfile.mkdtemp(prefix="mnist-mlflow-test-spool-"))

SMALL_TRAIN_EXAMPLES = 2000

# The longest files first. The suite runs on xdist workers that take one file at a time, in
# collection order; a long file taken last keeps one worker busy while the others sit idle.
# (Longest first is the classic rule for sharing jobs between machines.) The order comes from
# the sum of each file's times in the junit report of a default run on four workers, then the
# files whose tests are all slow, longest first; the order within each file is kept.
LONGEST_FILES_FIRST = (
    "test_resume_e2e.py",
    "test_mid_run_failures_e2e.py",
    "test_run_ownership_e2e.py",
    "test_reliability_e2e.py",
    "test_studies_e2e.py",
    "test_security_e2e.py",
    "test_search_workers_e2e.py",
    "test_data.py",
    "test_cnn_e2e.py",
    "test_search_e2e.py",
    "test_models_view_e2e.py",
    "test_dense_e2e.py",
    "test_fresh_machine_e2e.py",
    "test_training.py",
    # Slow only.
    "test_search_objectives_e2e.py",
    "test_environments_e2e.py",  # builds uv environments
    "test_shared_server_e2e.py",
    "test_dashboard_e2e.py",
    "test_ui_e2e.py",  # a browser
)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the slow tests too (CI does; see docs/contributing.md)")


def _slow_tests_asked_for(config) -> bool:
    """Slow tests run with --slow, with any -m expression (which then decides alone), or when a
    test is named by its node id (``tests/test_x.py::test_y``)."""
    named = any("::" in str(argument) for argument in config.args)
    return config.getoption("--slow") or bool(config.getoption("markexpr")) or named


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if _slow_tests_asked_for(config):
        return
    # The default run leaves the slow tests out, and says so in its summary ("deselected").
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    if not _slow_tests_asked_for(config):
        return "slow tests left out: `-m slow` runs only them, `--slow` everything (CI runs both parts)"
    return None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port for the whole session."""
    with tracking_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server


@pytest.fixture()
def tracking_uri(mlflow_server, monkeypatch):
    """Points this process's MLflow client at the real server for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    mlflow.set_tracking_uri(None)
    if "mlflow.tensorflow" in sys.modules:
        # A run trained in this process turned on autolog, which patches Keras's fit for the whole
        # process: a later test's fit would otherwise start an MLflow run in ./mlflow.db.
        mlflow.tensorflow.autolog(disable=True)


@pytest.fixture(scope="session")
def small_splits():
    """MNIST with a small training slice; validation and test keep their full size."""
    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits

    return load_splits(DataConfig(max_train_examples=SMALL_TRAIN_EXAMPLES))


def run_script(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = PROJECT_DIR):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Runs an entry point as `python <script>` would, then says whether TensorFlow was imported. (An
# entry point that imported TensorFlow ends with os._exit, and then prints nothing here.)
RUN_AND_REPORT_IMPORTS = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on a free loopback port, in a temporary folder, for the session."""
    from harness.servers import PostgresServer

    with PostgresServer() as server:
        yield server
