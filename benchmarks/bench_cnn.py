"""The MNIST CNN: training speed against the notebook way, and serving speed of the logged model.

Training, side by side in one run, each variant in a fresh process:
(a) the plain notebook way: NumPy arrays (scaled to [0, 1]) into ``model.fit``, batch 32,
    SGD 0.1, no tracking;
(b) this project's ``cnn`` entry point with tracking to a real ``mlflow server`` on loopback.
Seconds per epoch: the median over epochs 2 to N (epoch 1 holds tracing and compilation);
with ``--repeats`` the two variants alternate, because the machine is noisy.

Serving, against a real ``mlflow models serve`` process of the model trained in (b):
latency p50/p99 of one image at concurrency 1, and images per second for batches of 100 at
concurrency 4; compared with calling the same loaded model in process.

    python benchmarks/bench_cnn.py --epochs 3 --repeats 2
"""

from __future__ import annotations

import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import (
    WORK_DIR, alternate_notebook_and_project, benchmark_parser, compare, comparison_rows, epoch_timer,
    parse_benchmark_args, write_results,
)

# The arithmetic floor: about 8.2 MFLOP per training example, 60,000 examples, ~190 GFLOP/s
# peak on two AVX2 cores (EXPERIMENTS.md).
FLOOR_S_PER_EPOCH = 2.6


def notebook_way(args) -> dict[str, list[float]]:
    import keras

    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits

    splits = load_splits(DataConfig())
    train_images = splits.train_images.astype("float32") / 255.0
    validation_images = splits.validation_images.astype("float32") / 255.0
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: dict[str, list[float]] = {}
    model.fit(
        train_images, splits.train_labels, batch_size=32, epochs=args.epochs,
        validation_data=(validation_images, splits.validation_labels), verbose=2, callbacks=[epoch_timer(times)],
    )
    return times


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))


def serving_benchmark(model_uri: str, tracking_uri: str, images: np.ndarray, single_requests: int, batch_requests: int) -> dict:
    import mlflow
    import requests

    from harness.servers import ServerProcess, free_port, python_env

    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port),
    ]
    one = {"inputs": images[:1].tolist()}
    hundred = {"inputs": images[:100].tolist()}
    results: dict = {}
    with ServerProcess(command, port, WORK_DIR / "serve", "/ping", env=python_env(tracking_uri)) as server:
        url = server.url + "/invocations"
        session = requests.Session()
        for _ in range(10):  # warm-up
            session.post(url, json=one, timeout=60).raise_for_status()
        latencies = []
        for _ in range(single_requests):
            start = time.perf_counter()
            session.post(url, json=one, timeout=60).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
        results["http_single_image_ms_p50"] = percentile(latencies, 50)
        results["http_single_image_ms_p99"] = percentile(latencies, 99)

        def post_batch(_):
            with requests.Session() as own:
                own.post(url, json=hundred, timeout=120).raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(post_batch, range(4)))  # warm-up
            start = time.perf_counter()
            list(pool.map(post_batch, range(batch_requests)))
            results["http_batch100_concurrency4_images_per_s"] = batch_requests * 100 / (time.perf_counter() - start)

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    for _ in range(10):
        model.predict(images[:1])
    latencies = []
    for _ in range(single_requests):
        start = time.perf_counter()
        model.predict(images[:1])
        latencies.append((time.perf_counter() - start) * 1000)
    results["in_process_single_image_ms_p50"] = percentile(latencies, 50)
    results["in_process_single_image_ms_p99"] = percentile(latencies, 99)
    start = time.perf_counter()
    for _ in range(batch_requests):
        model.predict(images[:100])
    results["in_process_batch100_images_per_s"] = batch_requests * 100 / (time.perf_counter() - start)
    return results


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=3, default_repeats=2)
    parser.add_argument("--single-requests", type=int, default=200)
    parser.add_argument("--batch-requests", type=int, default=40)
    args = parse_benchmark_args(parser, notebook_way)
    if args is None:
        return

    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits
    from harness.servers import tracking_server

    with tracking_server(WORK_DIR / "mlflow-cnn") as server:
        notebook_times, project_times, runs = alternate_notebook_and_project(
            __file__, args.repeats, args.epochs, "cnn", ["--register_as", ""], server.url, "benchmark-cnn"
        )
        run = runs[-1]
        print("== serving", flush=True)
        images = load_splits(DataConfig(max_train_examples=1)).test_images[:100].astype(np.float32)
        serving = serving_benchmark(
            f"runs:/{run.info.run_id}/model", server.url, images, args.single_requests, args.batch_requests
        )

    comparison = compare(notebook_times, project_times)
    project_s = comparison["wall"]["project"]["median"]
    result = {
        "benchmark": "MNIST CNN 32-32 conv, 64-64 dense, SGD 0.1, batch 32, full MNIST; serving of its logged model",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "notebook_epoch_seconds": notebook_times,
        "project_epoch_seconds": project_times,
        "comparison": comparison,
        "floor_s_per_epoch": FLOOR_S_PER_EPOCH,
        "project_over_floor": project_s / FLOOR_S_PER_EPOCH,
        "project_test_accuracy": [project_run.data.metrics["test_accuracy"] for project_run in runs],
        "serving": serving,
    }
    table = (
        f"| CNN training, full MNIST | wall s per epoch: median (mean) of epochs 2-{args.epochs}, {args.repeats} run(s) each "
        "| CPU s per epoch (median) |\n|---|---|---|\n"
        + comparison_rows(
            comparison, "notebook way (NumPy arrays into fit, no tracking)", "project `cnn` entry point, tracking to a real mlflow server"
        )
        + f"| arithmetic floor (2 AVX2 cores) | {FLOOR_S_PER_EPOCH} ({project_s / FLOOR_S_PER_EPOCH:.1f}x above it) | |\n\n"
        "| serving the logged CNN | `mlflow models serve` (HTTP) | same model in process |\n|---|---|---|\n"
        f"| 1 image, concurrency 1: p50 latency | {serving['http_single_image_ms_p50']:.1f} ms | {serving['in_process_single_image_ms_p50']:.1f} ms |\n"
        f"| 1 image, concurrency 1: p99 latency | {serving['http_single_image_ms_p99']:.1f} ms | {serving['in_process_single_image_ms_p99']:.1f} ms |\n"
        f"| batches of 100: images per second | {serving['http_batch100_concurrency4_images_per_s']:.0f} (concurrency 4) | {serving['in_process_batch100_images_per_s']:.0f} (one caller) |\n"
    )
    write_results("cnn", result, table)


if __name__ == "__main__":
    main()
