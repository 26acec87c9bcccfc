"""Reliability without servers: input checked before TensorFlow, secrets kept out of URLs,
process identity, a diverged loss, and the image client's handling of bad files and answers."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import PROJECT_DIR, run_script

from mnist_mlflow import lifecycle
from mnist_mlflow.config import (
    MAX_PARAMETERS,
    CnnRunConfig,
    ConfigError,
    DenseRunConfig,
    TrainingConfig,
    cnn_parameter_count,
    dense_parameter_count,
)
from mnist_mlflow.redaction import redact_url, server_identity, url_has_secret
from mnist_mlflow.studies.search_config import SearchConfig
from mnist_mlflow.studies.weight_decay import WeightDecayConfig


def test_one_hidden_layer_without_an_activation_takes_the_default():
    config = DenseRunConfig.from_params({"hidden_units": "200"})
    assert config.model.activations == ("relu",)
    # Any depth works with the MLproject default, and the flags show it as MLproject writes it.
    assert DenseRunConfig.from_params({"hidden_units": "10,20,30"}).model.activations == ("relu",) * 3
    assert DenseRunConfig().as_params()["activation"] == "relu"


@pytest.mark.parametrize(
    "params, named",
    [
        ({"seed": "99999999999"}, "seed='99999999999' must lie between 0 and"),
        ({"seed": "-1"}, "seed='-1'"),
        ({"hidden_units": "100000000"}, f"cap of {MAX_PARAMETERS:,}"),
        ({"validation_fraction": "1e-9"}, "validation_fraction=1e-09"),
        ({"validation_fraction": "0.99999999"}, "validation_fraction=0.99999999"),
    ],
)
def test_bad_dense_values_are_refused_with_one_line_naming_them(params, named):
    with pytest.raises(ConfigError) as error:
        DenseRunConfig.from_params(params)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_seed_cap_holds_for_the_last_weight_decay_replicate():
    WeightDecayConfig(seed=2**32 - 3, replicates=3)
    with pytest.raises(ConfigError, match="seed \\+ r"):
        WeightDecayConfig(seed=2**32 - 2, replicates=3)


def test_cnn_model_size_cap_and_one_name_rule():
    with pytest.raises(ConfigError, match="cap of"):
        CnnRunConfig.from_params({"filters": "4096,4096", "dense_units": "100000"})
    for config_class, name in (
        (CnnRunConfig, "register_as"),
        (SearchConfig, "register_as"),
        (SearchConfig, "study_name"),
    ):
        with pytest.raises(ConfigError, match="at most 64"):
            config_class.from_params({name: "a" * 65})
        config_class.from_params({name: "a" * 64})


@pytest.mark.parametrize(
    "kind, arguments",
    [
        ("dense", {"hidden_units": (50, 50)}),
        ("dense", {"hidden_units": (1024, 1024)}),
        ("cnn", {"filters": (32, 32), "kernel_size": 3, "pooling": (True, True), "dense_units": (64, 64)}),
        ("cnn", {"filters": (8, 16, 4), "kernel_size": 5, "pooling": (False, True, False), "dense_units": ()}),
    ],
)
def test_the_size_counted_before_tensorflow_is_what_keras_builds(kind, arguments):
    """The cap is checked on a count made without TensorFlow; it must equal the real model's."""
    from mnist_mlflow import models

    if kind == "dense":
        units = arguments["hidden_units"]
        model = models.build_dense_model(units, ("relu",) * len(units))
        expected = dense_parameter_count(units)
    else:
        model = models.build_cnn_model(
            arguments["filters"],
            kernel_size=arguments["kernel_size"],
            pooling=arguments["pooling"],
            dense_units=arguments["dense_units"],
        )
        expected = cnn_parameter_count(**arguments)
    assert models.count_trainable_parameters(model) == expected


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--seed", "99999999999"], "seed='99999999999' must lie between 0 and"),
        (["--hidden_units", "100000000"], "trainable parameters"),
        (["--validation_fraction", "1e-9"], "validation_fraction"),
        (["--max_shift", "9"], "max_shift='9' must lie between 0 and 7"),
    ],
)
def test_bad_values_stop_the_script_before_tensorflow_is_imported(arguments, named, tmp_path):
    """One line, exit 2, and TensorFlow never imported (so no data load and no run)."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['dense.py', *{arguments!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(PROJECT_DIR / 'entrypoints' / 'dense.py')!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('tensorflow imported' if 'tensorflow' in sys.modules else 'tensorflow not imported')\n"
        "    raise\n"
    )
    result = run_script(
        [sys.executable, "-c", probe], dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db"), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and named in result.stderr
    assert "tensorflow not imported" in result.stdout
    assert not (tmp_path / "m.db").exists()


def test_urls_lose_their_secrets_and_servers_compare_without_credentials():
    assert redact_url("http://alice:s3cret@host:5000/") == "http://alice:***@host:5000/"
    assert redact_url("postgresql+psycopg://search:p%40ss@db:5432/optuna?password=x&sslmode=require") == (
        "postgresql+psycopg://search:***@db:5432/optuna?password=***&sslmode=require"
    )
    for url in ("sqlite:////tmp/a.db", "sqlite:///mlflow.db", "http://127.0.0.1:5000", "postgresql://search@db/optuna"):
        assert redact_url(url) == url and not url_has_secret(url)
    assert url_has_secret("http://a:b@h") and url_has_secret("postgresql://h/db?password=x")
    assert server_identity("http://alice:one@Host:5000/") == server_identity("http://bob:two@host:5000")
    assert server_identity("http://host") == server_identity("http://host:80")
    assert server_identity("http://host:5000") != server_identity("http://host:5001")


def test_process_identity_tells_a_live_process_from_a_dead_one():
    mine = lifecycle.process_identity()
    assert lifecycle.process_is_gone(mine) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert lifecycle.process_is_gone({**mine, lifecycle.PID_TAG: str(child.pid)}) is True
    # The same pid started at another time is another process.
    assert lifecycle.process_is_gone({**mine, lifecycle.START_TAG: "1.0"}) is True
    # Another host's processes cannot be seen from here; no information says nothing either.
    assert lifecycle.process_is_gone({**mine, lifecycle.HOST_TAG: "another-host"}) is None
    assert lifecycle.process_is_gone({}) is None
    # A pid of another PID namespace or another boot names another process: never judged here.
    dead = {**mine, lifecycle.PID_TAG: str(child.pid)}
    assert lifecycle.process_is_gone({**dead, lifecycle.PID_NAMESPACE_TAG: "pid:[1]"}) is None
    assert lifecycle.process_is_gone({**dead, lifecycle.BOOT_TAG: "another-boot"}) is None
    # A run recorded before namespaces were is not judged either.
    assert lifecycle.process_is_gone({k: v for k, v in dead.items() if k != lifecycle.PID_NAMESPACE_TAG}) is None


def test_reconcile_closes_a_run_only_on_an_expired_heartbeat_or_a_dead_process(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_mlflow import tracking
    from mnist_mlflow.tracking import lease

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        client = MlflowClient()
        experiment_id = client.create_experiment("heartbeats")
        now = time.time()
        other_host = {lifecycle.HOST_TAG: "elsewhere", lifecycle.PID_TAG: "7", lifecycle.START_TAG: "1.0"}
        expired = client.create_run(experiment_id, tags={**other_host, lease.LEASE_UNTIL_TAG: f"{now - 120:.0f}"})
        fresh = client.create_run(experiment_id, tags={**other_host, lease.LEASE_UNTIL_TAG: f"{now + 60:.0f}"})
        # Past its time, but within the resolution of the server's clock.
        skewed = client.create_run(experiment_id, tags={**other_host, lease.LEASE_UNTIL_TAG: f"{now - 1:.0f}"})
        unknown = client.create_run(experiment_id, tags=other_host)
        # A study's parent is renewed only between its children: a child's live lease keeps it alive.
        old_beat = {lease.LEASE_UNTIL_TAG: f"{now - 120:.0f}"}
        parent = client.create_run(experiment_id, tags=old_beat)
        client.create_run(
            experiment_id, tags={**other_host, "mlflow.parentRunId": parent.info.run_id, **fresh.data.tags}
        )
        orphaned_parent = client.create_run(experiment_id, tags=old_beat)
        finished_child = client.create_run(
            experiment_id, tags={"mlflow.parentRunId": orphaned_parent.info.run_id, **fresh.data.tags}
        )
        client.set_terminated(finished_child.info.run_id, "FINISHED")
        closed = dict(tracking.reconcile_runs([experiment_id]))
        assert set(closed) == {expired.info.run_id, orphaned_parent.info.run_id}
        assert "no process has renewed its heartbeat" in closed[expired.info.run_id]
        for run in (fresh, skewed, unknown, parent):
            assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)


def test_a_study_parent_is_renewed_between_its_children_and_at_once_when_one_ends(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_mlflow.tracking import lease, watch

    # Renewals every 2 s (a quarter of the server timeout).
    monkeypatch.setenv("MNIST_MLFLOW_SERVER_TIMEOUT_S", "8")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        experiment_id = client.create_experiment("parent beats")
        parent = client.create_run(experiment_id).info.run_id
        child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id

        def until(run_id):
            return float(client.get_run(run_id).data.tags[lease.LEASE_UNTIL_TAG])

        run_watch = watch.RunWatch()
        run_watch.add(parent)
        parent_beat = until(parent)
        run_watch.add(child, lease.Lease.new_run(child))
        child_first = until(child)
        time.sleep(4.6)
        # Two renewals of the child; none of the parent, which the child's lease keeps alive.
        assert until(child) > child_first + 3
        assert until(parent) == parent_beat
        let_go = time.monotonic()
        run_watch.remove(child)
        while until(parent) == parent_beat and time.monotonic() - let_go < 5:
            time.sleep(0.05)
        # The child let go: the parent is beaten at once, not at the next renewal (1.2 s away or more).
        assert until(parent) > parent_beat
        assert time.monotonic() - let_go < 1.0
        run_watch.remove(parent)
    finally:
        mlflow.set_tracking_uri(None)


def test_a_diverging_loss_stops_training_at_once(small_splits):
    from mnist_mlflow import models, training
    from mnist_mlflow.config import TrainingDivergedError

    model = models.build_dense_model((50,), ("relu",))
    models.compile_model(
        model, models.make_optimizer("sgd", 1e308, "constant", 100), steps_per_execution=5, jit_compile=False
    )
    with pytest.raises(TrainingDivergedError, match="epoch 1") as error:
        training.train_and_evaluate(model, small_splits, TrainingConfig(batch_size=100, epochs=3), verbose=0)
    assert "\n" not in str(error.value)


class FakeModelServer(http.server.BaseHTTPRequestHandler):
    """Stands in for a broken model server: answers each request with ``FakeModelServer.answer``."""

    answer = b""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeModelServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _digit_files(tmp_path, count):
    from PIL import Image

    paths = []
    for index in range(count):
        image = np.zeros((40, 40), dtype=np.uint8)
        image[10:30, 18:22] = 255
        path = tmp_path / f"digit{index}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def _predict(url, paths):
    return subprocess.run(
        [sys.executable, "-m", "mnist_mlflow.predict", "--url", url, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )


def _rows(*rows):
    return json.dumps({"predictions": [list(row) for row in rows]}).encode()


GOOD = [0.0] * 10
GOOD[1] = 1.0


def test_a_decompression_bomb_is_one_line_and_the_other_files_are_predicted(tmp_path, fake_server):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    good = _digit_files(tmp_path, 1)
    FakeModelServer.answer = _rows(GOOD)
    result = _predict(fake_server, [str(bomb), *good])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and str(bomb) in result.stderr
    assert f"{good[0]}: 1 (probability 1.000)" in result.stdout


# Runs the client and prints its peak memory (resident set, in KiB) as the last line of stdout.
# VmHWM belongs to the program's own memory map; ru_maxrss would carry over the forking test
# process's peak, which Linux keeps across exec.
PREDICT_AND_REPORT_MEMORY = """
import runpy, sys
sys.argv = ["predict", *sys.argv[1:]]
try:
    runpy.run_module("mnist_mlflow.predict", run_name="__main__")
