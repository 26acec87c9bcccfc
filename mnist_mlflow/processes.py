"""Starting and stopping local server processes (a tracking server, later a model server).

Used by the tests and the benchmarks, which run real servers on loopback only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """This environment with the running interpreter's bin/ first on PATH.

    `mlflow run --env-manager local` runs the MLproject command's `python`, and
    `mlflow models serve` starts `uvicorn`, both from PATH.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


class ServerProcess:
    """A server started as a child process and considered up once ``health_path`` answers 200."""

    def __init__(self, command: list[str], port: int, root: Path, health_path: str, env: dict[str, str] | None = None):
        self.command = command
        self.port = port
        self.root = Path(root)
        self.url = f"http://127.0.0.1:{port}"
        self.health_path = health_path
        self.env = env or python_env()
        self.log_path = self.root / f"server-{port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> "ServerProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[:4]} exited early:\n{self.log_path.read_text()[-5000:]}")
            try:
                if requests.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.command[:4]} did not answer within {timeout_s} s:\n{self.log_path.read_text()[-5000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def tracking_server(root: Path, port: int | None = None, workers: int = 2) -> ServerProcess:
    """A real `mlflow server` with a sqlite backend and a local artifact root, on 127.0.0.1."""
    root = Path(root)
    port = port or free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", str(workers),
    ]
    return ServerProcess(command, port, root, "/health")
