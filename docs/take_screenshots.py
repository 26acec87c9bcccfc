"""Takes the README's pictures of the MLflow UI from real runs, so they can be taken again when MLflow changes.

    pip install -e ".[docs]"               # the Playwright driver only; the browser is Debian's
    apt-get install chromium
    python docs/take_screenshots.py

It starts a throwaway `mlflow server` on 127.0.0.1, runs a small grid search (4 trials), a CNN
registered twice as `mnist-cnn` and `promote`, then drives headless Chromium through the pages a user
opens: the runs table with the study expanded, the chart view of the trials' `val_accuracy`
curves, the experiment's Models tab (each trial's logged model with its metrics), a run's
evaluation artifacts, and the registered model with its `champion` alias.
The pictures go to docs/images/ui_*.png. It takes about four minutes on two cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from harness.servers import python_env, tracking_server  # noqa: E402

IMAGES_DIR = PROJECT_DIR / "docs" / "images"
# As the machine's probe starts Chromium: no sandbox as root, no background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1500, "height": 850}
TIMEOUT_MS = 60_000


def run_entry_point(script: str, arguments: list[str], env: dict[str, str], cwd: Path) -> str:
    """Runs one entry point to the end; returns what it printed."""
    print(f"Running {script} {' '.join(arguments)}", flush=True)
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "entrypoints" / script), *arguments],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def printed_link(output: str, what: str) -> str:
    """The last "View <what> in the MLflow UI: <link>" line an entry point printed."""
    links = re.findall(rf"View {what} in the MLflow UI: (\S+)", output)
    if not links:
        raise SystemExit(f"the entry point printed no link to {what}:\n{output[-3000:]}")
    return links[-1]


def make_runs(server_url: str, work_dir: Path) -> dict[str, str]:
    """A small grid search, a registered CNN and its promotion; returns the links they printed."""
    env = python_env(server_url)
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    space = work_dir / "space.yaml"
    space.write_text("parameters:\n  units: [32, 128]\n  learning_rate: [0.001, 0.01]\n")
    search = run_entry_point(
        "search.py",
        [
            "--space",
            str(space),
            "--storage",
            f"sqlite:///{work_dir / 'optuna.db'}",
            "--study_name",
            "grid-units-lr",
            "--epochs",
            "5",
            "--max_train_examples",
            "6000",
            "--register_as",
            "",
        ],
        env,
        work_dir,
    )
    # Two versions, so that the registry page shows which one promote made the champion.
    run_entry_point(
        "cnn.py", ["--epochs", "1", "--max_train_examples", "3000", "--register_as", "mnist-cnn"], env, work_dir
    )
    cnn = run_entry_point(
        "cnn.py", ["--epochs", "2", "--max_train_examples", "6000", "--register_as", "mnist-cnn"], env, work_dir
    )
    run_entry_point("promote.py", ["--model_name", "mnist-cnn"], env, work_dir)
    return {
        "search": printed_link(search, "the runs"),
        "cnn_run": printed_link(cnn, "this run"),
        "model": f"{server_url}/#/models/mnist-cnn?workflowType=machine_learning",
    }


def take_screenshots(links: dict[str, str], chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    taken = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)

        def save(name: str) -> None:
            page.wait_for_timeout(1500)
            path = IMAGES_DIR / f"ui_{name}.png"
            page.screenshot(path=str(path))
            taken.append(path)
            print(f"Saved {path.relative_to(PROJECT_DIR)}", flush=True)

        # 1. The runs table, with the search's parent run expanded to show its trials.
        page.goto(links["search"])
        page.wait_for_selector("text=matching run")
        close_assistant = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
        if close_assistant.count():
            close_assistant.click()
        page.locator("[data-component-id$='runnamecellrenderer.tsx_46']").first.click()
        page.wait_for_selector("text=trial-003")
        save("runs_table_study")

        # 2. The chart view, narrowed to the trials' validation accuracy.
        page.locator("label:has(input[value=CHART])").click()
        page.get_by_placeholder("Search metric charts").fill("val_accuracy")
        save("charts_val_accuracy")

        # 3. The Models tab: each trial's logged model, named after its run, with its metrics.
        # The table's columns are narrowed to the names and the metrics, grouped by data set.
        experiment = re.search(r"^(.*#/experiments/\d+)", links["search"])[1]
        page.set_viewport_size({"width": 2000, "height": 560})
        page.goto(f"{experiment}/models?workflowType=machine_learning")
        page.wait_for_selector("text=trial-003")
        close_assistant = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
        if close_assistant.count():
            close_assistant.click()
        page.get_by_role("button", name="Columns").click()
        menu = page.locator("[role=menu]").last
        for title in ("Status", "Logged from", "Registered models", "Dataset"):
            menu.locator(f"span[title='{title}']").click()
        menu.locator("span[title^='Dataset: mnist-training']").click()
        page.keyboard.press("Escape")
        save("models_tab")
        page.set_viewport_size(VIEWPORT)

        # 4. A run's evaluation artifacts: the confusion matrix of the CNN's selected model.
        page.goto(links["cnn_run"])
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("evaluation", exact=True).click()
        page.get_by_text("confusion_matrix.png", exact=True).click()
        page.wait_for_selector("img[src*='confusion_matrix.png'], img[alt*='confusion_matrix']")
        save("run_artifacts")

        # 5. The registered model, its versions and the champion alias.
        page.goto(links["model"])
        page.wait_for_selector("text=champion")
        save("registered_model")
        browser.close()
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or "/usr/bin/chromium", help="the Chromium binary to drive"
    )
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        raise SystemExit(f"--chromium={args.chromium!r}: no such browser; install it with `apt-get install chromium`")
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise SystemExit("the Playwright driver is missing: pip install playwright") from None
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-screenshots-") as work:
        work_dir = Path(work)
        with tracking_server(work_dir / "server") as server:
            links = make_runs(server.url, work_dir)
            take_screenshots(links, args.chromium)


if __name__ == "__main__":
    main()
