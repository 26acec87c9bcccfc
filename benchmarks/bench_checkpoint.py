"""What a checkpoint costs per epoch, and what resuming a killed CNN run saves.

    python benchmarks/bench_checkpoint.py                 # about 15 minutes on 2 cores

Against a real `mlflow server` on loopback (gunicorn, sqlite, a local artifact root):

1. **Per-epoch cost.** The dense baseline and the CNN, full data, run as the entry points,
   ``checkpoint`` true and false alternating. A checkpoint is written after an epoch's timer
   stops and uploaded in the background, so what it costs training is the time the fit
   spends outside its epochs: ``train_time_s`` less the sum of ``epoch_time_s``. The cost per
   epoch is that time with checkpoints less that time without, over the epochs. (The
   difference of whole fits is shown too; it carries the epochs' own spread.)
2. **Bytes.** The size of one epoch's checkpoint (one slot, and the best weights).
3. **Resuming.** A default CNN run (15 epochs) is killed with SIGKILL once epoch 12 is
   checkpointed; the same command is started again and resumes. The time saved is the
   from-scratch run's wall time less the resumed command's.

Results: ``benchmarks/results/checkpoint.md`` and ``.json``.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROJECT_DIR, benchmark_parser, record_results

from harness.servers import python_env, tracking_server

DENSE = str(PROJECT_DIR / "entrypoints" / "dense.py")
CNN = str(PROJECT_DIR / "entrypoints" / "cnn.py")


def _run(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=tempfile.mkdtemp())
    return time.perf_counter() - started


def _newest_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]


def _checkpoint_bytes(client, run_id: str) -> int:
    """One slot's files and the best weights: what resuming downloads."""
    slot = client.get_run(run_id).data.tags["mnist_mlflow.checkpoint_slot"]
    items = [*client.list_artifacts(run_id, f"checkpoint/{slot}"), *client.list_artifacts(run_id, "checkpoint/best")]
    return sum(item.file_size or 0 for item in items if not item.is_dir)


def _outside_epochs_s(client, run) -> float:
    epochs = client.get_metric_history(run.info.run_id, "epoch_time_s")
    return run.data.metrics["train_time_s"] - sum(point.value for point in epochs)


def per_epoch_cost(server_url: str, client, name: str, command: list[str], epochs: int, repeats: int) -> dict:
    """train_time_s with and without checkpoints, alternating; the difference per epoch."""
    times: dict[str, list[float]] = {"true": [], "false": []}
    outside: dict[str, list[float]] = {"true": [], "false": []}
    sizes = []
    for repeat in range(repeats):
        for setting in ("true", "false"):
            experiment = f"bench-checkpoint-{name}-{setting}"
            env = python_env(server_url, MLFLOW_EXPERIMENT_NAME=experiment)
            _run(
                [sys.executable, *command, "--epochs", str(epochs), "--checkpoint", setting, "--seed", str(repeat)], env
            )
            run = _newest_run(client, experiment)
            times[setting].append(run.data.metrics["train_time_s"])
            outside[setting].append(_outside_epochs_s(client, run))
            if setting == "true":
                sizes.append(_checkpoint_bytes(client, run.info.run_id))
            print(
                f"{name} repeat {repeat + 1} checkpoint={setting}: fit {times[setting][-1]:.2f} s, "
                f"outside epochs {outside[setting][-1]:.3f} s",
                flush=True,
            )
    return {
        "epochs": epochs,
        "fit_s_with": times["true"],
        "fit_s_without": times["false"],
        "outside_epochs_s_with": outside["true"],
        "outside_epochs_s_without": outside["false"],
        "cost_per_epoch_s": [(on - off) / epochs for on, off in zip(outside["true"], outside["false"])],
        "fit_difference_per_epoch_s": [(on - off) / epochs for on, off in zip(times["true"], times["false"])],
        "checkpoint_bytes": sizes,
        "epoch_s": [off / epochs for off in times["false"]],
    }


def resume_saving(server_url: str, client) -> dict:
    """Kills a default CNN run after epoch 12 of 15, resumes it, and times both ways."""
    experiment = "bench-checkpoint-resume"
    env = python_env(server_url, MLFLOW_EXPERIMENT_NAME=experiment)
    command = [sys.executable, CNN, "--register_as", ""]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        time.sleep(1)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and int(runs[0].data.tags.get("mnist_mlflow.checkpoint_epoch", "-1")) >= 11:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after_s = time.perf_counter() - started
    resumed_s = _run(command, env)
    scratch_s = _run(command, python_env(server_url, MLFLOW_EXPERIMENT_NAME=experiment + "-scratch"))
    resumed = client.get_run(runs[0].info.run_id)
    scratch = _newest_run(client, experiment + "-scratch")
    return {
        "killed_after_s": killed_after_s,
        "resumed_command_s": resumed_s,
        "from_scratch_command_s": scratch_s,
        "saved_s": scratch_s - resumed_s,
        "same_test_accuracy": resumed.data.metrics["test_accuracy"] == scratch.data.metrics["test_accuracy"],
    }


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=3, default_repeats=3)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    with tracking_server(Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))) as server:
        client = MlflowClient(server.url)
        results = {
            "dense": per_epoch_cost(server.url, client, "dense", [DENSE], args.epochs + 2, args.repeats),
            "cnn": per_epoch_cost(server.url, client, "cnn", [CNN, "--register_as", ""], args.epochs, args.repeats),
            "resume": resume_saving(server.url, client),
        }

    def spread(values: list[float], scale: float = 1000, unit: str = "ms", digits: int = 0) -> str:
        values = [value * scale for value in values]
        low, middle, high = min(values), statistics.median(values), max(values)
        return f"{middle:.{digits}f} {unit} ({low:.{digits}f} to {high:.{digits}f})"

    rows = []
    for name in ("dense", "cnn"):
        result = results[name]
        size = statistics.median(result["checkpoint_bytes"]) / 1e6
        epoch = statistics.median(result["epoch_s"])
        cost = statistics.median(result["cost_per_epoch_s"])
        rows.append(
            f"| {name} (default config, full data) | {spread(result['epoch_s'], 1, 's', 2)} | "
            f"{spread(result['cost_per_epoch_s'])} | {100 * cost / epoch:.1f}% | "
            f"{spread(result['fit_difference_per_epoch_s'])} | {size:.2f} MB |"
        )
    resume = results["resume"]
    table = "\n".join(
        [
            "# Checkpoints: cost per epoch, and what resuming saves",
            "",
            f"`python benchmarks/bench_checkpoint.py --epochs {args.epochs} --repeats {args.repeats}`; "
            "checkpoint on and off alternating, median (min to max) of the repeats.",
            "",
            "| run | fit time per epoch, without | checkpoint cost per epoch | share of an epoch | "
            "whole fits' difference per epoch | checkpoint size |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "A default CNN run (15 epochs) killed with SIGKILL after epoch 12 and started again:",
            "",
            f"- the resumed command took {resume['resumed_command_s']:.0f} s; from scratch it took "
            f"{resume['from_scratch_command_s']:.0f} s; saved: {resume['saved_s']:.0f} s;",
            f"- the resumed run's test accuracy equals the uninterrupted run's: {resume['same_test_accuracy']}.",
            "",
        ]
    )
    record_results("checkpoint", {"args": vars(args), **results}, table)


if __name__ == "__main__":
    main()
