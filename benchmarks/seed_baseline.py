"""The seeds' own training code, the yardstick of the speed benchmark: plain Keras, no tracking.

    python benchmarks/seed_baseline.py {dense,dense_bs1,cnn,wd} [--epochs N] [--steps N]

It trains as the course's notebooks do, kept here so that a clone can measure itself without
anything beside it:
- ``dense`` and ``dense_bs1``: the course's tfds pipeline (``map`` to scale, ``shuffle``, ``take``
  and ``skip`` for a 10% validation split, ``batch``) into a plain ``fit`` of the 50-50 dense
  network with Adam, at batch 100 or at batch 1 (``--steps`` shortens an epoch);
- ``cnn``: NumPy arrays into ``fit``, the MNIST CNN (docs/experiments.md section 3), batch 32,
  SGD 0.1, validating on the test split every epoch, as the course did;
- ``wd``: the 500-300 network of the weight-decay sweep, the same way.

When ``MNIST_MLFLOW_DATA_DIR`` is set, ``$MNIST_MLFLOW_DATA_DIR/mnist`` is tfds's manual directory,
as for the project; otherwise tfds downloads. It prints one JSON line: each epoch's wall seconds,
the final accuracies and the whole run's seconds. bench_speed.py compares the median epoch after
the first against the project's, alternating runs of both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import tensorflow as tf
import tensorflow_datasets as tfds

DATA_DIR = os.environ.get("MNIST_MLFLOW_DATA_DIR", "").strip()
LOAD_OPTIONS = (
    {
        "download_and_prepare_kwargs": {
            "download_config": tfds.download.DownloadConfig(manual_dir=os.path.join(DATA_DIR, "mnist"))
        }
    }
    if DATA_DIR
    else {}
)
layers = tf.keras.layers


class EpochTimer(tf.keras.callbacks.Callback):
    """Wall seconds of every epoch, validation included."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def dense_with_tfds_pipeline(batch_size: int, epochs: int, steps: int | None = None) -> dict:
    """The baseline dense network fed by the course's tfds pipeline."""
    datasets, info = tfds.load("mnist", with_info=True, as_supervised=True, **LOAD_OPTIONS)
    validation_size = tf.cast(0.1 * info.splits["train"].num_examples, tf.int64)
    test_size = tf.cast(info.splits["test"].num_examples, tf.int64)

    def scale(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    shuffled = datasets["train"].map(scale).shuffle(10000)
    validation = shuffled.take(validation_size).batch(validation_size)
    train = shuffled.skip(validation_size).batch(batch_size)
    test = datasets["test"].map(scale).batch(test_size)
    validation_images, validation_labels = next(iter(validation))
    model = tf.keras.Sequential(
        [
            layers.Input((28, 28, 1)),
            layers.Flatten(),
            layers.Dense(50, activation="relu"),
            layers.Dense(50, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    if steps:
        train = train.take(steps)
    history = model.fit(
        train, epochs=epochs, validation_data=(validation_images, validation_labels), verbose=0, callbacks=[timer]
    )
    _, test_accuracy = model.evaluate(test, verbose=0)
    return {"epoch_s": timer.times, "val_accuracy": history.history["val_accuracy"][-1], "test_accuracy": test_accuracy}


def arrays_scaled_one_hot():
    """Both splits as float32 NumPy arrays in [0, 1], with one-hot labels, as the CNN notebook loads them."""
    (images, labels), (test_images, test_labels) = tfds.as_numpy(
        tfds.load("mnist", split=["train", "test"], batch_size=-1, as_supervised=True, **LOAD_OPTIONS)
    )
    return (
        images.astype("float32") / 255.0,
        tf.keras.utils.to_categorical(labels, 10),
        test_images.astype("float32") / 255.0,
        tf.keras.utils.to_categorical(test_labels, 10),
    )


def fit_arrays(model, epochs: int) -> dict:
    """Plain fit on NumPy arrays, batch 32, SGD 0.1, validating on the test split every epoch."""
    images, labels, test_images, test_labels = arrays_scaled_one_hot()
    model.compile(
        loss="categorical_crossentropy", optimizer=tf.keras.optimizers.SGD(learning_rate=0.1), metrics=["accuracy"]
    )
    timer = EpochTimer()
    history = model.fit(
        images,
        labels,
        batch_size=32,
        epochs=epochs,
        verbose=0,
        validation_data=(test_images, test_labels),
        callbacks=[timer],
    )
    return {"epoch_s": timer.times, "val_accuracy": history.history["val_accuracy"][-1]}


def cnn(epochs: int) -> dict:
    return fit_arrays(
        tf.keras.Sequential(
            [
                layers.Input((28, 28, 1)),
                layers.Conv2D(32, (3, 3), activation="relu"),
                layers.MaxPooling2D((2, 2), strides=2),
                layers.Conv2D(32, (3, 3), activation="relu"),
                layers.MaxPooling2D((2, 2), strides=2),
                layers.Flatten(),
                layers.Dense(64, activation="relu"),
                layers.Dense(64, activation="relu"),
                layers.Dense(10, activation="softmax"),
            ]
        ),
        epochs,
    )


def weight_decay(epochs: int) -> dict:
    return fit_arrays(
        tf.keras.Sequential(
            [
                layers.Input((28, 28, 1)),
                layers.Flatten(),
                layers.Dense(500, activation="relu", kernel_regularizer=tf.keras.regularizers.l2(1e-6)),
                layers.Dense(300, activation="relu"),
                layers.Dense(10, activation="softmax"),
            ]
        ),
        epochs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["dense", "dense_bs1", "cnn", "wd"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, help="training steps per epoch (dense_bs1)")
    arguments = parser.parse_args()
    start = time.perf_counter()
    workloads = {
        "dense": lambda: dense_with_tfds_pipeline(100, arguments.epochs),
        "dense_bs1": lambda: dense_with_tfds_pipeline(1, arguments.epochs, arguments.steps),
        "cnn": lambda: cnn(arguments.epochs),
        "wd": lambda: weight_decay(arguments.epochs),
    }
    result = workloads[arguments.workload]()
    result.update(which=arguments.workload, total_s=time.perf_counter() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