finally:
    status = open("/proc/self/status").read().splitlines()
    print("peak KiB", next(line.split()[1] for line in status if line.startswith("VmHWM:")), flush=True)
"""


def test_a_small_file_that_declares_144_megapixels_is_refused_before_decoding(tmp_path, fake_server):
    from PIL import Image

    from mnist_mlflow.predict import MAX_IMAGE_PIXELS

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)
    # Under Pillow's own refusal (twice its 89-megapixel limit), where it only warns.
    assert bomb.stat().st_size < 64_000 and 12_000**2 < 2 * Image.MAX_IMAGE_PIXELS
    good = _digit_files(tmp_path, 1)
    FakeModelServer.answer = _rows(GOOD)
    result = subprocess.run(
        [sys.executable, "-c", PREDICT_AND_REPORT_MEMORY, "--url", fake_server, str(bomb), *good],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"{bomb}: cannot read image (it declares 12000 x 12000 = 144,000,000 pixels, more than the "
        f"{MAX_IMAGE_PIXELS:,} this client decodes; scale it down first)"
    ]
    assert f"{good[0]}: 1 (probability 1.000)" in result.stdout
    # Decoding it would take 144 MB as grey bytes, and 576 MB more as float32 pixels.
    peak_kib = int(result.stdout.strip().splitlines()[-1].split()[-1])
    assert peak_kib < 300_000, peak_kib


def test_a_fifo_is_refused_and_the_other_files_are_predicted(tmp_path, fake_server):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = _digit_files(tmp_path, 1)
    FakeModelServer.answer = _rows(GOOD)
    result = _predict(fake_server, [str(fifo), str(tmp_path), *good])
    assert result.returncode == 1
    assert f"{fifo}: cannot read image (not a regular file" in result.stderr
    assert f"{tmp_path}: cannot read image (a folder" in result.stderr
    assert f"{good[0]}: 1 (probability 1.000)" in result.stdout


@pytest.mark.parametrize(
    "answer, expected",
    [
        (_rows(GOOD), "no answer"),
        (_rows(GOOD, [float("nan")] * 10), "NaN"),
        (_rows(GOOD, [0.5] * 3), "shape (3,)"),
        (_rows(GOOD, GOOD, GOOD), "3 rows for 2 images"),
    ],
)
def test_a_short_or_bad_answer_is_said_per_file_with_a_failing_status(tmp_path, fake_server, answer, expected):
    FakeModelServer.answer = answer
    first, second = _digit_files(tmp_path, 2)
    result = _predict(fake_server, [first, second])
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{first}: 1 (probability 1.000)" in result.stdout
    assert expected in result.stderr and "Traceback" not in result.stderr
    if "rows for" not in expected:
        assert result.stderr.startswith(f"{second}: ")


def test_a_malformed_answer_is_one_line_not_a_traceback(tmp_path, fake_server):
    FakeModelServer.answer = b"<html>not json</html>"
    result = _predict(fake_server, _digit_files(tmp_path, 1))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_spool_file_that_is_not_ours_is_set_aside_and_a_deleted_run_s_record_dropped(tmp_path, monkeypatch):
    """Neither blocks a command: each gets one line, and no command reads it again."""
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_mlflow.tracking import watch

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv(watch.SPOOL_DIR_ENV, str(spool))
    try:
        client = MlflowClient()
        run = client.create_run(client.create_experiment("spool"))
        client.delete_run(run.info.run_id)
        (spool / "a-list.json").write_text("[]")
        (spool / "not-json.json").write_text("{")
        record = {
            "kind": watch.SPOOL_RECORD_KIND,
            "tracking_uri": store,
            "run_id": run.info.run_id,
            "reason": "the server was lost",
            "metrics": {"loss": {"0": [0.5, 1]}},
        }
        (spool / f"{run.info.run_id}.json").write_text(json.dumps(record))
        lines = watch.deliver_spooled_runs()
        assert len(lines) == 3
        text = "\n".join(lines)
        assert f"Set aside {spool / 'a-list.json'} (it is not a spool record of this project)" in text
        assert f"Set aside {spool / 'not-json.json'} (" in text
        dropped = f"Run {run.info.run_id} was deleted at {store}; dropping its spool record {run.info.run_id}.json"
        assert dropped in lines
        assert sorted(path.name for path in spool.iterdir()) == ["a-list.json.unreadable", "not-json.json.unreadable"]
        assert watch.deliver_spooled_runs() == [], "nothing is read twice"
        assert client.get_metric_history(run.info.run_id, "loss") == []
    finally:
        mlflow.set_tracking_uri(None)


def test_the_one_retry_tries_again_only_what_is_worth_it():
    from mnist_mlflow.retry import retry

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "done"

    assert retry(flaky, lambda error: isinstance(error, ConnectionError), attempts=5, pause_s=lambda _: 0) == "done"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionError):
        retry(flaky, lambda error: True, attempts=2, pause_s=lambda _: 0)
    assert len(calls) == 2, "no more than the attempts allowed"
    with pytest.raises(ValueError):
        retry(lambda: int("x"), lambda error: isinstance(error, ConnectionError), pause_s=lambda _: 0)
