"""Opening an Optuna study storage (sqlite, PostgreSQL, MySQL) the way many workers need it.

This module imports Optuna and SQLAlchemy but neither TensorFlow nor MLflow, so a worker
finds out within seconds whether its storage can be opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from mnist_mlflow.config import RunFailedError, UserInputError
from mnist_mlflow.redaction import redact_url
from mnist_mlflow.retry import jittered, retry


class StorageUnavailableError(UserInputError):
    """The Optuna storage cannot be opened."""


class StudyStorageLost(RunFailedError):
    """The study's storage stopped answering while this worker was using it."""


def lost_storage(error: BaseException | None, url: str) -> StudyStorageLost | None:
    """The one-line failure for an error that says the storage cannot be reached, or None.

    Optuna wraps a lost connection in ``StorageInternalError`` ("... invalid data in the
    commit, e.g. exceeding max length"), which misleads; the chain holds SQLAlchemy's
    ``OperationalError`` (a refused or broken connection), which is what it means.
    """
    import sqlalchemy.exc

    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, StudyStorageLost):
            return error
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
            type(error).__name__ == "OperationalError" and "connection" in str(error).lower()
        ):
            return StudyStorageLost(
                f"the study storage {redact_url(url)} cannot be reached (the database stopped answering); "
                "the trial is queued again, and the same command continues the study once it is back"
            )
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def quiet_lost_storage_in_threads(url: str) -> None:
    """Optuna's heartbeat thread prints a traceback when the database goes; the main thread
    says it in one line instead, so the thread's lost-connection errors are not printed."""
    import threading

    previous = threading.excepthook

    def hook(arguments) -> None:
        if lost_storage(arguments.exc_value, url) is None:
            previous(arguments)

    threading.excepthook = hook


# A worker uses the database from two threads, its own and Optuna's heartbeat, each for a few
# milliseconds at a time. SQLAlchemy's default pool would keep up to 15 connections per
# worker; one kept, and one more while both threads need one, lets a database's
# max_connections hold twice as many workers (docs/scaling.md).
STORAGE_POOL_SIZE = 1
STORAGE_MAX_OVERFLOW = 1

# Workers started together on a fresh database race to create Optuna's tables (optuna#1092);
# creating them twice is harmless, so a storage that fails that way is opened again.
STORAGE_OPEN_ATTEMPTS = 8
TABLE_RACE_MARKERS = ("already exists", "duplicate key", "uniqueviolation", "unique constraint", "circulardependency")


def _is_table_creation_race(error: Exception) -> bool:
    text = f"{type(error).__name__} {getattr(error, 'orig', '')} {error}".lower()
    return any(marker in text for marker in TABLE_RACE_MARKERS)


def open_storage(
    url: str,
    heartbeat_interval_s: int | None = None,
    grace_period_s: int | None = None,
    stale_trial_callback: Callable[[Any, Any], None] | None = None,
):
    """Opens the Optuna storage; fails within seconds, naming the URL (without its password), if it
    cannot. Workers that create a fresh database's tables together all get in."""
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs = {
            "connect_args": {"connect_timeout": 5},
            "pool_size": STORAGE_POOL_SIZE,
            "max_overflow": STORAGE_MAX_OVERFLOW,
        }
    shown = redact_url(url)

    def open_once():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval_s,
            grace_period=grace_period_s,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )

    try:
        # Another worker may be creating the tables right now; they will be there in a moment.
        return retry(open_once, _is_table_creation_race, attempts=STORAGE_OPEN_ATTEMPTS, pause_s=jittered(0.2, 0.3))
    except ImportError as error:
        # Optuna wraps the missing driver's ModuleNotFoundError in an ImportError.
        missing = getattr(error.__cause__, "name", None) or getattr(error, "name", None) or "its database driver"
        raise StorageUnavailableError(
            f"storage={shown!r} needs the Python module {missing!r}; install it "
            "(the project declares psycopg[binary] for PostgreSQL)"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StorageUnavailableError(f"storage={shown!r} cannot be opened: {reason}") from None
