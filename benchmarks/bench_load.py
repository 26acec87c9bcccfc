"""Simulated search workers, past what one machine can start: where the database or the server saturates.

    python benchmarks/bench_workers.py     # first: records one real worker's traffic
    python benchmarks/bench_load.py        # 10 to 200 simulated workers; about 15 minutes

A simulated worker replays, with no TensorFlow, the storage and tracking traffic that one real
worker recorded in ``benchmarks/results/worker_traffic.json``: per trial, the same Optuna
storage calls (ask, user attributes, intermediate values, heartbeats, reads of all trials,
tell) and the same MLflow requests (run creation, metric batches, tags, reads, artifact
uploads of the same size, run end), spread evenly over the real trial's duration, the time the
real worker spent training. Simulated workers are threads, spread over several processes, each
with its own storage connection pool and its own MLflow client, as separate workers would have.

Set-ups, alternating in one run:

- ``direct``: each worker opens the PostgreSQL storage itself (the project's bounded pool);
- ``grpc``: each worker talks to one Optuna gRPC storage proxy (``run_grpc_proxy_server``),
  which alone holds database connections. Optuna's proxy has no heartbeats, so these workers
  send none.

And at 100 workers, the tracking server's options: gunicorn workers (2, 4, 8), and the client's
metric logging (one ``log_batch`` per epoch, as MLflow's autolog does; one ``log_metric`` per
value; ``log_batch(synchronous=False)``, MLflow's async logging).

For each it reports trials per minute against what the workers asked for, storage and tracking
latency (p50, p99), errors, database connections, and the CPU seconds each part used per trial
(the tracking server, PostgreSQL, the proxy, the simulator), which says what saturates first
and lets a larger machine's capacity be estimated. Everything shares this machine's cores.

Results: ``benchmarks/results/load.md`` and ``.json``.
"""

# Every lambda below is called at once by timed(), inside the loop that binds its variables.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from common import RESULTS_DIR, ConnectionCounter, percentile, record_results

from harness.servers import PostgresServer, free_port, python_env, tracking_server

METRICS_PER_BATCH = 8
PROCESSES = 4
WARM_UP_S = 20


