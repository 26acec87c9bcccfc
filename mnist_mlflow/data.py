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

import contextlib
import hashlib
import json
import os
import shutil
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
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
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


def digest_of(splits: Splits) -> str:
    """A digest of every array of the splits: two runs with the same one saw the same data."""
    digest = hashlib.sha256(splits.dataset.encode())
    for array in (
        splits.train_images,
        splits.train_labels,
        splits.validation_images,
        splits.validation_labels,
        splits.test_images,
        splits.test_labels,
    ):
        digest.update(str(array.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()[:16]


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

# Beside tfds's prepared files (<tfds data dir>/<dataset>/<version>/) the decoded arrays are
# kept as .npy files with their SHA-256 digests, so later runs on the machine load them in a
# fraction of a second without importing tensorflow_datasets at all.
ARRAY_CACHE_FOLDER = "mnist_mlflow_arrays"
ARRAY_CACHE_MANIFEST = "manifest.json"
ARRAY_CACHE_FILES = ("train_images", "train_labels", "test_images", "test_labels")


def load_arrays(
    dataset: str, tfds_data_dir: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    """Prepares ``dataset`` with tfds if needed and decodes both splits into memory.

    Returns ``({"train": (images, labels), "test": (images, labels)}, version, prepared_dir)``.
    Results are kept for the life of the process; the arrays must not be modified. The first
    decoding on a machine also writes the array cache (see ``ARRAY_CACHE_FOLDER``).

    Processes that start together (search workers on a new node, containers sharing a data
    volume) take turns: preparing and caching happen under a lock file in the tfds data
    directory, and a process that waited finds the work done when it gets the lock.
    """
    key = (dataset, tfds_data_dir, os.environ.get("TFDS_DATA_DIR"))
    if key not in _LOADED:
        if dataset not in CLASS_NAMES:
            raise DataUnavailableError(f"dataset={dataset!r} is not one of: {', '.join(CLASS_NAMES)}")
        cached = _read_array_cache(dataset, tfds_data_dir)
        if cached is None:
            with _preparation_lock(dataset, tfds_data_dir):
                # Another process may have prepared and cached the data set while this one waited.
                cached = _read_array_cache(dataset, tfds_data_dir, report_damage=False)
                if cached is None:
                    cached = _load_arrays(dataset, tfds_data_dir)
                    _write_array_cache(*cached)
        _LOADED[key] = cached
    return _LOADED[key]


def tfds_data_dir_of(tfds_data_dir: str | None) -> Path:
    """The folder tfds prepares data sets in: the one given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def preparation_lock_path(dataset: str, tfds_data_dir: str | None) -> Path:
    """The lock file that processes preparing ``dataset`` in one tfds data directory share."""
    return tfds_data_dir_of(tfds_data_dir) / f".{dataset}.mnist_mlflow.lock"


@contextlib.contextmanager
def _preparation_lock(dataset: str, tfds_data_dir: str | None):
    """Holds the data set's lock file while preparing and caching it.

    tfds's ``download_and_prepare`` renames its finished folder into place without a lock, so two
    processes preparing at once make the second fail. The lock is an ``flock`` (the ``filelock``
    package), which the kernel releases when its holder dies, and which NFS passes on to
    processes of other machines. A folder where the lock file cannot be made (read-only, as a
    shared volume mounted so) can hold no preparation either, so nothing is locked there.
    """
    from filelock import FileLock, Timeout

    path = preparation_lock_path(dataset, tfds_data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"Waiting for another process preparing {dataset} in {path.parent} (lock {path.name})...", flush=True)
            lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _version_key(folder: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in folder.name.split("."))
    except ValueError:
        return (-1,)


def file_sha256(path: Path) -> str:
    """A file's SHA-256 digest, read in blocks (the array cache's and the checkpoints' manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_array_cache(dataset: str, tfds_data_dir: str | None, report_damage: bool = True):
    """The cached arrays of the newest prepared version, or None when absent or not intact."""
    manifests = sorted(
        tfds_data_dir_of(tfds_data_dir).glob(f"{dataset}/*/{ARRAY_CACHE_FOLDER}/{ARRAY_CACHE_MANIFEST}"),
        key=lambda path: _version_key(path.parent.parent),
    )
    if not manifests:
        return None
    return _read_cache_folder(manifests[-1].parent, dataset, report_damage)


def _read_cache_folder(folder: Path, dataset: str, report_damage: bool = True):
    try:
        manifest = json.loads((folder / ARRAY_CACHE_MANIFEST).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("version"), str):
            raise ValueError(f"{folder / ARRAY_CACHE_MANIFEST} is not a manifest of this cache")
        arrays = {}
        for name in ARRAY_CACHE_FILES:
            path = folder / f"{name}.npy"
            if file_sha256(path) != manifest["sha256"][name]:
                raise ValueError(f"{path} does not match its SHA-256 digest")
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        if report_damage:
            print(f"Ignoring the decoded-array cache in {folder} ({error}); decoding {dataset} again", flush=True)
        return None
    splits = {split: (arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in ("train", "test")}
    return splits, manifest["version"], str(folder.parent)


def _write_array_cache(arrays: dict[str, tuple[np.ndarray, np.ndarray]], version: str, prepared_dir: str) -> None:
    """Writes the cache next to tfds's files, atomically; a folder that cannot be written is skipped, saying so.

    Called under the preparation lock, after the cache was found absent or damaged. An intact
    cache found in its place all the same (written by a process that took no lock) is kept,
    and a damaged one is replaced.
    """
    folder = Path(prepared_dir) / ARRAY_CACHE_FOLDER
    dataset = Path(prepared_dir).parent.name
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{ARRAY_CACHE_FOLDER}-", dir=prepared_dir))
    except OSError as error:
        print(
            f"Not caching the decoded arrays: {prepared_dir} cannot be written ({error.strerror}); "
            f"{dataset} is decoded from tfds's files on every run",
            flush=True,
        )
        return
    try:
        # mkdtemp makes a private folder; other users of a shared tfds folder should read the
        # cache as they read tfds's own files, so it gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        digests = {}
        for split, (images, labels) in arrays.items():
            for name, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
                np.save(staging / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
                digests[name] = file_sha256(staging / f"{name}.npy")
        (staging / ARRAY_CACHE_MANIFEST).write_text(json.dumps({"version": version, "sha256": digests}, indent=2))
        if folder.exists():
            if _read_cache_folder(folder, dataset, report_damage=False) is not None:
                return
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)
    except OSError as error:
        print(f"Not caching the decoded arrays in {folder} ({error})", flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_arrays(dataset: str, tfds_data_dir: str | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
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
            f"validation_fraction={validation_fraction!r} leaves "
            f"{num_validation} of {num_examples} examples for validation"
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


def shift_images(images, max_shift: int, seed):
    """Moves each image by its own whole number of pixels, up to ``max_shift`` in each direction.

    ``images`` is a batch of shape (n, height, width, channels); the border that moves in is
    black (zero), like MNIST's own background. ``seed`` is a stateless seed of shape (2,), so
    the same seed gives the same shifts.
    """
    import tensorflow as tf

    size = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    offsets = tf.random.stateless_uniform((2, size), seed=seed, minval=0, maxval=2 * max_shift + 1, dtype=tf.int32)
    rows = offsets[0][:, None] + tf.range(height)[None, :]
    columns = offsets[1][:, None] + tf.range(width)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, columns, axis=2, batch_dims=1)


def training_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    max_shift: int = 0,
    batches_per_step: int = 1,
    epoch=None,
):
    """Batches of ``(float32 images, labels)`` of one epoch, in a seeded order.

    The order, and the random shifts of the batches, are drawn from ``(seed, epoch)`` alone,
    where ``epoch`` is a ``tf.Variable`` read afresh on each pass (set it as each epoch begins;
    without one, every pass is epoch 0). So a run resumed at epoch ``e`` sees exactly the
    batches the run left alone would have seen, whatever passes came before. The arrays are
    placed in memory as tensors once; each pass shuffles only the indices and gathers one
    whole batch per step. With ``max_shift``, every image is moved by up to that many pixels in
    each direction (augmentation). With ``batches_per_step``, each element holds that many
    consecutive batches, for a model that steps through them itself
    (models.MultiStepSequential); the order is the same.
    """
    import tensorflow as tf

    image_tensor = tf.constant(images)
    label_tensor = tf.constant(labels)
    count = len(labels)
    step_examples = batch_size * batches_per_step
    steps = -(-count // step_examples)
    seed_tensor = tf.constant(seed, tf.int64)
    if epoch is None:
        epoch = tf.constant(0, tf.int64)

    def gather(indices, batch_seed):
        batch = tf.cast(tf.gather(image_tensor, indices), tf.float32)
        if max_shift:
            batch = shift_images(batch, max_shift, tf.stack([batch_seed, seed_tensor]))
        return batch, tf.gather(label_tensor, indices)

    def one_epoch(_):
        current = tf.convert_to_tensor(epoch, tf.int64)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([seed_tensor, current])
        )
        batches = tf.data.Dataset.from_tensor_slices(order).batch(step_examples)
        # One seed per batch, for its shifts: a function of the epoch and the batch's place in it.
        batch_seeds = tf.data.Dataset.range(steps).map(lambda step: current * steps + step)
        return tf.data.Dataset.zip(batches, batch_seeds)

    return (
        tf.data.Dataset.range(1)
        .flat_map(one_epoch)
        # flat_map hides the length; Keras uses it for the progress bar and the step count.
        .apply(tf.data.experimental.assert_cardinality(steps))
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluation_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
    """Batches in order, for validation and testing; cached after the first pass."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return dataset.map(lambda image, label: (tf.cast(image, tf.float32), label)).cache().prefetch(tf.data.AUTOTUNE)
