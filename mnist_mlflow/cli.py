"""Shared command-line plumbing for the entry-point scripts."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from mnist_mlflow.config import UserInputError


def string_parser(description: str, defaults: dict[str, object], help_texts: dict[str, str]) -> argparse.ArgumentParser:
    """A parser with one ``--name`` flag per entry-point parameter, all read as strings.

    Values are checked by the typed configs, which give one clear line per bad value.
    """
    parser = argparse.ArgumentParser(description=description)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=str(default), help=f"{help_texts.get(name, '')} (default: {default})")
    return parser


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs ``main`` and turns a user error into one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