class CpuMeter:
    """CPU seconds used by process trees (a server and its workers), sampled so that short-lived
    children count too."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        import psutil

        self.psutil = psutil
        self.roots = pids
        self.seen: dict[str, dict[int, float]] = {name: {} for name in pids}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, pids in self.roots.items():
            for root in pids:
                try:
                    family = [self.psutil.Process(root), *self.psutil.Process(root).children(recursive=True)]
                except self.psutil.NoSuchProcess:
                    continue
                for process in family:
                    try:
                        times = process.cpu_times()
                        self.seen[name][process.pid] = times.user + times.system
                    except self.psutil.NoSuchProcess:
                        pass

    def _run(self) -> None:
        while not self.stopped.is_set():
            self._sample()
            self.stopped.wait(0.5)

    def total(self) -> dict[str, float]:
        self._sample()
        return {name: sum(seen.values()) for name, seen in self.seen.items()}

    def start(self) -> CpuMeter:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def replay_plan(traffic: dict) -> list[str]:
    """The calls one trial makes between ask and tell, in an even mix, by the recorded counts."""
    plan = []
    for name, calls in traffic["calls_per_trial"].items():
        action = ACTIONS.get(name.replace(" (heartbeat-thread)", ""))
        if action:
            plan += [action] * max(0, round(calls))
    # Interleave kinds, as a trial does, rather than all of one kind together.
    plan.sort(key=lambda kind: hash(kind) % 7)
    ordered, kinds = [], defaultdict(list)
    for kind in plan:
        kinds[kind].append(kind)
    while any(kinds.values()):
        for kind in list(kinds):
            if kinds[kind]:
                ordered.append(kinds[kind].pop())
    return ordered


# Recorded call -> what the simulated worker does.
ACTIONS = {
    "optuna get_all_trials": "storage read all",
    "optuna get_trial": "storage read trial",
    "optuna set_trial_user_attr": "storage user attr",
    "optuna set_trial_intermediate_value": "storage report",
    "optuna record_heartbeat": "storage heartbeat",
    "optuna get_study_user_attrs": "storage study attrs",
    "mlflow runs/log-batch": "tracking metrics",
    "mlflow runs/set-tag": "tracking tag",
    "mlflow runs/get": "tracking get run",
    "mlflow metrics/get-history": "tracking history",
    "mlflow artifacts PUT": "tracking artifact",
    "mlflow runs/search": "tracking search",
}


def traffic_calls(traffic: dict, side: str) -> int:
    """The calls of one replayed trial on one side (tracking or storage), with creation and end."""
    return sum(kind.startswith(side) for kind in replay_plan(traffic)) + 2


def simulated_workers(index: int, threads: int, options: dict, out_path: str) -> None:
    """One process of ``threads`` simulated workers; writes what they measured to ``out_path``."""
    import mlflow
    import optuna
    from mlflow.entities import Metric

    sys.path.insert(0, options["project_dir"])
    from mnist_mlflow.studies import study_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow's async-logging flush goes through its fluent API: point that at the server too.
    mlflow.set_tracking_uri(options["tracking_uri"])
    traffic = options["traffic"]
    plan = replay_plan(traffic)
    gap_s = traffic["trial_seconds"] / (len(plan) + 1)
    artifact_size = int(
        traffic["uploaded_bytes_per_trial"] / max(1, round(traffic["calls_per_trial"].get("mlflow artifacts PUT", 1)))
    )
    artifact = Path(tempfile.mkdtemp()) / "model.bin"
    artifact.write_bytes(os.urandom(artifact_size))
    latencies: dict[str, list[tuple[float, float]]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    finished: list[float] = []
    lock = threading.Lock()
    start_at, end_at = options["start_at"], options["end_at"]
    distributions = {
        "units": optuna.distributions.CategoricalDistribution([32, 64, 128, 256]),
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
        "batch_size": optuna.distributions.CategoricalDistribution([16, 32, 64, 128]),
        "activation": optuna.distributions.CategoricalDistribution(["relu", "tanh", "sigmoid"]),
    }

    def worker(number: int) -> None:
        time.sleep(max(0.0, start_at - time.time()) + (number % 50) * 0.1)
        if options["setup"] == "grpc":
            storage = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=options["proxy_port"])
        else:
            storage = study_storage.open_storage(options["storage_url"])
        study = optuna.load_study(
            study_name=options["study_name"], storage=storage, sampler=optuna.samplers.RandomSampler(seed=number)
        )
        client = mlflow.MlflowClient(options["tracking_uri"])
        mode = options["metric_logging"]

        def timed(kind: str, call) -> None:
            started = time.perf_counter()
            try:
                call()
            except Exception as error:  # noqa: BLE001 - counted and reported, the worker goes on
                with lock:
                    errors[f"{kind}: {type(error).__name__}: {str(error)[:80]}"] += 1
            with lock:
                latencies[kind].append((time.time(), time.perf_counter() - started))

        while time.time() < end_at:
            trial_started = time.time()
            holder = {}
            timed("storage ask", lambda: holder.update(trial=study.ask(distributions)))
            if "trial" not in holder:
                time.sleep(1)
                continue
            trial = holder["trial"]
            trial_id = trial._trial_id
            timed(
                "tracking create run",
                lambda: holder.update(
                    run=client.create_run(
                        options["experiment_id"], tags={"mlflow.parentRunId": options["parent_run_id"]}
                    )
                ),
            )
            run_id = holder["run"].info.run_id if "run" in holder else None
            step = [0]
            for kind in plan:
                time.sleep(gap_s)
                if kind.startswith("tracking") and run_id is None:
                    continue
                if kind == "storage read all":
                    timed(kind, lambda: storage.get_all_trials(study._study_id, deepcopy=False))
                elif kind == "storage read trial":
                    timed(kind, lambda: storage.get_trial(trial_id))
                elif kind == "storage user attr":
                    timed(kind, lambda: storage.set_trial_user_attr(trial_id, f"attr{step[0] % 10}", 1.0))
                elif kind == "storage report":
                    timed(kind, lambda: storage.set_trial_intermediate_value(trial_id, step[0], 0.9))
                    step[0] += 1
                elif kind == "storage heartbeat":
                    if options["setup"] != "grpc":
                        timed(kind, lambda: storage.record_heartbeat(trial_id))
                elif kind == "storage study attrs":
                    timed(kind, lambda: storage.get_study_user_attrs(study._study_id))
                elif kind == "tracking metrics":
                    now = int(time.time() * 1000)
                    metrics = [Metric(f"m{k}", 0.5, now, step[0]) for k in range(METRICS_PER_BATCH)]
                    if mode == "log_metric":
                        for metric in metrics:
                            timed(kind, lambda m=metric: client.log_metric(run_id, m.key, m.value, m.timestamp, m.step))
                    elif mode == "async":
                        timed(kind, lambda: client.log_batch(run_id, metrics=metrics, synchronous=False))
                    else:
                        timed(kind, lambda: client.log_batch(run_id, metrics=metrics))
                elif kind == "tracking tag":
                    timed(kind, lambda: client.set_tag(run_id, "note", str(step[0])))
                elif kind == "tracking get run":
                    timed(kind, lambda: client.get_run(run_id))
                elif kind == "tracking history":
                    timed(kind, lambda: client.get_metric_history(run_id, "m0"))
                elif kind == "tracking artifact":
                    timed(kind, lambda: client.log_artifact(run_id, str(artifact), "model"))
                elif kind == "tracking search":
                    timed(
                        kind,
                        lambda: client.search_runs(
                            [options["experiment_id"]],
                            f"tags.mlflow.parentRunId = '{options['parent_run_id']}'",
                            max_results=50,
                        ),
                    )
            if mode == "async" and run_id is not None:
                timed("tracking flush", lambda: mlflow.flush_async_logging())
            timed("storage tell", lambda: study.tell(trial, 0.9))
            if run_id is not None:
                timed("tracking end run", lambda: client.set_terminated(run_id))
            with lock:
                finished.append((trial_started, time.time()))

    pool = [threading.Thread(target=worker, args=(index * threads + number,)) for number in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    Path(out_path).write_text(json.dumps({"latencies": dict(latencies), "errors": dict(errors), "finished": finished}))


def start_proxy(storage_url: str, project_dir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    code = (
        "import sys; sys.path.insert(0, sys.argv[3]);"
        "import optuna; from mnist_mlflow.studies import study_storage;"
        "optuna.storages.run_grpc_proxy_server(study_storage.open_storage(sys.argv[1]), "
        "host='127.0.0.1', port=int(sys.argv[2]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, storage_url, str(port), project_dir],
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import optuna

    optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=60)
    return process, port


def run_setup(workers: int, setup: str, metric_logging: str, server, database, storage_url: str, args, traffic):
    """``workers`` simulated workers for the measuring window; what they achieved."""
    import mlflow
    import optuna

    study_name = f"load-{setup}-{metric_logging}-{workers}-{int(time.time())}"
    optuna.create_study(study_name=study_name, storage=storage_url, direction="maximize")
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name("bench-load")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("bench-load")
    parent = client.create_run(experiment_id, run_name=study_name)
    proxy, proxy_port = (None, None)
    if setup == "grpc":
        proxy, proxy_port = start_proxy(storage_url, args.project_dir)
    start_at = time.time() + 3
    window_start = start_at + WARM_UP_S
    end_at = window_start + args.window
    options = {
        "setup": setup,
        "metric_logging": metric_logging,
        "traffic": traffic,
        "storage_url": storage_url,
        "proxy_port": proxy_port,
        "study_name": study_name,
        "tracking_uri": server.url,
        "experiment_id": experiment_id,
        "parent_run_id": parent.info.run_id,
        "start_at": start_at,
        "end_at": end_at,
        "project_dir": args.project_dir,
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-load-"))
    meter = CpuMeter(
        {
            "tracking server": [server.process.pid],
            "postgresql": [database.postmaster_pid()],
            **({"grpc proxy": [proxy.pid]} if proxy else {}),
        }
    )
    per_process = [workers // PROCESSES + (1 if index < workers % PROCESSES else 0) for index in range(PROCESSES)]
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=simulated_workers, args=(index, count, options, str(folder / f"{index}.json")))
        for index, count in enumerate(per_process)
        if count
    ]
    for process in processes:
        process.start()
    meter.start()
    peak = ConnectionCounter(database.url.rsplit("/", 1)[0] + "/postgres", interval_s=0.5).start()
    time.sleep(max(0.0, window_start - time.time()))
    cpu_before = meter.total()
    simulator_before = _children_cpu(processes)
    time.sleep(max(0.0, end_at - time.time()))
    cpu_after = meter.total()
    simulator_after = _children_cpu(processes)
    for process in processes:
        process.join(300)
    meter.stop()
    connections = peak.stop()
    if proxy:
        proxy.terminate()
        proxy.wait(10)
    client.set_terminated(parent.info.run_id)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    finished = 0
    durations = []
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        for kind, points in record["latencies"].items():
            latencies[kind] += [seconds for at, seconds in points if window_start <= at <= end_at]
        for kind, count in record["errors"].items():
            errors[kind] += count
        done = [(start, end) for start, end in record["finished"] if window_start <= end <= end_at]
        finished += len(done)
        durations += [end - start for start, end in done]
    storage = [value for kind, values in latencies.items() if kind.startswith("storage") for value in values]
    tracking = [value for kind, values in latencies.items() if kind.startswith("tracking") for value in values]
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    cpu["simulator"] = simulator_after - simulator_before
    trials_per_minute = finished / args.window * 60
    # Calls answered per second in the window: the throughput of each side, even when the
    # trials themselves grow longer than the window.
    tracking_calls = sum(len(values) for kind, values in latencies.items() if kind.startswith("tracking"))
    storage_calls = sum(len(values) for kind, values in latencies.items() if kind.startswith("storage"))
    trials_equivalent = tracking_calls / max(1, traffic_calls(traffic, "tracking"))
    return {
        "workers": workers,
        "setup": setup,
        "metric_logging": metric_logging,
        "server_workers": server.gunicorn_workers,
        "asked_trials_per_minute": workers * 60 / traffic["trial_seconds"],
        "trials_per_minute": trials_per_minute,
        "mean_trial_s": sum(durations) / len(durations) if durations else None,
        "tracking_calls_per_s": tracking_calls / args.window,
        "storage_calls_per_s": storage_calls / args.window,
        "trials_per_minute_from_calls": trials_equivalent / args.window * 60,
        "storage_p50_ms": percentile(storage, 50) * 1000,
        "storage_p99_ms": percentile(storage, 99) * 1000,
        "tracking_p50_ms": percentile(tracking, 50) * 1000,
        "tracking_p99_ms": percentile(tracking, 99) * 1000,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "peak_connections": connections,
        "cpu_share": {name: seconds / args.window for name, seconds in cpu.items()},
        # Per trial's worth of tracking calls, so that a window of long trials still counts.
        "cpu_s_per_trial": {name: seconds / max(1.0, trials_equivalent) for name, seconds in cpu.items()},
    }


def _children_cpu(processes) -> float:
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = psutil.Process(process.pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,25,50,100,200")
    parser.add_argument("--setups", default="direct,grpc")
    parser.add_argument("--window", type=float, default=40.0, help="seconds measured, after a warm-up")
    parser.add_argument("--max-connections", type=int, default=500, help="PostgreSQL's max_connections")
    parser.add_argument("--server-options", default="2,4,8", help="gunicorn workers compared at 100 workers")
    parser.add_argument("--skip-options", action="store_true")
    args = parser.parse_args()
    args.project_dir = str(Path(__file__).resolve().parent.parent)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    traffic = json.loads((RESULTS_DIR / "worker_traffic.json").read_text())
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    rows = []
    with PostgresServer(durable=True, max_connections=args.max_connections) as database:
        storage_url = database.create_database("optuna_load")
        mlflow_url = database.create_database("mlflow_load")

        def measure(workers, setup, metric_logging, server):
            print(
                f"{workers} simulated workers, {setup} storage, {metric_logging}, "
                f"{server.gunicorn_workers} gunicorn workers ...",
                flush=True,
            )
            row = run_setup(workers, setup, metric_logging, server, database, storage_url, args, traffic)
            print(f"  {json.dumps({key: row[key] for key in row if key != 'errors'})}", flush=True)
            if row["errors"]:
                print(f"  errors: {row['errors']}", flush=True)
            rows.append(row)

        def server_with(gunicorn_workers: int):
            server = tracking_server(
                root / f"mlflow-{gunicorn_workers}", workers=gunicorn_workers, backend_store_uri=mlflow_url
            )
            server.gunicorn_workers = gunicorn_workers
            return server

        with server_with(2) as server:
            for workers in (int(value) for value in args.counts.split(",")):
                for setup in args.setups.split(","):
                    measure(workers, setup, "log_batch", server)
            if not args.skip_options:
                for metric_logging in ("log_metric", "async", "log_batch"):
                    measure(100, "direct", metric_logging, server)
        if not args.skip_options:
            for gunicorn_workers in (int(value) for value in args.server_options.split(",")):
                if gunicorn_workers == 2:
                    continue
                with server_with(gunicorn_workers) as server:
                    measure(100, "direct", "log_batch", server)
    record_results("load", {"traffic": traffic, "window_s": args.window, "rows": rows}, load_table(rows, traffic, args))


def load_table(rows: list[dict], traffic: dict, args) -> str:
    lines = [
        "# Simulated search workers: where one PostgreSQL and one `mlflow server` saturate\n",
        f"Generated by `python benchmarks/bench_load.py`. Each simulated worker replays one real worker's "
        f"traffic per trial (`worker_traffic.json`, a {traffic['trial_seconds']:.1f} s trial), with no "
        f"TensorFlow; {args.window:.0f} s measured after a {WARM_UP_S} s warm-up, set-ups alternating in one "
        "run. The simulator, the server, the proxy and PostgreSQL (fsync on) share this machine's cores, "
        "so the CPU seconds per trial of each part are the figures to carry to a larger machine. Trials per "
        "minute are counted from the tracking calls answered in the window (a trial's worth each), since "
        "under saturation a trial outlasts the window; `trial s` is the mean time of the trials that "
        "ended in it.\n",
        "| workers | storage | metrics | gunicorn | trials/min done (asked) | tracking calls/s | trial s | "
        "storage p50 / p99 ms | tracking p50 / p99 ms | errors | DB connections | "
        "CPU s/trial: server, PostgreSQL, proxy |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = row["cpu_s_per_trial"]
        connections = sum(row["peak_connections"].values())
        lines.append(
            f"| {row['workers']} | {row['setup']} | {row['metric_logging']} | {row['server_workers']} | "
            f"{row['trials_per_minute_from_calls']:.0f} ({row['asked_trials_per_minute']:.0f}) | "
            f"{row['tracking_calls_per_s']:.0f} | "
            + (f"{row['mean_trial_s']:.1f}" if row["mean_trial_s"] else f"> {args.window:.0f}")
            + " | "
            f"{row['storage_p50_ms']:.1f} / {row['storage_p99_ms']:.0f} | "
            f"{row['tracking_p50_ms']:.1f} / {row['tracking_p99_ms']:.0f} | {row['error_count']} | {connections} | "
            f"{cpu.get('tracking server', 0):.3f}, {cpu.get('postgresql', 0):.3f}, {cpu.get('grpc proxy', 0):.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
