"""A hundred SIGTERMs at random moments of training: each must end the same way.

    python benchmarks/sigterm_loop.py                  # about 20 minutes on 2 cores
    python benchmarks/sigterm_loop.py --rounds 10      # a quick look

Against a real `mlflow server` on loopback, each round starts a small dense run as the entry
point, waits for its first checkpoint, waits a random time (0 to 2 s, seeded), and sends one
SIGTERM. A round passes when the process exits with status 143, prints exactly one line of
its own (``stopped: ...``) and no traceback, and its run ends KILLED with ``killed_reason``.
Two rounds run at a time, so a signal also meets a loaded machine.

Why: a SIGTERM raised inside TensorFlow's native code once aborted the process
(``free(): invalid next size``, SIGABRT, the run left RUNNING). The project now stops at the
next step boundary instead (``training.StopAtStepBoundary``).

Results: ``benchmarks/results/sigterm_loop.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import PROJECT_DIR, record_results

from harness.servers import python_env, tracking_server

DENSE = [
    sys.executable,
    str(PROJECT_DIR / "entrypoints" / "dense.py"),
    *["--epochs", "200", "--max_train_examples", "2000", "--dropout", "0.2"],
]
OWN_LINE_STARTS = ("error:", "stopped:", "interrupted")


def one_round(url: str, number: int, delay_s: float) -> dict:
    from mlflow.tracking import MlflowClient

    client, experiment = MlflowClient(url), f"sigterm-{number}"
    env = python_env(url, MLFLOW_EXPERIMENT_NAME=experiment)
    process = subprocess.Popen(
        DENSE, env=env, cwd=tempfile.mkdtemp(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    run = None
    while run is None and process.poll() is None and time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        run = next((item for item in runs if "mnist_mlflow.checkpoint_epoch" in item.data.tags), None)
        time.sleep(0.2)
    time.sleep(delay_s)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    lines = [line for line in stderr.splitlines() if line.startswith(OWN_LINE_STARTS)]
    status = client.get_run(run.info.run_id).info.status if run is not None else "no run"
    reason = client.get_run(run.info.run_id).data.tags.get("killed_reason") if run is not None else None
    passed = (
        process.returncode == 143
        and lines == ["stopped: terminated by SIGTERM; the runs of this process ended KILLED"]
        and "Traceback" not in stderr
        and status == "KILLED"
        and reason == "terminated by SIGTERM"
    )
    return {
        "round": number,
        "delay_s": round(delay_s, 3),
        "exit_status": process.returncode,
        "lines": lines,
        "status": status,
        "passed": passed,
        "stderr_tail": "" if passed else stderr[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    delays = [random.Random(number).uniform(0, 2) for number in range(args.rounds)]
    with tempfile.TemporaryDirectory(prefix="sigterm-loop-") as root:
        with tracking_server(Path(root)) as server:
            with ThreadPoolExecutor(args.parallel) as pool:
                rounds = pool.map(lambda number: one_round(server.url, number, delays[number]), range(args.rounds))
                results = list(rounds)
    passed = sum(result["passed"] for result in results)
    statuses: dict[str, int] = {}
    for result in results:
        statuses[str(result["exit_status"])] = statuses.get(str(result["exit_status"]), 0) + 1
    table = (
        "# SIGTERM at random moments of training\n\n"
        "Command: `python benchmarks/sigterm_loop.py"
        + (f" --rounds {args.rounds}" if args.rounds != 100 else "")
        + "`\n\n"
        f"| rounds | passed | exit statuses |\n|---|---|---|\n| {args.rounds} | {passed} | "
        + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        + " |\n\nA round passes on exit status 143, exactly one line of the project's own, no traceback, "
        "and a run KILLED with `killed_reason`.\n"
    )
    failed = [result for result in results if not result["passed"]]
    if failed:
        table += "\n## Failed rounds\n\n" + "\n".join(
            f"- round {result['round']} (delay {result['delay_s']} s): exit {result['exit_status']}, "
            f"run {result['status']}, lines {result['lines']}"
            for result in failed
        )
    record_results("sigterm_loop", {"rounds": args.rounds, "passed": passed, "results": results}, table)


if __name__ == "__main__":
    main()
