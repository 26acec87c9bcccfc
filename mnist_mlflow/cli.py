"""Shared command-line plumbing for the entry-point scripts."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence

from mnist_mlflow import lifecycle
from mnist_mlflow.config import RunFailedError, UserInputError

# Help for the parameters every training entry point shares.
TRAINING_HELP = {
    "optimizer": "adam, sgd or rmsprop",
    "learning_rate": "optimizer learning rate (the initial one with a schedule)",
    "lr_schedule": "constant, or cosine: decay the learning rate to zero over all epochs",
    "max_shift": "augmentation: move each training image by up to this many pixels each way; 0 means none",
    "batch_size": "examples per training step",
    "epochs": "passes over the training data",
    "dataset": "mnist or fashion_mnist",
    "validation_fraction": "share of the training split held out for validation, in (0, 1)",
    "seed": "seed for the split, the initial weights and the shuffling",
    "max_train_examples": "cap on training examples for quick runs; 0 means all",
}


def string_parser(description: str, defaults: dict[str, object], help_texts: dict[str, str]) -> argparse.ArgumentParser:
    """A parser with one ``--name`` flag per entry-point parameter, all read as strings.

    Values are checked by the typed configs, which give one clear line per bad value.
    """
    parser = argparse.ArgumentParser(description=description)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=str(default), help=f"{help_texts.get(name, '')} (default: {default})")
    return parser


def parse_config(config_class, description: str, help_texts: dict[str, str], argv: Sequence[str] | None, defaults=None):
    """Parses ``--name value`` flags for every parameter of ``config_class`` and builds the config.

    ``defaults`` overrides what the flags show as defaults (``config_class().as_params()``).
    """
    parser = string_parser(description, defaults or config_class().as_params(), help_texts)
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
    import mnist_mlflow.experiments  # noqa: F401

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
        print(f"stopped: {stop.reason}; the runs of this process ended KILLED", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the runs of this process ended KILLED", file=sys.stderr)
        return 130
    except Exception as error:
        stop = lifecycle.termination_from(error)
        if stop is None:
            raise
        print(f"stopped: {stop.reason}; the runs of this process ended KILLED", file=sys.stderr)
        return 143
    return 0


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
