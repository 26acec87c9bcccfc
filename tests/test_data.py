import numpy as np
import pytest

from mnist_mlflow import data
from mnist_mlflow.config import DataConfig, UserInputError


def test_split_sizes_and_disjointness():
    train, validation = data.split_train_validation(60000, 0.1, seed=0)
    assert len(validation) == 6000
    assert len(train) == 54000
    assert not set(train) & set(validation)
    assert set(train) | set(validation) == set(range(60000))


def test_split_is_determined_by_the_seed():
    first = data.split_train_validation(1000, 0.2, seed=3)
    again = data.split_train_validation(1000, 0.2, seed=3)
    other = data.split_train_validation(1000, 0.2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_max_train_examples_caps_training_but_not_validation():
    train, validation = data.split_train_validation(60000, 0.1, seed=0, max_train_examples=500)
    full_train, full_validation = data.split_train_validation(60000, 0.1, seed=0)
    assert len(train) == 500
    assert set(train) <= set(full_train)
    assert np.array_equal(validation, full_validation)


def test_a_fraction_leaving_no_examples_is_refused():
    with pytest.raises(UserInputError, match="validation_fraction"):
        data.split_train_validation(5, 0.01, seed=0)


def test_load_splits_gives_uint8_images_and_the_documented_sizes(small_splits):
    assert small_splits.sizes == {"train_examples": 2000, "validation_examples": 6000, "test_examples": 10000}
    for images in (small_splits.train_images, small_splits.validation_images, small_splits.test_images):
        assert images.dtype == np.uint8
        assert images.shape[1:] == (28, 28, 1)
        assert images.max() == 255
    assert set(np.unique(small_splits.train_labels)) == set(range(10))
    assert small_splits.version == "3.0.1"


def test_training_dataset_covers_every_example_once_per_epoch_in_a_seeded_order(small_splits):
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10)
    dataset = data.training_dataset(images, labels, batch_size=4, seed=1)
    epochs = [np.concatenate([batch_labels.numpy() for _, batch_labels in dataset]) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert [len(batch_labels) for _, batch_labels in dataset] == [4, 4, 2]
    first_image, first_label = next(iter(dataset))
    assert first_image.dtype.name == "float32"
    # The image still matches its label after the batched gather.
    assert np.array_equal(first_image.numpy().reshape(-1), first_label.numpy())
    again = data.training_dataset(images, labels, batch_size=4, seed=1)
    assert np.array_equal(np.concatenate([b.numpy() for _, b in again]), epochs[0])


def test_each_epoch_s_order_follows_from_the_seed_and_the_epoch_alone():
    """What resuming at any epoch relies on: no state carried from one pass to the next."""
    import tensorflow as tf

    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
    labels = np.arange(50)
    epoch = tf.Variable(0, dtype=tf.int64)
    dataset = data.training_dataset(images, labels, batch_size=8, seed=3, max_shift=0, epoch=epoch)

    def order(passes_before: int, at_epoch: int) -> list[int]:
        for _ in range(passes_before):
            list(dataset)
        epoch.assign(at_epoch)
        return np.concatenate([batch.numpy() for _, batch in dataset]).tolist()

    first = order(0, 4)
    assert sorted(first) == list(range(50))
    assert order(3, 4) == first, "earlier passes must not change an epoch's order"
    assert order(0, 5) != first
    fresh = tf.Variable(4, dtype=tf.int64)
    again = data.training_dataset(images, labels, batch_size=8, seed=3, epoch=fresh)
    assert np.concatenate([batch.numpy() for _, batch in again]).tolist() == first


def test_manual_dir_without_the_files_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DataUnavailableError, match=data.DATA_DIR_ENV):
        data.load_splits(DataConfig(tfds_data_dir=str(tmp_path / "tfds")))


def _network_reachable() -> bool:
    import socket

    try:
        socket.create_connection(data.DOWNLOAD_HOSTS["mnist"], timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_network_reachable(), reason="the download host is reachable, so tfds would download")
