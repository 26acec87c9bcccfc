"""The MLflow UI, in a real browser, opens on what users came to compare.

A search runs against a real `mlflow server`; headless Chromium loads the link that the search
printed, and the page must be the model-training runs view listing the study's parent run. The
same experiment page without ``workflowType=machine_learning`` opens MLflow 3's GenAI overview,
which lists no runs: that is what the printed link avoids.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import PROJECT_DIR, run_script
from mlflow.tracking import MlflowClient

from harness.servers import python_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# As the machine's probe starts it: no sandbox as root, and none of the background connections
# that a closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
]


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def rendered_page(url: str) -> str:
    """The text of the page's DOM after its scripts have had 20 s of (virtual) time to fetch and render."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                find_chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    # The text a reader sees: "<strong>1</strong> matching run" reads "1 matching run".
    return re.sub(r"<[^>]+>", "", result.stdout)


@pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium: install Debian's chromium package (apt-get install chromium)"
)
def test_the_printed_link_opens_the_runs_view_listing_the_study(tmp_path, mlflow_server):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  units: [16, 32]\n")
    command = [
        sys.executable,
        str(PROJECT_DIR / "entrypoints" / "search.py"),
        "--space",
        str(space),
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        "--study_name",
        "ui-check",
        "--epochs",
        "1",
        "--max_train_examples",
        "500",
        "--register_as",
        "",
    ]
    # No experiment chosen: a search goes to the project's own experiment for searches.
    env = python_env(mlflow_server.url)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    result = run_script(command, env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    links = re.findall(r"View the runs in the MLflow UI: (\S+)", result.stdout)
    assert links, result.stdout[-3000:]
    link = links[-1]
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("mnist-search")
    assert link == f"{mlflow_server.url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    parent_run_id = re.search(r"parent run (\w+)", result.stdout).group(1)
    parent = client.get_run(parent_run_id)
    assert parent.info.experiment_id == experiment.experiment_id

    page = rendered_page(link)
    # The runs view of the model-training mode: its runs table, with the parent run by name.
    assert parent.info.run_name in page, page[-3000:]
    assert re.search(r"\d+ matching runs?", page), page[-3000:]
    # Without the parameter, the same experiment opens on the GenAI overview, with no runs.
    genai = rendered_page(link.replace("?workflowType=machine_learning", ""))
    assert parent.info.run_name not in genai
