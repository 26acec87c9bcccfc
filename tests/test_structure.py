"""The package's structure: no import cycles, one study engine, the project's own deprecation
warnings shown, and library figures where a library draws them."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize

import numpy as np
from conftest import PROJECT_DIR

PACKAGE = PROJECT_DIR / "mnist_mlflow"


def package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, inside functions too."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PROJECT_DIR).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # A submodule importing its own package's __init__ is not an edge.
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycle_from(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    assert cycle_from(package_imports()) is None, " -> ".join(cycle_from(package_imports()))


def test_the_cycle_check_finds_a_cycle():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_ground_floor_imports_nothing_above_it():
    edges = package_imports()
    assert edges["mnist_mlflow.parameters"] == set()
    for module in ("mnist_mlflow.config", "mnist_mlflow.lifecycle", "mnist_mlflow.redaction"):
        assert edges[module] <= {"mnist_mlflow.config", "mnist_mlflow.parameters"}, (module, edges[module])
    # The machine learning knows nothing of MLflow or of studies.
    for module in ("mnist_mlflow.data", "mnist_mlflow.models", "mnist_mlflow.training", "mnist_mlflow.plots"):
        assert not {
            target for target in edges[module] if target.startswith(("mnist_mlflow.tracking", "mnist_mlflow.studies"))
        }


def test_every_study_runs_through_the_one_engine():
    """Only the engine opens and closes study parents; the studies call the engine."""
    opening = ("open_study_parent", "close_study_parent", "log_study_summary")
    for path in (PACKAGE / "studies").glob("*.py"):
        text = path.read_text()
        for call in opening:
            if path.name != "engine.py":
                assert f"tracking.{call}(" not in text, f"{path.name} calls tracking.{call} itself"
    for study in ("exercises", "weight_decay", "search"):
        assert "engine.run_study(" in (PACKAGE / "studies" / f"{study}.py").read_text(), study


def test_the_project_s_own_deprecation_warnings_are_shown():
    """Python hides DeprecationWarning outside __main__; the package shows those its own code triggers."""
    code = (
        "import warnings, mnist_mlflow\n"
        "warnings.warn_explicit('old API', DeprecationWarning, 'data.py', 1, module='mnist_mlflow.data')\n"
        "warnings.warn_explicit('their insides', DeprecationWarning, 'x.py', 1, module='somelibrary.x')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR, timeout=60)
    assert "DeprecationWarning: old API" in result.stderr
    assert "their insides" not in result.stderr


def test_the_confusion_matrix_is_scikit_learn_s_display_with_every_count():
    from sklearn.metrics import ConfusionMatrixDisplay

    from mnist_mlflow import plots

    matrix = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 9]])
    figure = plots.confusion_matrix_figure(matrix, ["a", "b", "c"])
    axes = figure.axes[0]
    shown = sorted(int(text.get_text()) for text in axes.texts)
    assert shown == sorted(matrix.ravel().tolist())
    assert axes.get_xlabel() == "Predicted label" and axes.get_ylabel() == "True label"
    assert "accuracy 87.50%" in axes.get_title()
    assert ConfusionMatrixDisplay.__name__ in plots.confusion_matrix_figure.__code__.co_names
    plots.close(figure)


def test_entry_points_freeze_what_the_training_libraries_leave():
    """``import_training_libraries`` loads the training code and moves the objects its imports
    left (hundreds of thousands) out of the garbage collector's sight; importing the package's
    command-line plumbing alone does neither."""
    code = (
        "import gc, sys\n"
        "from mnist_mlflow import cli\n"
        "print('before', 'tensorflow' in sys.modules, gc.get_freeze_count())\n"
        "cli.import_training_libraries()\n"
        "print('after', 'tensorflow' in sys.modules, 'sklearn' in sys.modules, gc.get_freeze_count())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stdout.splitlines()
    assert before == "before False 0"
    label, tensorflow, sklearn, frozen = after.split()
    assert (label, tensorflow, sklearn) == ("after", "True", "True")
    assert int(frozen) > 100_000


# Figures that are not measurements: targets and published references (docs/experiments.md),
# and the definitions of a band or a format.
NOT_MEASUREMENTS = {
    ("mnist_mlflow/config.py", "99.2%"),  # the CNN's target test accuracy
    ("mnist_mlflow/studies/exercises.py", "98.5%"),  # exercise 10's target
    ("mnist_mlflow/studies/weight_decay.py", "1.53%"),  # LeCun's table, a published reference
    ("mnist_mlflow/plots.py", "90%"),  # the 10-90% band
    ("mnist_mlflow/studies/best_of_n.py", "90%"),  # the 10-90% band
    ("mnist_mlflow/studies/summaries.py", "2%"),  # the format spec .2%
}
FIGURE = re.compile(
    r"\b\d+(?:\.\d+)?\s?(?:ms|s|seconds|minutes|GB|MB|KB|GFLOP/s)\b|\b\d+(?:\.\d+)?%|\b\d+(?:\.\d+)?x\b"
)


def comments_and_docstrings(path):
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                yield node.body[0].lineno, docstring


def test_no_measured_figure_is_written_into_the_code():
    """Code says why; how many milliseconds lives in benchmarks/results/, where a command makes it."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(PROJECT_DIR / "entrypoints").glob("*.py")]:
        name = path.relative_to(PROJECT_DIR).as_posix()
        for line, text in comments_and_docstrings(path):
            for figure in FIGURE.findall(text):
                if (name, figure) not in NOT_MEASUREMENTS:
                    found.append(f"{name}:{line}: {figure}")
    for line_number, line in enumerate((PROJECT_DIR / "pyproject.toml").read_text().splitlines(), 1):
        if line.lstrip().startswith("#"):
            found += [f"pyproject.toml:{line_number}: {figure}" for figure in FIGURE.findall(line)]
    assert not found, "\n".join(found)
