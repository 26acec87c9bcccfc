"""How many tracking requests a search trial makes, and how many of them keep the run alive.

    python benchmarks/machinery_requests.py                      # this checkout against bf3f6eb
    python benchmarks/machinery_requests.py --before <commit>

``bench_workers.py`` counts requests by endpoint. This says who made them: it runs one real
``search`` worker (3 trials of the ``random`` space, 300 examples, 2 epochs, a local sqlite
store) with MLflow's client wrapped, and files each ``set_tag``, ``get_run``,
``get_metric_history`` and ``log_batch`` under the project's function that made it. A request
belongs to the machinery (the lease and heartbeat, the status checks, the epoch ledger's checks,
the checkpoint's tags) when that function lives in ``tracking/watch.py``, ``tracking/lease.py``
or ``tracking/checkpoints.py``, or is ``session._end_run``. The same worker runs from this
checkout and from ``--before`` (a git worktree of that commit), one after the other.

Results: ``benchmarks/results/machinery_requests.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import PROJECT_DIR, record_results

TRIALS = 3
MACHINERY_FILES = ("watch.py", "lease.py", "checkpoints.py")
# Runs inside the worker: wraps the client, runs the entry point, prints the counts as JSON.
PROBE = """
import collections, json, os, sys, traceback
checkout = sys.argv[1]
sys.path.insert(0, checkout)
from mlflow.tracking import MlflowClient
counts = collections.Counter()

def wrap(name):
    original = getattr(MlflowClient, name)

    def wrapper(self, *args, **kwargs):
        frames = [frame for frame in traceback.extract_stack()[:-1] if "mnist_mlflow" in frame.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else "mlflow itself"
        counts[f"{name} {where}"] += 1
        return original(self, *args, **kwargs)

    setattr(MlflowClient, name, wrapper)

for name in ("set_tag", "get_run", "get_metric_history", "log_batch"):
    wrap(name)
from mnist_mlflow import cli
finish = cli.exit_process

def report_and_exit(status):
    with open(os.environ["PROBE_OUT"], "w") as out:
        json.dump(counts, out)
    finish(status)

cli.exit_process = report_and_exit
sys.argv = ["search.py", *sys.argv[2:]]
import runpy
runpy.run_path(os.path.join(checkout, "entrypoints", "search.py"), run_name="__main__")
"""


def count_requests(checkout: Path, work: Path) -> dict[str, int]:
    work.mkdir(parents=True)
    out = work / "counts.json"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PROBE_OUT": str(out),
        "MNIST_MLFLOW_SPOOL_DIR": str(work / "spool"),
    }
    arguments = ["--space", "random", "--n_trials", str(TRIALS), "--epochs", "2", "--max_train_examples", "300"]
    arguments += ["--register_as", "", "--storage", f"sqlite:///{work / 'optuna.db'}", "--study_name", "probe"]
    subprocess.run(
        [sys.executable, "-c", PROBE, str(checkout), *arguments], env=env, cwd=work, check=True, capture_output=True
    )
    return json.loads(out.read_text())


def machinery(call: str) -> bool:
    where = call.split(" ", 1)[1]
    return where.split(":")[0] in MACHINERY_FILES or where == "session.py:_end_run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="bf3f6eb", help="the commit to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="machinery-requests-") as root:
        before_tree = Path(root) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before_tree), args.before], check=True)
        try:
            sides = {
                f"before ({args.before})": count_requests(before_tree, Path(root) / "work-before"),
                "now": count_requests(PROJECT_DIR, Path(root) / "work-now"),
            }
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], check=False)
    totals = {
        side: {
            "machinery": sum(n for call, n in counts.items() if machinery(call)) / TRIALS,
            "other": sum(n for call, n in counts.items() if not machinery(call)) / TRIALS,
        }
        for side, counts in sides.items()
    }
    lines = [
        "# Tracking requests per search trial, by who makes them",
        "",
        f"Command: `python benchmarks/machinery_requests.py --before {args.before}`. One `search` worker, "
        f"{TRIALS} trials (300 examples, 2 epochs), a local sqlite store; `set_tag`, `get_run`, "
        "`get_metric_history` and `log_batch` counted by the project's function that made them.",
        "",
        "| | machinery per trial | other per trial |",
        "|---|---:|---:|",
        *(f"| {side} | {t['machinery']:.1f} | {t['other']:.1f} |" for side, t in totals.items()),
        "",
        "Machinery: the lease and heartbeat, status checks, the epoch ledger's checks and the checkpoint's "
        "tags (functions in `tracking/watch.py`, `tracking/lease.py`, `tracking/checkpoints.py`, and "
        "`session._end_run`).",
        "",
    ]
    for side, counts in sides.items():
        lines += [f"## {side}: machinery calls", "", "| calls in all | request and function |", "|---:|---|"]
        calls = sorted(((n, call) for call, n in counts.items() if machinery(call)), reverse=True)
        lines += [f"| {n} | `{call}` |" for n, call in calls]
        lines.append("")
    record_results("machinery_requests", {"trials": TRIALS, "sides": sides, "per_trial": totals}, "\n".join(lines))


if __name__ == "__main__":
    main()
