"""The `reconcile` entry point: close as KILLED the runs whose process died without closing them.

    python entrypoints/reconcile.py
    mlflow run . -e reconcile --env-manager local -P experiment=mnist-dense

Every entry point does this on start for its own experiment. A run started on this host by
a process that no longer exists is closed KILLED, tagged `killed_reason`. Runs of other
hosts are never touched. A RUNNING run without process information is closed only when it
is older than `max_age_hours`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Started as `python entrypoints/reconcile.py`, the project folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_mlflow.cli import exit_process, parse_config, run_main  # noqa: E402
from mnist_mlflow.config import ReconcileConfig  # noqa: E402


def main(argv=None) -> None:
    config = parse_config(ReconcileConfig, __doc__.splitlines()[0], argv)
    dry_run = config.dry_run

    from mnist_mlflow import tracking

    shown = tracking.check_tracking_server()
    if not dry_run:
        # Runs that stopped when this server was unreachable: their lost metrics first.
        for line in tracking.deliver_spooled_runs():
            print(line)
    experiment_ids = tracking.experiment_ids(config.experiment)
    closed = tracking.reconcile_runs(experiment_ids, unknown_max_age_h=config.max_age_hours, dry_run=dry_run)
    verb = "would be closed" if dry_run else "closed KILLED"
    for run_id, reason in closed:
        print(f"run {run_id}: {verb} ({reason})")
    print(f"{len(closed)} run(s) {verb} in {len(experiment_ids)} experiment(s) at {shown}")


if __name__ == "__main__":
    exit_process(run_main(main))