def test_without_network_and_without_the_variable_fails_fast_naming_it(tmp_path, monkeypatch):
    import time

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(data.DataUnavailableError, match=data.DATA_DIR_ENV):
        data.load_splits(DataConfig(tfds_data_dir=str(tmp_path / "tfds")))
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def prepared_mnist(tmp_path_factory):
    """MNIST prepared by tfds in a private folder, with its decoded-array cache written. Returns
    the folder and MNIST's arrays, version and prepared directory."""
    import os

    if not os.environ.get(data.DATA_DIR_ENV):
        pytest.skip(f"needs {data.DATA_DIR_ENV} to prepare the data sets offline")
    folder = tmp_path_factory.mktemp("tfds")
    arrays, version, prepared_dir = data.load_arrays("mnist", str(folder))
    assert prepared_dir.startswith(str(folder))
    return folder, arrays, version, prepared_dir


@pytest.mark.e2e
@pytest.mark.slow  # prepares Fashion-MNIST as well
def test_mnist_and_fashion_mnist_prepared_in_one_directory_stay_distinct(prepared_mnist):
    """Both data sets ship files of the same names; preparing one after the other in one tfds
    directory once gave Fashion-MNIST the MNIST images (tfds's shared extraction folder)."""
    folder, mnist_arrays, _, _ = prepared_mnist
    fashion_arrays, _, fashion_dir = data.load_arrays("fashion_mnist", str(folder))
    assert fashion_dir.startswith(str(folder))
    means = {}
    for dataset, arrays in (("mnist", mnist_arrays), ("fashion_mnist", fashion_arrays)):
        train_images, train_labels = arrays["train"]
        assert train_images.shape == (60000, 28, 28, 1) and np.bincount(train_labels).min() > 5000
        means[dataset] = float(train_images.mean())
    # The canonical files' mean pixel intensities: MNIST about 33.3, Fashion-MNIST about 72.9.
    assert means["mnist"] == pytest.approx(33.32, abs=0.05)
    assert means["fashion_mnist"] == pytest.approx(72.94, abs=0.05)


