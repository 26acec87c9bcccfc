"""Seconds per epoch of the baseline dense network, measured side by side in one run.

(a) the plain notebook way: a tfds pipeline with a per-example ``map(scale)``,
    ``shuffle(10000)``, ``batch(100)`` and a plain ``model.fit``, no tracking;
(b) this project's ``dense`` entry point with MLflow tracking on, logging to a real
    ``mlflow server`` on loopback.

Both train the 784-50-50-10 baseline (Adam 0.001, batch 100) on the full data. Epoch 1 holds
graph tracing and compilation, so seconds per epoch are averaged over epochs 2 to N. Each
variant runs in its own fresh process; with ``--repeats`` they alternate, because the machine
is noisy. Results go to ``benchmarks/results/dense.json`` and ``dense.md``.

    python benchmarks/bench_dense.py --epochs 5 --repeats 2
"""

from __future__ import annotations

import os
import platform

from common import (
    WORK_DIR, alternate_notebook_and_project, benchmark_parser, epoch_timer, parse_benchmark_args, summarise,
    write_results,
)


def notebook_way(epochs: int) -> list[float]:
    """The course notebook's pipeline and fit, returning wall seconds per epoch."""
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
    train_data = shuffled.skip(num_validation).batch(100)

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(50, activation="relu"),
        keras.layers.Dense(50, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    times: list[float] = []
    model.fit(train_data, epochs=epochs, validation_data=(validation_inputs, validation_targets), verbose=2, callbacks=[epoch_timer(times)])
    return times


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=5)
    parser.add_argument("--repeats", type=int, default=1)
    args = parse_benchmark_args(parser, notebook_way)
    if args is None:
        return

    from mnist_mlflow.processes import tracking_server

    with tracking_server(WORK_DIR / "mlflow") as server:
        notebook_runs, project_runs, runs = alternate_notebook_and_project(
            __file__, args.repeats, args.epochs, "dense", [], server.url, "benchmark-dense"
        )
    accuracies = [run.data.metrics["test_accuracy"] for run in runs]

    notebook, project = summarise(notebook_runs), summarise(project_runs)
    result = {
        "benchmark": "dense baseline 784-50-50-10, batch 100, full MNIST",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "notebook_epoch_seconds": notebook_runs,
        "project_epoch_seconds": project_runs,
        "notebook_s_per_epoch": notebook,
        "project_s_per_epoch": project,
        "speedup_median": notebook["median"] / project["median"],
        "speedup_mean": notebook["mean"] / project["mean"],
        "project_test_accuracy": accuracies,
    }
    table = (
        f"| variant | s per epoch, median (mean) of epochs 2-{args.epochs} over {args.repeats} run(s) |\n|---|---|\n"
        f"| notebook way (per-example map, shuffle 10000, plain fit, no tracking) | {notebook['median']:.2f} ({notebook['mean']:.2f}) |\n"
        f"| project `dense` entry point, tracking to a real mlflow server | {project['median']:.2f} ({project['mean']:.2f}) |\n"
        f"| speed-up | {result['speedup_median']:.1f}x ({result['speedup_mean']:.1f}x) |\n"
    )
    write_results("dense", result, table)


if __name__ == "__main__":
    main()
