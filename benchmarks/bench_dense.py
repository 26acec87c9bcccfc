"""Seconds per epoch of the baseline dense network, measured side by side in one run.

(a) the plain notebook way: a tfds pipeline with a per-example ``map(scale)``,
    ``shuffle(10000)``, ``batch(100)`` and a plain ``model.fit``, no tracking;
(b) this project's ``dense`` entry point with MLflow tracking on, logging to a real
    ``mlflow server`` on loopback.

Both train the 784-50-50-10 baseline (Adam 0.001, batch 100) on the full data. Epoch 1 holds
graph tracing and compilation, so seconds per epoch are summarised over epochs 2 to N, as
wall and as CPU seconds (the steadier figure on a shared machine). Each variant runs in its
own fresh process; with ``--repeats`` they alternate, because the machine is noisy. Results go
to ``benchmarks/results/dense.json`` and ``dense.md``.

``--batch-size 1`` measures exercise 7 of the dense suite (pure SGD, 54,000 steps per
epoch) against the plain notebook loop at batch size 1; results go to ``dense_batch1.*``.

    python benchmarks/bench_dense.py --epochs 5 --repeats 2
    python benchmarks/bench_dense.py --epochs 2 --repeats 1 --batch-size 1
"""

from __future__ import annotations

import os
import platform

from common import (
    WORK_DIR, alternate_notebook_and_project, benchmark_parser, compare, comparison_rows, epoch_timer,
    parse_benchmark_args, write_results,
)


def notebook_way(args) -> dict[str, list[float]]:
    """The course notebook's pipeline and fit, returning wall and CPU seconds per epoch."""
    import os

    import keras
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from mnist_mlflow import data

    manual_dir = os.environ.get(data.DATA_DIR_ENV)
    download_config = tfds.download.DownloadConfig(manual_dir=f"{manual_dir}/mnist") if manual_dir else None
    datasets, info = tfds.load(
        "mnist", with_info=True, as_supervised=True,
        download_and_prepare_kwargs={"download_config": download_config},
    )
    train_and_validation = datasets["train"]
    num_validation = int(0.1 * info.splits["train"].num_examples)

    def scale(image, label):
        image = tf.cast(image, tf.float32)
        image /= 255.0
        return image, label

    shuffled = train_and_validation.map(scale).shuffle(10000)
    validation_inputs, validation_targets = next(iter(shuffled.take(num_validation).batch(num_validation)))
    train_data = shuffled.skip(num_validation).batch(args.batch_size)

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(50, activation="relu"),
        keras.layers.Dense(50, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    times: dict[str, list[float]] = {}
    model.fit(train_data, epochs=args.epochs, validation_data=(validation_inputs, validation_targets), verbose=2, callbacks=[epoch_timer(times)])
    return times


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=5, default_repeats=1)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parse_benchmark_args(parser, notebook_way)
    if args is None:
        return

    from harness.servers import tracking_server

    with tracking_server(WORK_DIR / "mlflow") as server:
        notebook_runs, project_runs, runs = alternate_notebook_and_project(
            __file__, args.repeats, args.epochs, "dense", ["--batch_size", str(args.batch_size)], server.url,
            "benchmark-dense", notebook_args=["--batch-size", str(args.batch_size)],
        )
    comparison = compare(notebook_runs, project_runs)
    result = {
        "benchmark": f"dense baseline 784-50-50-10, batch {args.batch_size}, full MNIST",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "notebook_epoch_seconds": notebook_runs,
        "project_epoch_seconds": project_runs,
        "comparison": comparison,
        "project_test_accuracy": [run.data.metrics["test_accuracy"] for run in runs],
        "project_val_accuracy": [run.data.metrics["best_val_accuracy"] for run in runs],
    }
    table = (
        f"| batch {args.batch_size}, full MNIST | wall s per epoch: median (mean) of epochs 2-{args.epochs}, {args.repeats} run(s) each "
        "| CPU s per epoch (median) |\n|---|---|---|\n"
        + comparison_rows(
            comparison,
            "notebook way (per-example map, shuffle 10000, plain fit, no tracking)",
            "project `dense` entry point, tracking to a real mlflow server",
        )
    )
    write_results("dense" if args.batch_size == 100 else f"dense_batch{args.batch_size}", result, table)


if __name__ == "__main__":
    main()
