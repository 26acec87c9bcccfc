"""MNIST and Fashion-MNIST through tensorflow-datasets, decoded once into memory.

Offline use: when the environment variable ``MNIST_MLFLOW_DATA_DIR`` is set,
``$MNIST_MLFLOW_DATA_DIR/<dataset>`` is handed to tfds as its manual directory, so tfds
prepares the data set from local copies of the canonical files and still verifies their
checksums. When it is unset, tfds downloads as usual; without a network that fails fast with
a message naming the variable.

Batches are built from whole in-memory arrays: the pipeline shuffles example indices and
gathers a whole batch at once, so there is no per-example Python or ``map`` work. Pixels stay
``uint8`` 0-255 here; scaling to [0, 1] lives inside the model, so a served model takes raw
pixel intensities.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlflow.config import DataConfig, UserInputError

DATA_DIR_ENV = "MNIST_MLFLOW_DATA_DIR"

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}

# The host and port tfds downloads each data set from, used only to fail fast without a network.
DOWNLOAD_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
}

MANUAL_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DataUnavailableError(UserInputError):
    """The data set can be neither found locally nor downloaded."""


@dataclass(frozen=True)
class Splits:
    """Train, validation and test arrays of one data set (images uint8, shape (n, 28, 28, 1))."""

    dataset: str
    version: str
    source: str
    class_names: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "train_examples": int(len(self.train_labels)),
            "validation_examples": int(len(self.validation_labels)),
            "test_examples": int(len(self.test_labels)),
        }


def _manual_dir(dataset: str) -> Path | None:
    root = os.environ.get(DATA_DIR_ENV, "").strip()
    if not root:
        return None
    manual_dir = Path(root).expanduser() / dataset
    missing = [name for name in MANUAL_FILES if not (manual_dir / name).is_file()]
    if missing:
        raise DataUnavailableError(
            f"{DATA_DIR_ENV}={root!r}: {manual_dir} lacks {', '.join(missing)} "
            f"(expected the canonical {dataset} files there)"
        )
    return manual_dir


def _require_network(dataset: str) -> None:
    host, port = DOWNLOAD_HOSTS[dataset]
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        raise DataUnavailableError(
            f"{dataset} is not prepared locally and its download host {host} cannot be reached ({error}); "
            f"set {DATA_DIR_ENV} to a folder holding {dataset}/ with the canonical files"
        ) from None


# Decoded data sets by (dataset, tfds data directory), so a study decodes each only once.
_LOADED: dict[tuple[str, str | None, str | None], tuple] = {}


def load_arrays(
    dataset: str, tfds_data_dir: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    """Prepares ``dataset`` with tfds if needed and decodes both splits into memory.

    Returns ``({"train": (images, labels), "test": (images, labels)}, version, prepared_dir)``.
    Results are kept for the life of the process; the arrays must not be modified.
    """
    key = (dataset, tfds_data_dir, os.environ.get("TFDS_DATA_DIR"))
    if key not in _LOADED:
        _LOADED[key] = _load_arrays(dataset, tfds_data_dir)
    return _LOADED[key]


def _load_arrays(dataset: str, tfds_data_dir: str | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    if dataset not in CLASS_NAMES:
        raise DataUnavailableError(f"dataset={dataset!r} is not one of: {', '.join(CLASS_NAMES)}")
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=tfds_data_dir)
    if not builder.is_prepared():
        manual_dir = _manual_dir(dataset)
        print(f"Preparing {dataset} in {builder.data_dir} (once per tfds data directory)...", flush=True)
        if manual_dir is None:
            _require_network(dataset)
            builder.download_and_prepare()
        else:
            # tfds extracts manual files to downloads/extracted/GZIP.<file name>, a path that
            # does not depend on the data set; MNIST and Fashion-MNIST use the same file names,
            # so the second data set prepared in a tfds directory would silently get the first
            # one's images. A private extraction folder per preparation prevents that.
            with tempfile.TemporaryDirectory(prefix=f"tfds-extract-{dataset}-") as extract_dir:
                download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), extract_dir=extract_dir)
                builder.download_and_prepare(download_config=download_config)

    arrays = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
        arrays[split] = (images.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False))
    return arrays, str(builder.info.version), str(builder.data_dir)


def split_train_validation(
    num_examples: int, validation_fraction: float, seed: int, max_train_examples: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Chooses validation and training indices into the original training split.

    A fraction of all training examples is held out for validation, chosen by ``seed``; the
    rest are training examples, of which at most ``max_train_examples`` are kept (0 keeps all).
    The validation set does not shrink with ``max_train_examples``, so validation accuracy
    stays comparable between quick and full runs.
    """
    num_validation = int(round(num_examples * validation_fraction))
    if num_validation < 1 or num_validation >= num_examples:
        raise UserInputError(
            f"validation_fraction={validation_fraction!r} leaves {num_validation} of {num_examples} examples for validation"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    validation_indices = np.sort(order[:num_validation])
    train_indices = order[num_validation:]
    if max_train_examples:
        train_indices = train_indices[:max_train_examples]
    return np.sort(train_indices), validation_indices


def load_splits(config: DataConfig) -> Splits:
    """Loads ``config.dataset`` and splits it into train, validation and test."""
    arrays, version, source = load_arrays(config.dataset, config.tfds_data_dir)
    images, labels = arrays["train"]
    train_indices, validation_indices = split_train_validation(
        len(labels), config.validation_fraction, config.seed, config.max_train_examples
    )
    test_images, test_labels = arrays["test"]
    return Splits(
        dataset=config.dataset,
        version=version,
        source=source,
        class_names=CLASS_NAMES[config.dataset],
        train_images=images[train_indices],
        train_labels=labels[train_indices],
        validation_images=images[validation_indices],
        validation_labels=labels[validation_indices],
        test_images=test_images,
        test_labels=test_labels,
    )


def training_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """Batches of ``(float32 images, labels)``, reshuffled every epoch with a seeded order.

    The arrays are placed in memory as tensors once; each epoch shuffles only the indices and
    gathers one whole batch per step.
    """
    import tensorflow as tf

    image_tensor = tf.constant(images)
    label_tensor = tf.constant(labels)

    def gather(indices):
        return tf.cast(tf.gather(image_tensor, indices), tf.float32), tf.gather(label_tensor, indices)

    dataset = (
        tf.data.Dataset.range(len(labels))
        .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    # Keras autologging reads the batch size from this attribute, which only a dataset whose
    # last step is .batch() has. Without it, autolog would record batch_size=None, clash with
    # the entry point's batch_size parameter and silently log nothing at all.
    dataset._batch_size = tf.constant(batch_size, dtype=tf.int64)
    return dataset


def evaluation_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
    """Batches in order, for validation and testing; cached after the first pass."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return dataset.map(lambda image, label: (tf.cast(image, tf.float32), label)).cache().prefetch(tf.data.AUTOTUNE)
