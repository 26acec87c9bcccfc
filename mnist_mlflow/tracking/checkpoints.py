"""Checkpoints kept with the run, and resuming a killed run from its last finished epoch.

Each finished epoch's checkpoint (its format is :mod:`mnist_mlflow.checkpointing`'s)
goes to the run's artifacts under ``checkpoint/``, in the tracking server's artifact store,
so that any machine can resume it. It is uploaded in the background while the next epoch
trains (:class:`CheckpointKeeper`), into one of two slots, ``checkpoint/a`` and
``checkpoint/b``, in turn; the best epoch's weights go to ``checkpoint/best/``. Only once
every file of an epoch is up do the tags ``mnist_mlflow.checkpoint_epoch`` and ``mnist_mlflow.checkpoint_slot`` name
it, so a kill in the middle of an upload leaves the previous checkpoint whole. A slot is used
only when its files match their digests; a damaged slot falls back to the other one.

A run resumed goes back to RUNNING; its metric history goes on at the next step; the tag
``resume_count`` counts the resumes and ``resumed_<n>`` says when, where and from which epoch.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from mnist_mlflow.retry import retry
from mnist_mlflow.tracking.runs import KILLED_REASON_TAG
from mnist_mlflow.tracking.server import server_timeout_s
from mnist_mlflow.tracking.watch import send_missing, server_lost

CHECKPOINT_ARTIFACT_PATH = "checkpoint"
CHECKPOINT_EPOCH_TAG = "mnist_mlflow.checkpoint_epoch"
CHECKPOINT_SLOT_TAG = "mnist_mlflow.checkpoint_slot"
SLOTS = ("a", "b")
BEST_FOLDER = "best"
# The best epoch's weights (checkpointing.best_weights_file) go to BEST_FOLDER, not to a slot.
BEST_PREFIX = "best-"
RESUME_COUNT_TAG = "resume_count"
PARENT_RUN_TAG = "mlflow.parentRunId"


class CheckpointKeeper:
    """Keeps each epoch's checkpoint with run ``run_id``, uploading in the background.

    Called with an epoch's files, it copies them aside (the next epoch writes over the folder)
    and uploads them in a thread while training goes on. While the tracking server does not
    answer, the thread keeps trying, for as long as the run's server timeout; meanwhile
    training goes on, and the epochs that end during the upload keep no checkpoint of their
    own (the next one that can be sent does). Any other failure (say, a full disk) is raised
    by the next call, or by :meth:`wait` at the end of training.
    """

    def __init__(self, run_id: str, fence: Any) -> None:
        from mlflow.artifacts import get_artifact_repository

        self.run_id = run_id
        # The run's lease: the tags that make an upload the run's checkpoint are written only
        # while this process holds it.
        self.fence = fence
        client = MlflowClient()
        active = mlflow.active_run()
        # The active run's artifact location is known without asking the server.
        if active is not None and active.info.run_id == run_id:
            artifact_uri = active.info.artifact_uri
        else:
            artifact_uri = client.get_run(run_id).info.artifact_uri
        self.repository = get_artifact_repository(artifact_uri)
        self.client = client
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Best-weight files already with the run: an epoch's checkpoint names one, which an
        # earlier epoch wrote, and which is sent with the first checkpoint that goes up.
        self._best_sent: set[str] = set()

    def __call__(self, folder: Path, epoch: int, files: list[str]) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # The previous upload is still trying; this epoch keeps no checkpoint.
        self.wait()
        from mnist_mlflow.checkpointing import Checkpoint

        named = Checkpoint.manifest_of(folder)
        # The best epoch's file of a resumed fit is already with the run (checkpoint/best).
        best = [
            name
            for name in named
            if name.startswith(BEST_PREFIX) and name not in files and (Path(folder) / name).exists()
        ]
        files = [*files, *(name for name in best if name not in self._best_sent)]
        staging = Path(tempfile.mkdtemp(prefix="mnist-mlflow-checkpoint-upload-"))
        for name in files:
            shutil.copy2(Path(folder) / name, staging / name)
        self._thread = threading.Thread(
            target=self._upload, args=(staging, epoch, files), name="checkpoint-upload", daemon=True
        )
        self._thread.start()

    def upload_now(self, folder: Path, epoch: int, files: list[str]) -> None:
        """Uploads a checkpoint at once (a new run taking over a killed run's checkpoint)."""
        self(folder, epoch, files)
        self.wait()

    def wait(self) -> None:
        """Waits for the upload in flight; raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _upload(self, staging: Path, epoch: int, files: list[str]) -> None:
        slot = SLOTS[epoch % 2]

        def send() -> None:
            for name in files:
                folder = f"{CHECKPOINT_ARTIFACT_PATH}/{BEST_FOLDER if name.startswith(BEST_PREFIX) else slot}"
                self.repository.log_artifact(str(staging / name), folder)
            self.fence.check()
            self.client.log_batch(
                self.run_id, tags=[RunTag(CHECKPOINT_SLOT_TAG, slot), RunTag(CHECKPOINT_EPOCH_TAG, str(epoch))]
            )

        try:
            # While the server does not answer, for as long as the run's server timeout.
            retry(
                send,
                lambda error: server_lost(error) is not None,
                within_s=server_timeout_s(),
                pause_s=lambda attempt: 2.0,
            )
            self._best_sent.update(name for name in files if name.startswith(BEST_PREFIX))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = error
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def download_checkpoint(run_id: str):
    """The run's last checkpoint that is whole (a :class:`mnist_mlflow.checkpointing.Checkpoint`),
    downloaded to a fresh local folder and verified by its digests; the other slot when the
    latest is damaged; None, saying so, when neither can be used."""
    from mnist_mlflow.checkpointing import CheckpointDamaged

    run = MlflowClient().get_run(run_id)
    latest = run.data.tags.get(CHECKPOINT_SLOT_TAG, SLOTS[0])
    problems = []
    for slot in (latest, *(other for other in SLOTS if other != latest)):
        try:
            return _download_slot(run_id, slot)
        except CheckpointDamaged as damage:
            problems.append(f"slot {slot}: {damage}")
        except mlflow.exceptions.MlflowException as error:
            if server_lost(error) is not None:
                raise
            problems.append(f"slot {slot}: {str(error).splitlines()[0][:200]}")
        if slot == latest:
            print(f"The latest checkpoint of run {run_id} cannot be used ({problems[-1]}); trying the other slot")
    print(
        f"Neither checkpoint of run {run_id} can be used ({'; '.join(problems)}); starting a new run",
        flush=True,
    )
    return None


def _download_slot(run_id: str, slot: str):
    from mnist_mlflow.checkpointing import Checkpoint, CheckpointDamaged

    folder = Path(tempfile.mkdtemp(prefix="mnist-mlflow-resume-"))
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT_PATH}/{slot}", dst_path=str(folder)
            )
        )
    except OSError as error:
        raise CheckpointDamaged(f"it cannot be downloaded ({error})") from None
    for name in Checkpoint.manifest_of(downloaded):
        if name.startswith(BEST_PREFIX):
            best = f"{CHECKPOINT_ARTIFACT_PATH}/{BEST_FOLDER}/{name}"
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=best, dst_path=str(downloaded))
    return Checkpoint.read(downloaded)


def killed_with_checkpoint(
    entry_point: str,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    child_key: str | None = None,
):
    """The newest KILLED run of this kind that holds a checkpoint, or None.

    A run of its own in ``experiment_id`` (``parent_run_id`` None), or a study's child of that
    parent, in the parent's experiment, with that key.
    """
    if experiment_id is None:
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    filters = ["attributes.status = 'KILLED'", f"tags.entry_point = '{entry_point}'"]
    if parent_run_id:
        filters.append(f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")
    if child_key:
        filters.append(f"tags.study_child_key = '{child_key}'")
    runs = MlflowClient().search_runs(
        [experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"], max_results=50
    )
    for run in runs:
        tags = run.data.tags
        if CHECKPOINT_EPOCH_TAG not in tags:
            continue
        if parent_run_id is None and PARENT_RUN_TAG in tags:
            continue
        return run
    return None


def differences(run, params: Mapping[str, Any], limit: int = 3) -> str:
    """How a run's parameters differ from ``params``, as ``name: there -> here``, a few of them."""
    recorded = run.data.params
    changed = [
        f"{name} {recorded.get(name, 'unset')} there, {value} here"
        for name, value in sorted(params.items())
        if str(recorded.get(name)) != str(value)
    ]
    return "; ".join(changed[:limit]) + ("; ..." if len(changed) > limit else "") or "its fingerprint"


def record_resume(run_id: str, epoch: int) -> int:
    """Counts one more resume of the run, and says when, where, from which epoch and why it had
    stopped. The run's ``killed_reason`` moves into that record: the run is no longer killed."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    count = int(tags.get(RESUME_COUNT_TAG, "0")) + 1
    client.set_tag(run_id, RESUME_COUNT_TAG, str(count))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    record = f"after epoch {epoch + 1}, at {when}, on {platform.node()}"
    killed = tags.get(KILLED_REASON_TAG)
    if killed:
        record += f"; it had stopped: {killed}"
    client.set_tag(run_id, f"resumed_{count}", record[:5000])
    if killed:
        client.delete_tag(run_id, KILLED_REASON_TAG)
    return count


def deliver_history(run_id: str, history: Mapping[str, list[float]]) -> int:
    """Logs the checkpoint's per-epoch values the run lacks (a kill can fall between the
    checkpoint and the metrics of an epoch); returns how many were sent."""
    now_ms = int(time.time() * 1000)
    points = {key: {step: (value, now_ms) for step, value in enumerate(values)} for key, values in history.items()}
    return sum(map(len, send_missing(MlflowClient(), run_id, points).values()))
