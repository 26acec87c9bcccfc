"""Each parameter is declared once, on its config field (mnist_mlflow.parameters). MLproject, the
docs' parameter tables and the entry points' flags are derived from the declarations; these
tests check that what users read and type agrees with them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import PROJECT_DIR

from mnist_mlflow import entry_points
from mnist_mlflow.config import ConfigError, DenseRunConfig
from mnist_mlflow.parameters import defaults_of

CONFIG_OF = entry_points.ENTRY_POINTS


@pytest.fixture(scope="module")
def mlproject() -> dict:
    with open(PROJECT_DIR / "MLproject") as file:
        return yaml.safe_load(file)["entry_points"]


def mlproject_defaults(mlproject: dict, entry: str) -> dict[str, str]:
    return {name: str(spec["default"]) for name, spec in mlproject[entry]["parameters"].items()}


def docs_defaults() -> dict[str, dict[str, str]]:
    """Each docs parameter table (marked ``<!-- parameters: entry ... -->``) as {name: default}."""
    text = "\n".join(page.read_text() for page in sorted((PROJECT_DIR / "docs").glob("*.md")))
    tables: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"<!-- parameters: (\w+) .*?-->\n((?:\|.*\|\n)+)", text):
        rows = match.group(2).splitlines()[2:]
        table = {}
        for row in rows:
            name_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
            table[name_cell.strip("`")] = "" if default_cell == "empty" else default_cell.strip("`")
        tables[match.group(1)] = table
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


def test_mlproject_and_the_docs_tables_are_what_the_declarations_make():
    """`python -m mnist_mlflow.entry_points --check` passes: nothing derived was edited by hand,
    and nothing was forgotten after a declaration changed."""
    stale = [path for path, text in entry_points.derived_files().items() if path.read_text() != text]
    assert not stale, f"run `python -m mnist_mlflow.entry_points --write`: {stale}"
    assert entry_points.main(["--check"]) == 0


def test_the_check_notices_a_file_that_differs(tmp_path, monkeypatch, capsys):
    mlproject = tmp_path / "MLproject"
    mlproject.write_text(entry_points.mlproject_text().replace('default: "100"', 'default: "128"'))
    monkeypatch.setattr(entry_points, "derived_files", lambda: {mlproject: entry_points.mlproject_text()})
    monkeypatch.setattr(entry_points, "PROJECT_DIR", tmp_path)
    assert entry_points.main(["--check"]) == 1
    assert "MLproject differs from the parameters' declarations" in capsys.readouterr().err


def test_every_entry_point_has_a_script_an_mlproject_entry_and_a_docs_table(mlproject):
    scripts = {path.stem for path in (PROJECT_DIR / "entrypoints").glob("*.py")}
    assert set(mlproject) == set(CONFIG_OF) == scripts
    assert set(docs_defaults()) == set(CONFIG_OF)


@pytest.mark.parametrize("entry", list(CONFIG_OF))
def test_mlproject_passes_every_parameter_to_its_flag(mlproject, entry):
    command = mlproject[entry]["command"]
    assert command.startswith(f"python entrypoints/{entry}.py")
    for name in mlproject[entry]["parameters"]:
        assert f"--{name} {{{name}}}" in command, f"MLproject {entry}: --{name} is not passed"


@pytest.mark.parametrize("entry", list(CONFIG_OF))
def test_mlproject_docs_and_flags_give_the_config_s_defaults(mlproject, entry):
    config_class = CONFIG_OF[entry]
    default = config_class()
    names = set(defaults_of(config_class))
    sources = {
        "MLproject": mlproject_defaults(mlproject, entry),
        "docs": docs_defaults()[entry],
        "--help": flag_defaults(entry),
    }
    for source, defaults in sources.items():
        assert set(defaults) == names, f"{source} {entry}: parameters differ from the config's: {set(defaults) ^ names}"
        built = config_class.from_params(defaults)
        assert built == default, f"{source} {entry}: its defaults build {built}, not the default {default}"


def test_a_drifted_default_is_caught(mlproject):
    """The check above is not vacuous: a default changed in one place only is a difference."""
    defaults = {**mlproject_defaults(mlproject, "dense"), "batch_size": "128"}
    assert DenseRunConfig.from_params(defaults) != DenseRunConfig()
    defaults = {**mlproject_defaults(mlproject, "dense"), "activation": "relu,relu", "hidden_units": "50"}
    with pytest.raises(ConfigError, match="activation"):
        DenseRunConfig.from_params(defaults)
