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

from mnist_mlflow.cli import exit_process, run_main, string_parser  # noqa: E402
from mnist_mlflow.config import ConfigError, parse_bool_list, parse_float  # noqa: E402

DEFAULTS = {"experiment": "", "max_age_hours": 24.0, "dry_run": "false"}
HELP = {
    "experiment": "experiment name or id to reconcile; empty: every experiment",
    "max_age_hours": "age after which a RUNNING run without process information is closed",
    "dry_run": "true: only list what would be closed",
}


def main(argv=None) -> None:
    args = string_parser(__doc__.splitlines()[0], DEFAULTS, HELP).parse_args(argv)
    max_age_hours = parse_float("max_age_hours", args.max_age_hours)
    if max_age_hours <= 0:
        raise ConfigError(f"max_age_hours={args.max_age_hours!r} must be positive")
    (dry_run,) = parse_bool_list("dry_run", args.dry_run)

    from mnist_mlflow import tracking

    shown = tracking.check_tracking_server()
    experiment_ids = tracking.experiment_ids(args.experiment.strip())
    closed = tracking.reconcile_runs(experiment_ids, unknown_max_age_h=max_age_hours, dry_run=dry_run)
    verb = "would be closed" if dry_run else "closed KILLED"
    for run_id, reason in closed:
        print(f"run {run_id}: {verb} ({reason})")
    print(f"{len(closed)} run(s) {verb} in {len(experiment_ids)} experiment(s) at {shown}")


if __name__ == "__main__":
    exit_process(run_main(main))
