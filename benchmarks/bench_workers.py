"""Many real search workers on one study: one PostgreSQL, one `mlflow server` backed by PostgreSQL.

    python benchmarks/bench_workers.py                       # 1, 2, 4, 8, 12, 16 workers; about 15 minutes
    python benchmarks/bench_workers.py --counts 1,4 --trials-per-worker 2
    python benchmarks/bench_workers.py --counts 16 --results workers_16     # one count, its own files

For each worker count, that many ``benchmarks/timed_worker.py`` processes (each a real
``search`` worker, TensorFlow and all) join one new study of the ``random`` space, on loopback.
The trials are tiny (300 training examples, 2 epochs), so that the storage and the tracking
server carry the load, not the arithmetic. For each count this reports:

- trials finished per minute, from the first trial's start to the last trial's end;
- the seconds each trial spends in Optuna's storage and in MLflow's client, by call;
- p50 and p99 latency of the tracking server, as its clients saw it and as gunicorn logged it;
- the most database connections held at once (``pg_stat_activity``), per database;
- trials lost, repeated or left RUNNING (all must be 0), checked in the study and in MLflow;
- how many of each trial's requests the run-keeping machinery made (the lease and heartbeat,
  status checks, the epoch ledger, the checkpoints), by endpoint (see ``timed_worker.py``);
- a worker's peak memory, and how many such workers fit in 24 GB.

PostgreSQL runs with fsync on, as a real server does. The records of the largest count feed
``bench_load.py``, which replays them for more workers than one machine can start.

Results: ``benchmarks/results/workers.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import PROJECT_DIR, RESULTS_DIR, ConnectionCounter, percentile, record_results

from harness.servers import PostgresServer, python_env, tracking_server

WORKER = PROJECT_DIR / "benchmarks" / "timed_worker.py"
GIB = 1024**3
# gunicorn's access log: the request's path and its duration in microseconds.
ACCESS_FORMAT = "%(m)s %(U)s %(D)s"


def server_latencies(log_path: Path, since: int) -> list[float]:
    """The tracking server's own durations (seconds) of the API requests it logged after byte ``since``."""
    durations = []
    with log_path.open() as log:
        log.seek(since)
        for line in log:
            parts = line.split()
            if len(parts) == 3 and parts[1].startswith("/api/") and parts[2].isdigit():
                durations.append(int(parts[2]) / 1e6)
    return durations


