"""The MNIST CNN: training speed against the notebook way (serving speed: bench_serving.py).

Training, side by side in one run, each variant in a fresh process:
(a) the plain notebook way: NumPy arrays (scaled to [0, 1]) into ``model.fit``, batch 32,
    SGD 0.1, no tracking;
(b) this project's ``cnn`` entry point with tracking to a real ``mlflow server`` on loopback.
Seconds per epoch: the median over epochs 2 to N (epoch 1 holds tracing and compilation);
with ``--repeats`` the two variants alternate, because the machine is noisy.

    python benchmarks/bench_cnn.py --epochs 3 --repeats 2
"""

from __future__ import annotations

import os
import platform


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


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=3, default_repeats=2)
    args = parse_benchmark_args(parser, notebook_way)
    if args is None:
        return

    from harness.servers import tracking_server

    with tracking_server(WORK_DIR / "mlflow-cnn") as server:
        notebook_times, project_times, runs = alternate_notebook_and_project(
            __file__, args.repeats, args.epochs, "cnn", ["--register_as", ""], server.url, "benchmark-cnn"
        )

    comparison = compare(notebook_times, project_times)
    project_s = comparison["wall"]["project"]["median"]
    result = {
        "benchmark": "MNIST CNN 32-32 conv, 64-64 dense, SGD 0.1, batch 32, full MNIST (serving: bench_serving.py)",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "notebook_epoch_seconds": notebook_times,
        "project_epoch_seconds": project_times,
        "comparison": comparison,
        "floor_s_per_epoch": FLOOR_S_PER_EPOCH,
        "project_over_floor": project_s / FLOOR_S_PER_EPOCH,
        "project_test_accuracy": [project_run.data.metrics["test_accuracy"] for project_run in runs],
    }
    table = (
        f"| CNN training, full MNIST | wall s per epoch: median (mean) of epochs 2-{args.epochs}, {args.repeats} run(s) each "
        "| CPU s per epoch (median) |\n|---|---|---|\n"
        + comparison_rows(
            comparison, "notebook way (NumPy arrays into fit, no tracking)", "project `cnn` entry point, tracking to a real mlflow server"
        )
        + f"| arithmetic floor (2 AVX2 cores) | {FLOOR_S_PER_EPOCH} ({project_s / FLOOR_S_PER_EPOCH:.1f}x above it) | |\n"
    )
    write_results("cnn", result, table)


if __name__ == "__main__":
    main()
