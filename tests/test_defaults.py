"""One source for every default: MLproject, the README's parameter tables, the entry points'
flags and the typed configs must all describe the same defaults.

The configs are the source. MLproject and the README are written by hand, so each of their
defaults is read back through the config's own parser and must build the default config.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import PROJECT_DIR

from mnist_mlflow.config import CnnRunConfig, ConfigError, DenseRunConfig
from mnist_mlflow.studies.exercises import ExercisesConfig
from mnist_mlflow.studies.search_spaces import SearchConfig
from mnist_mlflow.studies.weight_decay import WeightDecayConfig

CONFIG_OF = {
    "dense": DenseRunConfig,
    "cnn": CnnRunConfig,
    "exercises": ExercisesConfig,
    "weight_decay": WeightDecayConfig,
    "search": SearchConfig,
}
# Entry points without a config class: their flags' defaults are plain strings.
PLAIN_ENTRY_POINTS = ("promote", "reconcile")
ALL_ENTRY_POINTS = (*CONFIG_OF, *PLAIN_ENTRY_POINTS)


@pytest.fixture(scope="module")
def mlproject() -> dict:
    with open(PROJECT_DIR / "MLproject") as file:
        return yaml.safe_load(file)["entry_points"]


def mlproject_defaults(mlproject: dict, entry: str) -> dict[str, object]:
    return {name: spec["default"] for name, spec in mlproject[entry]["parameters"].items()}


def readme_defaults() -> dict[str, dict[str, str]]:
    """Each README parameter table (marked ``<!-- parameters: entry ... -->``) as {name: default}.

    A default cell reads ``x``, ``empty ...`` (the empty string) or ``as for `dense` `` (that
    entry point's default); a row may name several parameters with as many defaults.
    """
    text = "\n".join(page.read_text() for page in sorted((PROJECT_DIR / "docs").glob("*.md")))
    tables: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"<!-- parameters: (\w+) .*?-->\n((?:\|.*\|\n)+)", text):
        entry, rows = match.group(1), match.group(2).splitlines()[2:]
        table: dict[str, str] = {}
        for row in rows:
            name_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
            names = re.findall(r"`(\w+)`", name_cell)
            if default_cell.startswith("as for"):
                source = tables[re.search(r"`(\w+)`", default_cell).group(1)]
                defaults = [source[name] for name in names]
            elif default_cell.startswith("empty"):
                defaults = [""]
            else:
                defaults = re.findall(r"`([^`]*)`", default_cell)
            assert len(defaults) == len(names), f"README {entry} table: {row!r} does not give one default per name"
            table.update(zip(names, defaults))
        tables[entry] = table
    return tables


def flag_defaults(entry: str) -> dict[str, str]:
    """The defaults ``python entrypoints/<entry>.py --help`` shows, flag by flag."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "entrypoints" / f"{entry}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "10000"},
    )
    assert result.returncode == 0, result.stderr
    return dict(re.findall(r"^\s+--(\w+) \S+\s.*\(default: (.*?)\)$", result.stdout, flags=re.MULTILINE))


def test_every_entry_point_is_documented_in_mlproject_and_the_readme(mlproject):
    assert set(mlproject) == set(ALL_ENTRY_POINTS)
    assert set(readme_defaults()) == set(ALL_ENTRY_POINTS)


@pytest.mark.parametrize("entry", ALL_ENTRY_POINTS)
def test_mlproject_passes_every_parameter_to_its_flag(mlproject, entry):
    command = mlproject[entry]["command"]
    for name in mlproject[entry]["parameters"]:
        assert f"--{name} {{{name}}}" in command, f"MLproject {entry}: --{name} is not passed"


@pytest.mark.parametrize("entry", list(CONFIG_OF))
def test_mlproject_readme_and_flags_give_the_config_s_defaults(mlproject, entry):
    config_class = CONFIG_OF[entry]
    default = config_class()
    names = set(default.as_params())
    sources = {
        "MLproject": mlproject_defaults(mlproject, entry),
        "README": readme_defaults()[entry],
        "--help": flag_defaults(entry),
    }
    for source, defaults in sources.items():
        assert set(defaults) == names, f"{source} {entry}: parameters differ from the config's: {set(defaults) ^ names}"
        built = config_class.from_params(defaults)
        assert built == default, f"{source} {entry}: its defaults build {built}, not the default {default}"


@pytest.mark.parametrize("entry", PLAIN_ENTRY_POINTS)
def test_plain_entry_points_agree_on_their_defaults(mlproject, entry):
    expected = {name: str(value) for name, value in mlproject_defaults(mlproject, entry).items()}
    assert readme_defaults()[entry] == expected
    assert flag_defaults(entry) == expected


def test_a_drifted_default_is_caught(mlproject):
    """The check above is not vacuous: a default changed in one place only is a difference."""
    defaults = {**mlproject_defaults(mlproject, "dense"), "batch_size": "128"}
    assert DenseRunConfig.from_params(defaults) != DenseRunConfig()
    defaults = {**mlproject_defaults(mlproject, "dense"), "activation": "relu,relu", "hidden_units": "50"}
    with pytest.raises(ConfigError, match="activation"):
        DenseRunConfig.from_params(defaults)