def _load_in_fresh_process(folder) -> str:
    """Loads MNIST from ``folder`` in a new interpreter; prints whether tfds was imported and a digest."""
    import subprocess
    import sys

    code = (
        "import hashlib, sys; from mnist_mlflow import data\n"
        f"arrays, version, _ = data.load_arrays('mnist', {str(folder)!r})\n"
        "print('tfds imported:', 'tensorflow_datasets' in sys.modules, version)\n"
        "print(hashlib.sha256(arrays['train'][0].tobytes() + arrays['test'][1].tobytes()).hexdigest())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=data.Path(__file__).parent.parent
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.e2e
def test_decoded_arrays_are_cached_beside_tfds_and_load_without_tfds(prepared_mnist):
    import hashlib

    folder, arrays, version, prepared_dir = prepared_mnist
    cache = data.Path(prepared_dir) / data.ARRAY_CACHE_FOLDER
    assert (cache / data.ARRAY_CACHE_MANIFEST).is_file()
    expected = hashlib.sha256(arrays["train"][0].tobytes() + arrays["test"][1].tobytes()).hexdigest()
    output = _load_in_fresh_process(folder)
    # The second load reads the cache: the same arrays, and tensorflow_datasets is never imported.
    assert f"tfds imported: False {version}" in output
    assert expected in output


@pytest.mark.e2e
def test_a_damaged_cache_is_noticed_and_decoded_again(prepared_mnist):
    import hashlib

    folder, arrays, version, prepared_dir = prepared_mnist
    labels_file = data.Path(prepared_dir) / data.ARRAY_CACHE_FOLDER / "test_labels.npy"
    damaged = bytearray(labels_file.read_bytes())
    damaged[-1] = (damaged[-1] + 1) % 10
    labels_file.write_bytes(bytes(damaged))
    output = _load_in_fresh_process(folder)
    assert "Ignoring the decoded-array cache" in output and "does not match its SHA-256 digest" in output
    assert "tfds imported: True" in output
    assert hashlib.sha256(arrays["train"][0].tobytes() + arrays["test"][1].tobytes()).hexdigest() in output
    # The cache was written again, whole: the next load reads it.
    assert "tfds imported: False" in _load_in_fresh_process(folder)


def _copy_without_cache(prepared_mnist, tmp_path):
    """A copy of the tfds folder with MNIST prepared but no decoded-array cache."""
    import shutil

    folder, _, version, _ = prepared_mnist
    copy = tmp_path / "tfds"
    shutil.copytree(folder / "mnist", copy / "mnist", ignore=shutil.ignore_patterns(data.ARRAY_CACHE_FOLDER, ".*"))
    return copy, copy / "mnist" / version


@pytest.mark.e2e
def test_a_cache_another_process_wrote_meanwhile_is_kept(prepared_mnist, tmp_path):
    """The array cache is written under the preparation lock; one found in its place all the same
    (an intact one) is kept rather than removed and replaced."""
    import os

    _, arrays, version, _ = prepared_mnist
    _, prepared_dir = _copy_without_cache(prepared_mnist, tmp_path)
    data._write_array_cache(arrays, version, str(prepared_dir))
    cache = prepared_dir / data.ARRAY_CACHE_FOLDER
    before = {path.name: os.stat(path).st_ino for path in cache.iterdir()}
    data._write_array_cache(arrays, version, str(prepared_dir))
    assert {path.name: os.stat(path).st_ino for path in cache.iterdir()} == before
    assert not [path for path in prepared_dir.iterdir() if path.name.startswith(".")]
    # Readable by others sharing the tfds folder, as tfds's own files are (not mkdtemp's 0700).
    assert os.stat(cache).st_mode & 0o055 == os.stat(prepared_dir).st_mode & 0o055


@pytest.mark.e2e
@pytest.mark.parametrize("manifest", ["{}", "[]", '{"version": "3.0.1"}', '{"version": 3, "sha256": {}}', "not json"])
def test_an_unreadable_manifest_is_one_line_and_the_data_is_decoded_again(prepared_mnist, tmp_path, capsys, manifest):
    _, arrays, version, _ = prepared_mnist
    copy, prepared_dir = _copy_without_cache(prepared_mnist, tmp_path)
    data._write_array_cache(arrays, version, str(prepared_dir))
    (prepared_dir / data.ARRAY_CACHE_FOLDER / data.ARRAY_CACHE_MANIFEST).write_text(manifest)
    assert data._read_array_cache("mnist", str(copy)) is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert (
        len(printed) == 1
        and printed[0].startswith("Ignoring the decoded-array cache")
        and printed[0].endswith("decoding mnist again")
    )


@pytest.mark.e2e
def test_a_read_only_data_folder_works_and_says_why_nothing_is_cached(prepared_mnist, tmp_path):
    """A shared volume mounted read-only: the data set loads from tfds's files, one line says the
    cache cannot be written, and nothing is left behind. (Root writes through file modes, so the
    folder is made read-only by a bind mount in a private mount namespace.)"""
    import shutil
    import subprocess
    import sys

    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0
    ):
        pytest.skip("needs `unshare --mount` to mount a folder read-only")
    copy, prepared_dir = _copy_without_cache(prepared_mnist, tmp_path)
    code = (
        "from mnist_mlflow import data\n"
        f"arrays, version, _ = data.load_arrays('mnist', {str(copy)!r})\n"
        "print('loaded', version, arrays['train'][0].shape)\n"
    )
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$1" -c "$2"'
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, str(copy), sys.executable, code],
        capture_output=True,
        text=True,
        cwd=data.Path(__file__).parent.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "cach" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"Not caching the decoded arrays: {prepared_dir} cannot be written"
    ), result.stdout
    assert "Read-only file system" in lines[0]
    assert "loaded 3.0.1 (60000, 28, 28, 1)" in result.stdout
    assert not (prepared_dir / data.ARRAY_CACHE_FOLDER).exists()
    assert not data.preparation_lock_path("mnist", str(copy)).exists()


@pytest.mark.e2e
def test_a_process_waits_for_the_one_preparing_the_data_set(prepared_mnist, tmp_path):
    """While another process holds the data set's lock, a loader waits, saying so, and goes on
    once the lock is free, reading what the holder left (here: tfds's prepared files)."""
    import subprocess
    import sys
    import time

    from filelock import FileLock

    copy, prepared_dir = _copy_without_cache(prepared_mnist, tmp_path)
    code = f"from mnist_mlflow import data\ndata.load_arrays('mnist', {str(copy)!r})\nprint('loaded')\n"
    with FileLock(data.preparation_lock_path("mnist", str(copy))):
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=data.Path(__file__).parent.parent,
        )
        first_line = process.stdout.readline()
        assert first_line.startswith("Waiting for another process preparing mnist in"), first_line
        time.sleep(0.5)
        assert process.poll() is None
        assert not (prepared_dir / data.ARRAY_CACHE_FOLDER).exists()
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors[-2000:]
    assert output.strip().endswith("loaded")
    assert (prepared_dir / data.ARRAY_CACHE_FOLDER / data.ARRAY_CACHE_MANIFEST).is_file()
