"""Why models with dropout are compiled without XLA: one model, both ways, side by side.

    python benchmarks/bench_dropout_xla.py --epochs 3 --repeats 2

Trains 784-256-10 (the search's largest grid model) at batch 32 on full MNIST, with and
without dropout 0.1, each with and without XLA, alternating the four variants in one process
(same data pipeline as the project). Writes benchmarks/results/dropout_xla.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import RESULTS_DIR, benchmark_parser, epoch_timer  # noqa: E402


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], default_epochs=3, default_repeats=2)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is excluded as warm-up")

    import keras

    from mnist_mlflow import models, training
    from mnist_mlflow.config import DataConfig
    from mnist_mlflow.data import load_splits, training_dataset

    splits = load_splits(DataConfig())
    variants = [(dropout, xla) for dropout in (0.0, 0.1) for xla in (True, False)]
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for dropout, xla in variants:
            name = f"dropout {dropout:g}, XLA {'on' if xla else 'off'}"
            keras.utils.set_random_seed(repeat)
            model = models.build_dense_model((256,), ("relu",), dropout_rate=dropout)
            steps = training.steps_per_execution_for(len(splits.train_labels), 32)
            models.compile_model(model, "adam", 0.001, steps_per_execution=steps, jit_compile=xla)
            times = results.setdefault(name, {})
            model.fit(
                training_dataset(splits.train_images, splits.train_labels, 32, repeat),
                epochs=args.epochs,
                verbose=0,
                callbacks=[epoch_timer(times)],
            )
            # Epoch 1 holds compilation; keep epochs 2.. of this run.
            for key in ("wall", "cpu"):
                del times[key][len(times[key]) - args.epochs]
            print(f"repeat {repeat + 1}: {name}: {times['wall'][-(args.epochs - 1) :]}", flush=True)

    rows = {name: {key: statistics.median(values) for key, values in times.items()} for name, times in results.items()}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dropout_xla.json").write_text(
        json.dumps({"epochs": args.epochs, "repeats": args.repeats, "raw": results}, indent=2)
    )
    lines = [
        "784-256-10 at batch 32, full MNIST, median seconds per epoch "
        f"of epochs 2-{args.epochs} over {args.repeats} runs each",
        "",
        "| variant | wall s per epoch | CPU s per epoch |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {row['wall']:.2f} | {row['cpu']:.2f} |" for name, row in rows.items()]
    (RESULTS_DIR / "dropout_xla.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