def check_study(storage_url: str, study_name: str, tracking_uri: str, n_trials: int) -> dict:
    """Trials lost, repeated or left RUNNING: in the Optuna study and among the parent's child runs."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    trials = study.get_trials(deepcopy=False)
    trained = [trial for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trained = [trial for trial in trained if "surplus" not in trial.user_attrs]
    client = mlflow.MlflowClient(tracking_uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    keys = [run.data.tags.get("optuna_trial_number") for run in children]
    finished_keys = [run.data.tags.get("optuna_trial_number") for run in children if run.info.status == "FINISHED"]
    return {
        "trials_finished": len(trained),
        "trials_lost": max(0, n_trials - len(trained)),
        "trials_repeated": len(finished_keys) - len(set(finished_keys)),
        "trials_running_in_optuna": sum(trial.state == TrialState.RUNNING for trial in trials),
        "runs_left_running": sum(run.info.status == "RUNNING" for run in children) + (parent.info.status == "RUNNING"),
        "child_runs": len(keys),
        "parents": len({parent_id}),
        "first_start": min(trial.datetime_start for trial in trained).timestamp() if trained else None,
        "last_end": max(trial.datetime_complete for trial in trained).timestamp() if trained else None,
    }


def run_count(count: int, args, storage_url: str, server, root: Path, counter_url: str) -> dict:
    """``count`` workers on one new study; what they measured and what the study shows after."""
    study_name = f"bench-workers-{count}-{int(time.time())}"
    n_trials = count * args.trials_per_worker
    records_dir = root / f"records-{count}"
    records_dir.mkdir()
    command = [
        sys.executable,
        str(WORKER),
        "--space",
        "random",
        "--n_trials",
        str(n_trials),
        "--epochs",
        str(args.epochs),
        "--max_train_examples",
        str(args.examples),
        "--storage",
        storage_url,
        "--study_name",
        study_name,
        "--register_as",
        "",
    ]
    log_offset = server.access_log.stat().st_size if server.access_log.exists() else 0
    connections = ConnectionCounter(counter_url).start()
    started = time.perf_counter()
    processes = []
    for index in range(count):
        env = python_env(
            server.url,
            MLFLOW_EXPERIMENT_NAME="bench-workers",
            BENCH_WORKER_RECORD=str(records_dir / f"worker-{index}.json"),
        )
        log = (records_dir / f"worker-{index}.log").open("w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=records_dir))
    statuses = [process.wait() for process in processes]
    wall_s = time.perf_counter() - started
    peak_connections = connections.stop()
    if any(statuses):
        raise SystemExit(f"{count} workers: exit statuses {statuses}; see {records_dir}")
    records = [json.loads(path.read_text()) for path in sorted(records_dir.glob("worker-*.json"))]
    check = check_study(storage_url, study_name, server.url, n_trials)
    finished = check["trials_finished"]
    per_trial: dict[str, float] = defaultdict(float)
    calls_per_trial: dict[str, float] = defaultdict(float)
    machinery_per_trial: dict[str, float] = defaultdict(float)
    uploaded = 0
    latencies = []
    for record in records:
        for name, total in record["totals"].items():
            per_trial[name] += total["seconds"] / finished
            calls_per_trial[name] += total["calls"] / finished
        for name, calls in record.get("machinery_calls", {}).items():
            machinery_per_trial[name] += calls / finished
        uploaded += sum(record["uploaded_bytes"].values())
        latencies += [seconds for category, seconds in record["latencies"] if not category.startswith("http ")]
    server_side = server_latencies(server.access_log, log_offset)
    span_s = check["last_end"] - check["first_start"]
    return {
        "workers": count,
        "n_trials": n_trials,
        "wall_s": wall_s,
        "trials_per_minute": finished / span_s * 60,
        "trials_per_minute_with_start_up": finished / wall_s * 60,
        "storage_s_per_trial": sum(value for name, value in per_trial.items() if name.startswith("optuna")),
        "storage_s_per_trial_main_thread": sum(
            value for name, value in per_trial.items() if name.startswith("optuna") and "thread" not in name
        ),
        "mlflow_s_per_trial": sum(value for name, value in per_trial.items() if name.startswith("mlflow")),
        "seconds_per_trial_by_call": dict(sorted(per_trial.items(), key=lambda item: -item[1])),
        "calls_per_trial": dict(sorted(calls_per_trial.items(), key=lambda item: -item[1])),
        "machinery_calls_per_trial": dict(sorted(machinery_per_trial.items(), key=lambda item: -item[1])),
        "uploaded_bytes_per_trial": uploaded / finished,
        "client_latency_p50_ms": percentile(latencies, 50) * 1000,
        "client_latency_p99_ms": percentile(latencies, 99) * 1000,
        "server_latency_p50_ms": percentile(server_side, 50) * 1000,
        "server_latency_p99_ms": percentile(server_side, 99) * 1000,
        "requests": len(latencies),
        "peak_connections": peak_connections,
        "worker_peak_rss_bytes": max(record["max_rss_bytes"] for record in records),
        "worker_cpu_s": statistics.mean(record["cpu_s"] for record in records),
        **{key: check[key] for key in check if key not in ("first_start", "last_end")},
    }


def machinery_lines(row: dict) -> list[str]:
    """The table of the requests the run-keeping machinery made per trial, by endpoint."""
    machinery = row.get("machinery_calls_per_trial", {})
    api = sum(calls for name, calls in machinery.items() if not name.startswith("mlflow artifacts"))
    artifacts = sum(calls for name, calls in machinery.items() if name.startswith("mlflow artifacts"))
    lines = [
        "",
        f"The run-keeping machinery's requests per trial at {row['workers']} workers (the lease and heartbeat, "
        "status checks, the epoch ledger, the checkpoints: see `timed_worker.py`): "
        f"**{api:.1f} tracking API requests** and {artifacts:.1f} artifact uploads.",
        "",
        "| request | machinery calls/trial | all calls/trial |",
        "|---|---:|---:|",
    ]
    for name, calls in machinery.items():
        lines.append(f"| {name} | {calls:.1f} | {row['calls_per_trial'].get(name, 0):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4,8,12,16")
    parser.add_argument("--trials-per-worker", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--server-workers", type=int, default=2, help="gunicorn workers of the tracking server")
    parser.add_argument(
        "--results", default="workers", help="the results' name (another keeps workers.md and the traffic file)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    rows = []
    with PostgresServer(durable=True, max_connections=300) as database:
        storage_url = database.create_database("optuna_bench")
        mlflow_url = database.create_database("mlflow_bench")
        counter_url = database.url.rsplit("/", 1)[0] + "/postgres"
        access_log = root / "access.log"
        with tracking_server(
            root / "mlflow",
            workers=args.server_workers,
            backend_store_uri=mlflow_url,
            gunicorn_opts=f"--log-level warning --access-logfile {access_log} --access-logformat '{ACCESS_FORMAT}'",
        ) as server:
            server.access_log = access_log
            for count in (int(value) for value in args.counts.split(",")):
                print(f"{count} worker(s) ...", flush=True)
                row = run_count(count, args, storage_url, server, root, counter_url)
                rows.append(row)
                print(
                    f"  {row['trials_per_minute']:.1f} trials/min; storage {row['storage_s_per_trial']:.3f} s and "
                    f"MLflow {row['mlflow_s_per_trial']:.3f} s per trial; server p50/p99 "
                    f"{row['server_latency_p50_ms']:.1f}/{row['server_latency_p99_ms']:.1f} ms; connections "
                    f"{row['peak_connections']}; lost {row['trials_lost']}, repeated {row['trials_repeated']}, "
                    f"running {row['runs_left_running']}",
                    flush=True,
                )
    peak_rss = max(row["worker_peak_rss_bytes"] for row in rows)
    fit = int(24 * GIB // peak_rss)
    lines = [
        "# Many search workers on one PostgreSQL and one `mlflow server`\n",
        f"Generated by `python benchmarks/bench_workers.py`: real `search` workers on one machine "
        f"({rows[0]['n_trials'] // rows[0]['workers']} trials each, {args.examples} training examples, "
        f"{args.epochs} epochs), one new study per count; tracking server with {args.server_workers} gunicorn "
        "workers, backed by PostgreSQL (fsync on). Seconds per trial are summed over the trial's calls, "
        "including those of background threads.\n",
        "| workers | trials/min | storage s/trial | MLflow s/trial | server p50 / p99 ms | client p50 / p99 ms "
        "| DB connections (optuna + mlflow) | lost / repeated / left RUNNING |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        connections = row["peak_connections"]
        lines.append(
            f"| {row['workers']} | {row['trials_per_minute']:.1f} | {row['storage_s_per_trial']:.3f} | "
            f"{row['mlflow_s_per_trial']:.3f} | "
            f"{row['server_latency_p50_ms']:.1f} / {row['server_latency_p99_ms']:.1f} "
            f"| {row['client_latency_p50_ms']:.1f} / {row['client_latency_p99_ms']:.1f} | "
            f"{connections.get('optuna_bench', 0)} + {connections.get('mlflow_bench', 0)} | "
            f"{row['trials_lost']} / {row['trials_repeated']} / {row['runs_left_running']} |"
        )
    top = rows[-1]
    lines += [
        "",
        f"A worker's peak memory: {peak_rss / GIB:.2f} GiB (resident), so about {fit} workers fit in 24 GB "
        "beside nothing else.",
        "",
        f"Where a trial's client time goes, at {top['workers']} workers (seconds per trial, calls per trial):",
        "",
        "| call | s/trial | calls/trial |",
        "|---|---:|---:|",
    ]
    for name, seconds in list(top["seconds_per_trial_by_call"].items())[:16]:
        lines.append(f"| {name} | {seconds:.4f} | {top['calls_per_trial'][name]:.1f} |")
    lines += machinery_lines(top)
    record_results(
        args.results,
        {
            "counts": [row["workers"] for row in rows],
            "trials_per_worker": args.trials_per_worker,
            "epochs": args.epochs,
            "examples": args.examples,
            "server_workers": args.server_workers,
            "workers_in_24_gb": fit,
            "rows": rows,
        },
        "\n".join(lines) + "\n",
    )
    if args.results != "workers":
        return
    # The traffic of one worker alone (the first count), for bench_load.py to replay.
    alone = rows[0]
    (RESULTS_DIR / "worker_traffic.json").write_text(
        json.dumps(
            {
                "from_workers": alone["workers"],
                "trial_seconds": alone["workers"] * 60 / alone["trials_per_minute"],
                "calls_per_trial": alone["calls_per_trial"],
                "seconds_per_trial_by_call": alone["seconds_per_trial_by_call"],
                "uploaded_bytes_per_trial": alone["uploaded_bytes_per_trial"],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
