"""One declared environment: requirements.txt is read by both pyproject.toml and conda.yaml, and
every third-party module the package imports is declared there."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

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
    installed = sorted(distribution_name(requirement) for requirement in importlib.metadata.requires("mnist-mlflow") if "extra ==" not in requirement)
    assert installed == sorted(distribution_name(requirement) for requirement in declared_requirements())


def imported_top_level_modules() -> dict[str, str]:
    """Every top-level module the package imports (inside functions too), with one file that does."""
    modules: dict[str, str] = {}
    for path in sorted((PROJECT_DIR / "mnist_mlflow").rglob("*.py")):
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


def test_every_third_party_module_the_package_imports_is_declared():
    declared = {distribution_name(requirement) for requirement in declared_requirements()}
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "mnist_mlflow":
            continue
        distributions = {distribution_name(name) for name in providers.get(module, [module])}
        if not distributions & declared:
            undeclared.append(f"{module} (imported in {where}; from {', '.join(sorted(distributions))})")
    assert not undeclared, "declare these in requirements.txt: " + "; ".join(undeclared)
