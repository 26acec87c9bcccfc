"""Shared command-line plumbing for the entry-point scripts."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence

from mnist_mlflow import lifecycle
from mnist_mlflow.config import RunFailedError, UserInputError
from mnist_mlflow.parameters import flags_of


def parse_config(config_class, description: str, argv: Sequence[str] | None):
    """Parses one ``--name value`` flag per parameter of ``config_class`` and builds the config.

    The flags, their help and their defaults come from the parameters' declarations
    (``mnist_mlflow.parameters``). Every value is read as a string and checked by the config,
    which gives one clear line per bad value.
    """
    parser = argparse.ArgumentParser(description=description)
    for flag in flags_of(config_class):
        parser.add_argument(
            f"--{flag.name}", default=flag.default_text, help=f"{flag.help_text} (default: {flag.default_text})"
        )
    return config_class.from_params(vars(parser.parse_args(argv)))


def check_tracking_first() -> None:
    """Checks the tracking server and the credentials before a training entry point imports TensorFlow.

    Importing TensorFlow, Keras and scikit-learn takes seconds of CPU, far longer than asking the
    server. The library checks the server again when it starts work (one more small request), so
    this only brings forward the answer to a wrong address or password: one line before the
    imports instead of after them.
    """
    from mnist_mlflow.tracking import check_tracking_server

    check_tracking_server()


def import_training_libraries() -> None:
    """Imports the training code (TensorFlow, Keras, scikit-learn, matplotlib, MLflow), then moves
    what the imports left out of the garbage collector's sight.

    Those are hundreds of thousands of objects that live as long as the process, and every full
    collection walks them all: each time Keras's ``clear_session`` collects before a model, and
    again whenever the collector decides to. Frozen, they are skipped, which saves a search a
    noticeable share of its CPU (docs/performance.md). Objects are still freed by reference
    counting; only a reference cycle among the frozen ones would outlive its use. Only the entry
    points do this, once: in a notebook, the user's own objects would be frozen too.
    """
    import mnist_mlflow.tracked_run  # noqa: F401

    gc.collect()
    gc.freeze()


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs ``main`` and turns how it ended into one line on stderr and an exit status.

    - a user error: ``error: ...``, status 2, before any expensive work;
    - a run that failed for a stated reason (say, a diverged loss): ``error: ...``, status 1;
    - Ctrl-C: status 130; SIGTERM, or the end of the ``mlflow run`` launcher: status 143.
      Either way the runs this process holds have ended KILLED, tagged ``killed_reason``.
    """
    lifecycle.install_signal_handlers()
    lifecycle.watch_launcher()
    try:
        main(argv)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except lifecycle.Terminated as stop:
        print(stop.line(), file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the runs of this process ended KILLED", file=sys.stderr)
        return 130
    except Exception as error:
        stop = lifecycle.termination_from(error)
        if stop is not None:
            print(stop.line(), file=sys.stderr)
            return stop.exit_status
        refused, lost = _tracking_failure(error)
        if refused is not None:
            print(f"error: {refused}", file=sys.stderr)
            return 2
        if lost is not None:
            print(lost.line(), file=sys.stderr)
            return lost.exit_status
        raise
    return 0


def _tracking_failure(error: Exception):
    """An MLflow error as (a refused permission, a lost server), either None, for one line."""
    if "mlflow" not in sys.modules:
        return None, None
    from mnist_mlflow.tracking import auth_error, server_lost

    return auth_error(error), server_lost(error)


def exit_process(status: int) -> None:
    """Ends the entry point's process with ``status``, skipping the interpreter's teardown.

    By the time an entry point returns, its runs have ended and every record has been sent;
    what is left is TensorFlow's teardown, about a second of tearing down what the process
    exits from anyway. Standard output and error are flushed first.
    """
    if "tensorflow" not in sys.modules:
        sys.exit(status)  # Nothing heavy to tear down (say, a bad flag refused before any work).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
