"""Serving speed: the project's logged model against MLflow's stock Keras flavour, both behind `mlflow models serve`.

    python benchmarks/bench_serving.py

One CNN of the default architecture (docs/experiments.md section 3, trained for one epoch: speed does
not depend on the weights) is logged twice into a throwaway store: as the project logs every
model (`tracking.log_keras_model`, the models-from-code pyfunc of `served_model.py`) and with
`mlflow.tensorflow.log_model`, MLflow's stock Keras flavour, with the same signature. Both are
served as real `mlflow models serve --env-manager local` processes on 127.0.0.1, one worker
each, and measured alternately, round after round, so that a busy moment of the machine hits
both sides alike:
- single images, one request at a time: p50 and p99 latency;
- batches of 100 images at concurrency 4: images per second, in the documented `inputs` form
  (nested 28x28x1 images, which both sides accept), and in each side's compact form of flat
  784-pixel rows: inside `inputs` for the project, and as one `dataframe_split` column for
  the stock server (which refuses flat rows in `inputs`; MLflow reshapes the column to its
  tensor signature).
Each figure is the median over rounds, with the spread (lowest and highest round). In-process
figures of each model's `predict` show how much of a request is HTTP, JSON and MLflow's input
handling. Results go to benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"
WORK_DIR = PROJECT_DIR / "benchmarks" / "work" / "serving"
SIDES = ("project", "stock")


def log_both_models(images: np.ndarray, labels: np.ndarray, tracking_uri: str) -> dict[str, str]:
    """Trains one small-budget CNN and logs it both ways; returns each side's model URI."""
    import keras
    import mlflow
    import tensorflow as tf

    from mnist_mlflow import models, tracking

    mlflow.set_tracking_uri(tracking_uri)
    keras.utils.set_random_seed(0)
    model = models.build_cnn_model((32, 32), kernel_size=3, dense_units=(64, 64))
    models.compile_model(model, "sgd", learning_rate=0.1, jit_compile=False)
    model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    model = models.prepare_for_inference(model)
    uris = {}
    with mlflow.start_run(run_name="serving-benchmark"):
        uris["project"] = tracking.log_keras_model(model, images[:5], name="project")
        signature = mlflow.models.infer_signature(images[:5].astype(np.float32), model.predict(images[:5], verbose=0))
        info = mlflow.tensorflow.log_model(
            model,
            name="stock",
            signature=signature,
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
            ],
        )
        uris["stock"] = info.model_uri
    return uris


def serve(model_uri: str, tracking_uri: str, name: str, threads: int = 0):
    from harness.servers import ServerProcess, free_port, python_env

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    env = python_env(tracking_uri, **({"MNIST_MLFLOW_SERVING_THREADS": str(threads)} if threads else {}))
    return ServerProcess(command, port, WORK_DIR / name, "/ping", env=env).start(timeout_s=300)


def single_latencies_ms(session, url: str, bodies: list[bytes]) -> list[float]:
    latencies = []
    for body in bodies:
        start = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        latencies.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return latencies


def batch_images_per_s(url: str, body: bytes, batches: int, concurrency: int = 4) -> float:
    import requests

    def post(_):
        with requests.Session() as session:
            session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=300).raise_for_status()

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(post, range(batches)))
        return batches * 100 / (time.perf_counter() - start)


