"""Two workers finishing a shared study write the same tags at once, against a real server."""

from __future__ import annotations

import threading

import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow import tracking

WORKERS = 6
TAGS_PER_WORKER = 40

pytestmark = pytest.mark.e2e


def _write_tags_together(run_id: str, set_tag) -> list[BaseException]:
    """Starts WORKERS threads that write the same fresh tags in the same order, released together."""
    barrier = threading.Barrier(WORKERS)
    errors: list[BaseException] = []

    def worker():
        client = MlflowClient()
        barrier.wait()
        for index in range(TAGS_PER_WORKER):
            try:
                set_tag(client, run_id, f"tag_{index}", "true")
            except BaseException as error:  # noqa: BLE001 - collected and asserted below.
                errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_the_same_tag_written_by_workers_at_once_is_written_once_without_error(tracking_uri):
    client = MlflowClient()
    experiment_id = client.create_experiment("concurrent-tags")
    run_id = client.create_run(experiment_id).info.run_id
    errors = _write_tags_together(run_id, tracking.set_tag)
    assert errors == []
    tags = client.get_run(run_id).data.tags
    assert all(tags[f"tag_{index}"] == "true" for index in range(TAGS_PER_WORKER))


def test_the_race_is_real_with_plain_set_tag(tracking_uri):
    """Shows what set_tag guards against: MLflow's own set_tag fails on the unique key."""
    client = MlflowClient()
    experiment_id = client.create_experiment("concurrent-tags-plain")
    failures = []
    for _ in range(5):
        run_id = client.create_run(experiment_id).info.run_id
        failures += _write_tags_together(
            run_id, lambda client, run_id, name, value: client.set_tag(run_id, name, value)
        )
        if failures:
            break
    assert any("UNIQUE constraint" in str(error) for error in failures)
