"""The project's entry points, and the files derived from their parameters' declarations.

MLproject, the file `mlflow run` reads, and the parameter tables in docs/ are written from the
declarations (``mnist_mlflow.parameters``), so that a parameter is declared once:

    python -m mnist_mlflow.entry_points --write     # after adding or changing a parameter
    python -m mnist_mlflow.entry_points --check     # what tests/test_defaults.py runs

Each MLproject parameter maps one to one onto the entry point's flag of the same name.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mnist_mlflow.config import CnnRunConfig, DenseRunConfig, PromoteConfig, ReconcileConfig
from mnist_mlflow.parameters import flags_of
from mnist_mlflow.studies.exercises import ExercisesConfig
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.weight_decay import WeightDecayConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent

# Entry point -> its config; the script is entrypoints/<entry point>.py.
ENTRY_POINTS = {
    "dense": DenseRunConfig,
    "cnn": CnnRunConfig,
    "promote": PromoteConfig,
    "exercises": ExercisesConfig,
    "weight_decay": WeightDecayConfig,
    "search": SearchConfig,
    "reconcile": ReconcileConfig,
}

MLPROJECT_HEADER = """\
# Written by `python -m mnist_mlflow.entry_points --write` from the parameters' declarations
# (mnist_mlflow/config.py and the studies' configs): change those, not this file.
name: mnist-mlflow

conda_env: conda.yaml

entry_points:
"""


def _yaml_default(flag) -> str:
    if flag.kind.mlproject_type == "float":
        return flag.default_text
    return '"' + flag.default_text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mlproject_text() -> str:
    """MLproject as the declarations make it."""
    parts = [MLPROJECT_HEADER]
    for entry, config_class in ENTRY_POINTS.items():
        flags = flags_of(config_class)
        parts.append(f"  {entry}:\n    parameters:\n")
        for flag in flags:
            parts.append(f"      {flag.name}: {{type: {flag.kind.mlproject_type}, default: {_yaml_default(flag)}}}\n")
        parts.append(f"    command: >-\n      python entrypoints/{entry}.py\n")
        for flag in flags:
            parts.append(f"      --{flag.name} {{{flag.name}}}\n")
        parts.append("\n")
    return "".join(parts).rstrip("\n") + "\n"


TABLE_MARKER = re.compile(r"<!-- parameters: (\w+) [^\n]*-->\n(?:\|[^\n]*\|\n)*")


def parameter_table(entry: str) -> str:
    """The docs' table of one entry point's parameters, with its marker line."""
    lines = [
        f"<!-- parameters: {entry} (written by `python -m mnist_mlflow.entry_points --write`) -->",
        "| parameter | default | meaning |",
        "|---|---|---|",
    ]
    for flag in flags_of(ENTRY_POINTS[entry]):
        default = f"`{flag.default_text}`" if flag.default_text else "empty"
        meaning = flag.help_text.replace("|", "\\|")
        lines.append(f"| `{flag.name}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def docs_with_tables(text: str) -> str:
    """``text`` with every marked parameter table written afresh."""
    return TABLE_MARKER.sub(lambda match: parameter_table(match.group(1)), text)


def derived_files() -> dict[Path, str]:
    """Every file written from the declarations, with the text it should hold."""
    files = {PROJECT_DIR / "MLproject": mlproject_text()}
    for page in sorted((PROJECT_DIR / "docs").glob("*.md")):
        text = page.read_text()
        if TABLE_MARKER.search(text):
            files[page] = docs_with_tables(text)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write MLproject and the docs' parameter tables")
    action.add_argument("--check", action="store_true", help="fail if any of them differs from the declarations")
    args = parser.parse_args(argv)
    stale = [path for path, text in derived_files().items() if not path.exists() or path.read_text() != text]
    if args.write:
        for path in stale:
            path.write_text(derived_files()[path])
            print(f"wrote {path.relative_to(PROJECT_DIR)}")
        return 0
    for path in stale:
        print(f"{path.relative_to(PROJECT_DIR)} differs from the parameters' declarations", file=sys.stderr)
    if stale:
        print("run: python -m mnist_mlflow.entry_points --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