def in_process(model_uri: str, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Each model's `predict` alone, loaded with `mlflow.pyfunc.load_model` and given a NumPy
    array, as MLflow's pyfunc contract says both take."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    singles = [images[index % len(images) :][:1] for index in range(repeats)]
    batch_of_100 = images[:100]
    for _ in range(5):
        model.predict(singles[0])
        model.predict(batch_of_100)
    single = []
    for one in singles:
        start = time.perf_counter()
        model.predict(one)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    for _ in range(max(5, repeats // 10)):
        model.predict(batch_of_100)
    batch = max(5, repeats // 10) * 100 / (time.perf_counter() - start)
    return {"in_process_single_ms_p50": float(np.percentile(single, 50)), "in_process_batch100_images_per_s": batch}


def request_decoding_ms(stock_body: bytes, project_body: bytes, repeats: int = 10) -> dict[str, float]:
    """Where a batch request's time goes before the model, measured in this process (which has
    TensorFlow, Keras and MLflow loaded, as a server has): MLflow's JSON parsing (its scoring
    server parses every body twice) of the stock request, with the garbage collector as the
    stock server leaves it, and of the project's request, with the collector frozen as the
    project's model leaves it; then the stock model's input conversion,
    mlflow.pyfunc.scoring_server's infer_and_parse_data against its tensor signature, which the
    project's model skips (its signature is marked as coming from a type hint, see served_model.py)."""
    import gc

    from mlflow.pyfunc.scoring_server import infer_and_parse_data
    from mlflow.types.schema import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1))])

    def timed(function) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            result = function()
        timed.result = result
        return (time.perf_counter() - start) / repeats * 1000

    parse_ms = timed(lambda: json.loads(stock_body))
    data = timed.result
    convert_ms = timed(lambda: infer_and_parse_data(data, schema))
    gc.collect()
    gc.freeze()
    try:
        frozen_parse_ms = timed(lambda: json.loads(project_body))
    finally:
        gc.unfreeze()
    return {
        "json_parse_ms": parse_ms,
        "json_parse_frozen_gc_ms": frozen_parse_ms,
        "mlflow_input_conversion_ms": convert_ms,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "low": min(values), "high": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each measuring both sides in turn")
    parser.add_argument("--single-requests", type=int, default=100, help="single-image requests per side and round")
    parser.add_argument("--batches", type=int, default=12, help="batches of 100 per side and round")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow threads per operation of the project's server (0: its default, 1)",
    )
    args = parser.parse_args()

    import requests

    from harness.servers import tracking_server
    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits

    splits = load_splits(DataConfig(max_train_examples=6000))
    test_images = splits.test_images.astype(np.float32)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with tracking_server(WORK_DIR / "tracking") as tracking:
        uris = log_both_models(splits.train_images, splits.train_labels, tracking.url)
        servers = {
            side: serve(uris[side], tracking.url, side, args.threads if side == "project" else 0) for side in SIDES
        }
        try:
            urls = {side: servers[side].url + "/invocations" for side in SIDES}
            sessions = {side: requests.Session() for side in SIDES}
            single_bodies = [
                json.dumps({"inputs": test_images[index : index + 1].tolist()}).encode()
                for index in range(args.single_requests)
            ]
            batch_body = json.dumps({"inputs": test_images[:100].tolist()}).encode()
            # The compact forms: flat 784-pixel rows, which spare the JSON parser 78,400
            # one-element lists per batch. The project takes them in `inputs`; the stock server
            # takes them as one `dataframe_split` column, which MLflow reshapes to its signature.
            flat_rows = test_images[:100].reshape(100, 784).tolist()
            compact_bodies = {
                "project": json.dumps({"inputs": flat_rows}).encode(),
                "stock": json.dumps(
                    {"dataframe_split": {"columns": ["image"], "data": [[row] for row in flat_rows]}}
                ).encode(),
            }
            # Both answer the same: the benchmark compares like with like.
            answers = {
                (side, form): np.asarray(
                    sessions[side]
                    .post(urls[side], data=body, headers={"Content-Type": "application/json"})
                    .json()["predictions"]
                )
                for side in SIDES
                for form, body in (("inputs", batch_body), ("compact", compact_bodies[side]))
            }
            difference = max(
                float(np.abs(answer - answers[("project", "inputs")]).max()) for answer in answers.values()
            )
            for side in SIDES:  # warm-up
                single_latencies_ms(sessions[side], urls[side], single_bodies[:20])
                batch_images_per_s(urls[side], batch_body, 4)
            rounds = {
                side: {"p50": [], "p99": [], "batch_p50": [], "images_per_s": [], "images_per_s_compact": []}
                for side in SIDES
            }
            for round_number in range(args.rounds):
                order = SIDES if round_number % 2 == 0 else SIDES[::-1]
                for side in order:
                    latencies = single_latencies_ms(sessions[side], urls[side], single_bodies)
                    rounds[side]["p50"].append(float(np.percentile(latencies, 50)))
                    rounds[side]["p99"].append(float(np.percentile(latencies, 99)))
                    # One batch of 100 at a time: the cost of one request, with nothing waiting.
                    rounds[side]["batch_p50"].append(
                        float(np.percentile(single_latencies_ms(sessions[side], urls[side], [batch_body] * 10), 50))
                    )
                for side in order:
                    rounds[side]["images_per_s"].append(batch_images_per_s(urls[side], batch_body, args.batches))
                for side in order:
                    rounds[side]["images_per_s_compact"].append(
                        batch_images_per_s(urls[side], compact_bodies[side], args.batches)
                    )
                print(
                    f"round {round_number + 1}: "
                    + "; ".join(
                        f"{side} p50 {rounds[side]['p50'][-1]:.1f} ms, "
                        f"{rounds[side]['images_per_s'][-1]:.0f} images/s, "
                        f"compact {rounds[side]['images_per_s_compact'][-1]:.0f} images/s"
                        for side in SIDES
                    ),
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop()
        local = {side: in_process(uris[side], test_images, args.single_requests) for side in SIDES}
        decoding = {
            "inputs": request_decoding_ms(batch_body, batch_body),
            "compact": request_decoding_ms(compact_bodies["stock"], compact_bodies["project"]),
        }

    summary = {side: {name: spread(values) for name, values in rounds[side].items()} | local[side] for side in SIDES}
    result = {
        "machine": {
            "host": platform.node(),
            "processor": platform.processor(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "settings": vars(args),
        "max_abs_difference_of_answers": difference,
        "batch100_decoding_in_process_ms": decoding,
        "sides": summary,
        "speed_up": {
            "single_image_p50": summary["stock"]["p50"]["median"] / summary["project"]["p50"]["median"],
            "batch100_concurrency4": summary["project"]["images_per_s"]["median"]
            / summary["stock"]["images_per_s"]["median"],
            "batch100_concurrency4_compact": summary["project"]["images_per_s_compact"]["median"]
            / summary["stock"]["images_per_s_compact"]["median"],
            "batch100_project_compact_over_stock_inputs": summary["project"]["images_per_s_compact"]["median"]
            / summary["stock"]["images_per_s"]["median"],
        },
        "rounds": rounds,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = f"_threads{args.threads}" if args.threads else ""
    (RESULTS_DIR / f"serving{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| measure | project | stock Keras flavour | speed-up |",
        "|---|---|---|---|",
    ]
    for name, label, unit in (
        ("p50", "single image, p50 latency", "ms"),
        ("p99", "single image, p99 latency", "ms"),
        ("batch_p50", "one batch of 100 (`inputs`) at a time, p50 latency", "ms"),
        ("images_per_s", "batches of 100 at concurrency 4, `inputs`", "images/s"),
        (
            "images_per_s_compact",
            "batches of 100 at concurrency 4, compact: flat rows (project: in `inputs`; stock: `dataframe_split`)",
            "images/s",
        ),
    ):
        ours, stock = summary["project"][name], summary["stock"][name]
        ratio = stock["median"] / ours["median"] if unit == "ms" else ours["median"] / stock["median"]
        lines.append(
            f"| {label} | {ours['median']:.1f} {unit} ({ours['low']:.1f}-{ours['high']:.1f}) "
            f"| {stock['median']:.1f} {unit} ({stock['low']:.1f}-{stock['high']:.1f}) | {ratio:.1f}x |"
        )
    lines.append(
        f"| in process, one image (`predict` only) | {summary['project']['in_process_single_ms_p50']:.2f} ms "
        f"| {summary['stock']['in_process_single_ms_p50']:.2f} ms | |"
    )
    lines.append(
        f"| in process, batches of 100 | {summary['project']['in_process_batch100_images_per_s']:.0f} images/s "
        f"| {summary['stock']['in_process_batch100_images_per_s']:.0f} images/s | |"
    )
    for form, label in (("inputs", "nested `inputs`"), ("compact", "flat rows")):
        lines.append(
            f"| batch of 100, {label}, in process: one JSON parse (MLflow parses twice) / MLflow's input conversion "
            f"| {decoding[form]['json_parse_frozen_gc_ms']:.1f} ms (collector frozen) / none "
            f"| {decoding[form]['json_parse_ms']:.1f} ms / {decoding[form]['mlflow_input_conversion_ms']:.1f} ms | |"
        )
    table = "\n".join(lines)
    (RESULTS_DIR / f"serving{suffix}.md").write_text(
        f"# Serving benchmark\n\n`python benchmarks/bench_serving.py --rounds {args.rounds}"
        f"{f' --threads {args.threads}' if args.threads else ''}` on {platform.node()} "
        f"({result['machine']['cpu_count']} cores). Median over rounds, lowest-highest round in brackets; "
        f"both sides alternate. Largest difference between the two sides' answers: {difference:.2g}.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
