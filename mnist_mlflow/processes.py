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


def tracking_server(
    root: Path, port: int | None = None, workers: int = 2, admin_password: str | None = None, backend_store_uri: str | None = None
) -> ServerProcess:
    """A real `mlflow server` with a local artifact root, on 127.0.0.1.

    The backend store is sqlite in ``root`` unless ``backend_store_uri`` names another (say
    PostgreSQL). With ``admin_password``, it is MLflow's ``basic-auth`` app: every request
    must log in, the user ``admin`` has that password, and new users may only read.
    """
    import secrets

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", str(workers),
    ]
    env = python_env()
    if admin_password:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
            "admin_username = admin\n"
            f"admin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    return ServerProcess(command, port, root, "/health", env=env)


def postgres_bin_dir() -> Path:
    """The folder of PostgreSQL's server programs (initdb, postgres, pg_ctl)."""
    import glob
    import shutil

    # Debian and Ubuntu keep them out of PATH, in /usr/lib/postgresql/<version>/bin.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[4]))
    found = shutil.which("pg_ctl")
    if candidates:
        return Path(candidates[-1]).parent
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent
    raise RuntimeError("PostgreSQL's initdb and pg_ctl were not found; install the distribution's postgresql package")


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 in a temporary folder, with trust authentication.

    PostgreSQL refuses to run as root; as root, the server runs as the ``postgres`` user the
    distribution's package creates, in a folder that user owns.
    """

    def __init__(self, port: int | None = None, user: str = "search", database: str = "optuna", password: str | None = None):
        """With ``password``, every connection must log in with it (scram-sha-256 in pg_hba.conf);
        without, the server trusts every local connection."""
        import tempfile

        self.port = port or free_port()
        self.user = user
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="mnist-mlflow-postgres-"))
        self.data_dir = self.root / "data"
        self.bin_dir = postgres_bin_dir()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            import pwd
            import shutil

            owner = pwd.getpwnam("postgres")
            shutil.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.password = password
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        """libpq's variables for this server's password (none with trust authentication)."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def _run(self, *command: str) -> None:
        env = {**os.environ, **self.client_env()}
        result = subprocess.run([*self.run_as, *command], capture_output=True, text=True, timeout=120, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed:\n{result.stdout}\n{result.stderr}")

    def start(self, timeout_s: float = 60.0) -> "PostgresServer":
        auth = ["-A", "trust"]
        if self.password:
            password_file = self.root / "password"
            password_file.write_text(self.password)
            if self.run_as:
                import shutil

                shutil.chown(password_file, "postgres", "postgres")
            auth = ["-A", "scram-sha-256", f"--pwfile={password_file}"]
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, *auth, "-E", "UTF8", "--no-locale")
        if self.password:
            (self.root / "password").unlink()
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-w", "-t", str(int(timeout_s)),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200",
            "start",
        )
        self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database)
        return self

    def stop(self) -> None:
        import shutil

        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                capture_output=True, timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
