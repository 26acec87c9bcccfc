"""A clone is the product: nothing outside the repository is needed to read, run or benchmark
it, except the optional offline data folder (MNIST_MLFLOW_DATA_DIR)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import PROJECT_DIR

# The one folder beside the project that may be named: the optional offline data folder.
OPTIONAL_DATA_FOLDER = "../shared/data"


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for name in names:
        path = PROJECT_DIR / name
        if path.suffix in {".png", ".json"} or not path.is_file():
            continue
        files.append(path)
    return files


def test_nothing_tracked_points_outside_the_repository():
    offenders = []
    for path in tracked_text_files():
        name = path.relative_to(PROJECT_DIR).as_posix()
        if name == "tests/test_clone.py":
            continue
        for line_number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            outside = line.replace(OPTIONAL_DATA_FOLDER, "")
            if "../shared" in outside or "EXPERIMENTS.md" in outside or '"shared"' in outside:
                offenders.append(f"{name}:{line_number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / unquote(target.split("#", 1)[0])).resolve()
            if not path.exists() or not path.is_relative_to(PROJECT_DIR):
                broken.append(f"{page.relative_to(PROJECT_DIR)}: {target}")
    assert not broken, "\n".join(broken)


@pytest.mark.e2e
def test_the_benchmarks_seed_baseline_runs_from_the_clone(tmp_path):
    """The speed benchmark's yardstick, the seeds' own training code, lives in benchmarks/."""
    from mnist_mlflow import data

    if not os.environ.get(data.DATA_DIR_ENV):
        pytest.skip(f"needs {data.DATA_DIR_ENV} to prepare MNIST offline")
    # Prepared under the project's lock first: the seeds' code prepares without one, as written.
    data.load_arrays("mnist")
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_DIR / "benchmarks" / "seed_baseline.py"),
            "dense_bs1",
            "--epochs",
            "1",
            "--steps",
            "20",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["which"] == "dense_bs1" and len(measured["epoch_s"]) == 1
    assert 0.0 <= measured["test_accuracy"] <= 1.0 and measured["total_s"] > measured["epoch_s"][0] > 0


def test_figures_quoted_from_the_benchmark_results_match_them():
    """A table marked ``<!-- results: benchmarks/results/X.md -->`` in the README or docs is the
    table of that results file, row for row, so that quoted figures never drift from the files
    the benchmarks write."""
    pages = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
    quoted = 0
    for page in pages:
        for match in re.finditer(r"<!-- results: (\S+) -->\n((?:\|.*\|\n)+)", page.read_text()):
            results = (PROJECT_DIR / match.group(1)).read_text()
            table = match.group(2).strip().splitlines()
            lines = results.splitlines()
            assert any(lines[start : start + len(table)] == table for start in range(len(lines))), (
                f"{page.relative_to(PROJECT_DIR)}: the table quoted from {match.group(1)} differs from it"
            )
            quoted += 1
    assert quoted >= 2
