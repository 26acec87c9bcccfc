"""Shared fixtures: offline data, a real MLflow tracking server on loopback, small slices.

Tests train on small slices for one or two epochs so the whole suite stays fast; full-size
runs belong in benchmarks/ and the documented results.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

PROJECT_DIR = Path(__file__).resolve().parent.parent
SHARED_DATA_DIR = PROJECT_DIR.parent / "shared" / "data"

# Offline data: use the shared copies of the canonical files when they are beside the project.
if "MNIST_MLFLOW_DATA_DIR" not in os.environ and SHARED_DATA_DIR.is_dir():
    os.environ["MNIST_MLFLOW_DATA_DIR"] = str(SHARED_DATA_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMALL_TRAIN_EXAMPLES = 2000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for project scripts: this interpreter's bin/ first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


class MlflowServer:
    """A real `mlflow server` process with a sqlite backend and a local artifact root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> "MlflowServer":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--workers", "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_path.read_text()}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()


@pytest.fixture()
def tracking_uri(mlflow_server, monkeypatch):
    """Points this process's MLflow client at the real server for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server.uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def small_splits():
    """MNIST with a small training slice; validation and test keep their full size."""
    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits

    return load_splits(DataConfig(max_train_examples=SMALL_TRAIN_EXAMPLES))


def run_script(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = PROJECT_DIR):
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
