"""The one seam between an experiment and keeping its run alive.

The experiment's code says, in a few lines::

    with tracking.RunSession(placement, fingerprint, resume) as session:
        ...build the model...
        result = training.train_and_evaluate(..., durability=session.durability(folder))
        session.check()          # before the closing writes
        ...log the result and the model...

and the session does the rest, in this order:

1. chooses whether to resume (:meth:`RunSession._choose_resume`): the killed run must have
   done the same work (its fingerprint: the parameters, the project, TensorFlow, Keras and the
   data's digest), this process must win the run's lease (:mod:`~.lease`), and one of its
   two checkpoint slots must match its digests (:mod:`~.checkpoints`);
2. starts the run, or reopens the killed one, holding its lease; the watch renews it
   (:mod:`~.watch`);
3. hands the fit its :class:`~mnist_mlflow.checkpointing.Durability`: each finished epoch's
   metrics, sent once each and fenced by the lease, and its checkpoint, uploaded into a slot;
4. at the end delivers what the server lacks (the ledger, or the spool if the server is gone)
   and ends the run FINISHED, FAILED or KILLED, always with a stated reason when it did not
   finish; a process that lost the lease writes nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.config import RunFailedError
from mnist_mlflow.tracking import checkpoints, lease, watch
from mnist_mlflow.tracking.runs import (
    FAILED_REASON_TAG,
    KILLED_REASON_TAG,
    keras_metrics_logger,
    set_run_tags,
    steps_held,
)
from mnist_mlflow.tracking.server import current_experiment_id, launcher_run_id, tracking_uri_shown

FINGERPRINT_TAG = "mnist_mlflow.fingerprint"


@dataclass(frozen=True)
class RunPlacement:
    """Where a run goes and what it is called: its name, tags and description, and its parent
    (a study's) if it has one."""

    run_name: str
    tags: Mapping[str, str]
    description: str | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True)
class ResumeFrom:
    """A killed run to go on from: the same run reopened (``same_run``), or a new run that takes
    over its work (a search trial queued again)."""

    run_id: str
    same_run: bool = True


@dataclass(frozen=True)
class Fingerprint:
    """What a run's work depends on: a digest of its parameters, the project's version,
    TensorFlow's and Keras's, and the data's digest. A run is resumed only by equal work."""

    parts: Mapping[str, str]
    params: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def digest_of(values: Mapping[str, Any]) -> str:
        """The project's one digest of settings: a run's parameters, a study's settings. Equal
        settings, equal digest."""
        text = json.dumps(dict(values), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def text(self) -> str:
        return json.dumps(dict(sorted(self.parts.items())))

    def differences(self, run) -> str | None:
        """How ``run``'s recorded fingerprint differs from this one, or None when it does not."""
        try:
            recorded = json.loads(run.data.tags.get(FINGERPRINT_TAG, ""))
        except ValueError:
            recorded = {}
        if not isinstance(recorded, dict):
            recorded = {}
        changed = []
        for name, value in sorted(self.parts.items()):
            there = recorded.get(name)
            if there == value:
                continue
            if name == "parameters":
                changed.append(checkpoints.differences(run, self.params))
            else:
                changed.append(f"{name} {there or 'unrecorded'} there, {value} here")
        return "; ".join(changed) or None


class RunSession:
    """One run's life: its start or resume, its lease, what the fit needs to be resumable, and
    its end (see the module docstring). A context manager; its value is the session."""

    def __init__(self, placement: RunPlacement, fingerprint: Fingerprint, resume: ResumeFrom | None = None):
        self.placement = placement
        self.fingerprint = fingerprint
        self.run_id = ""
        self.checkpoint = None
        self._resume = resume
        self._stack = contextlib.ExitStack()
        self._keeper: checkpoints.CheckpointKeeper | None = None
        self._lease: lease.Lease | None = None

    def __enter__(self) -> RunSession:
        # A safe point: a stop that was lost on its way (see lifecycle) is raised here.
        lifecycle.raise_pending_stop()
        continuing = self._choose_resume()
        self.run_id = self._stack.enter_context(
            start_run(self.placement, {FINGERPRINT_TAG: self.fingerprint.text()}, continuing, self._lease)
        )
        try:
            self._lease = _HELD[self.run_id]
            print(f"MLflow run {self.run_id} ({self.placement.run_name}) at {tracking_uri_shown()}", flush=True)
            if self.checkpoint is not None:
                self._announce_resume()
        except BaseException:
            # A with statement does not call __exit__ when __enter__ fails: the run still ends
            # as the failure says (KILLED on a stop, FAILED otherwise), never left RUNNING.
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc_info) -> bool:
        return self._stack.__exit__(*exc_info)

    def durability(self):
        """What the fit needs: a folder for each epoch's checkpoint, the keeper that uploads it,
        the checkpoint to go on from, and the fenced logger of each epoch's metrics."""
        from mnist_mlflow.checkpointing import Durability

        self._keeper = checkpoints.CheckpointKeeper(self.run_id, self._lease)
        held = steps_held(self.run_id, self.checkpoint.epoch) if self.checkpoint is not None else None
        return Durability(
            folder=Path(tempfile.mkdtemp(prefix="mnist-mlflow-checkpoint-")),
            on_saved=self._keeper,
            resume=self.checkpoint,
            callbacks=[
                watch.epoch_ledger(self.run_id),
                fence_each_epoch(self._lease),
                keras_metrics_logger(self.run_id, held),
            ],
        )

    def check(self) -> None:
        """Before writing the run's results: waits for the last checkpoint's upload (raising its
        error), and stops if this process no longer holds the run."""
        lifecycle.raise_pending_stop()
        if self._keeper is not None:
            self._keeper.wait()
        self._lease.check()

    def _choose_resume(self) -> str | None:
        """Settles ``self.checkpoint`` and the lease of a killed run to go on from; returns the
        id of the run to reopen, or None for a new run."""
        resume = self._resume
        if resume is None:
            return None
        killed = MlflowClient().get_run(resume.run_id)
        epoch = int(killed.data.tags.get(checkpoints.CHECKPOINT_EPOCH_TAG, "-1")) + 1
        differs = self.fingerprint.differences(killed)
        if differs:
            print(
                f"Not resuming run {resume.run_id} (killed after epoch {epoch}): its configuration differs "
                f"({differs}); starting a new run",
                flush=True,
            )
            return None
        try:
            claimed = lease.Lease.take_over(resume.run_id)
        except lease.LeaseRefused as refused:
            if resume.same_run:
                raise RunHeldElsewhere(f"not resuming run {resume.run_id}: {refused}") from None
            print(f"Not taking over run {resume.run_id}: {refused}; starting a new run", flush=True)
            return None
        self.checkpoint = checkpoints.download_checkpoint(resume.run_id)
        if self.checkpoint is None:
            claimed.release()
            return None
        if not resume.same_run:
            claimed.release()
            return None
        self._lease = claimed
        return resume.run_id

    def _announce_resume(self) -> None:
        """Records and says what is resumed, from which epoch; sends the checkpoint's history
        (and, for a new run taking over, the checkpoint itself) to the run."""
        done = self.checkpoint.epoch + 1
        epochs = self.fingerprint.params.get("epochs")
        done = f"{done} of {epochs}" if epochs is not None else f"{done}"
        run_id, resume = self.run_id, self._resume
        count = checkpoints.record_resume(run_id, self.checkpoint.epoch)
        if resume.same_run:
            what = f"Resuming run {run_id} (resume {count}) from its checkpoint after epoch {done}"
        else:
            set_run_tags(run_id, {"resumed_from_run": resume.run_id})
            set_run_tags(resume.run_id, {"resumed_by_run": run_id})
            keeper = checkpoints.CheckpointKeeper(run_id, self._lease)
            keeper.upload_now(self.checkpoint.folder, self.checkpoint.epoch, self.checkpoint.files())
            what = f"Taking over killed run {resume.run_id} from its checkpoint after epoch {done}"
        checkpoints.deliver_history(run_id, self.checkpoint.state["history"])
        print(what, flush=True)


def fence_each_epoch(held: lease.Lease):
    """A Keras callback that checks the lease before each epoch's metrics are sent (it comes
    before the metrics logger): a process that lost the run stops there, having sent nothing.
    A server that does not answer is the watch's to judge, not this check's."""
    import keras

    class FenceEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            try:
                held.check()
            except lease.LeaseLost:
                raise
            except Exception as error:  # noqa: BLE001 - only an unreachable server is let through
                if watch.server_lost(error) is None:
                    raise

    return FenceEachEpoch()


class RunHeldElsewhere(lifecycle.Terminated):
    """Another process holds, or has just taken, the run this process meant to resume."""

    exit_status = 75  # EX_TEMPFAIL: the work is being done; nothing here failed.

    def line(self) -> str:
        return f"stopped: {self.reason}; that process carries on with it, and this one wrote nothing to it"


# The lease of each run this process holds, by run id.
_HELD: dict[str, lease.Lease] = {}


@contextlib.contextmanager
def start_run(
    placement: RunPlacement,
    tags: Mapping[str, str] | None = None,
    continue_run_id: str | None = None,
    held: lease.Lease | None = None,
) -> Iterator[str]:
    """Starts (or, under ``mlflow run``, adopts; or, with ``continue_run_id`` and its ``held``
    lease, reopens) a run, names and tags it, holds its lease, and yields its id.

    It ends FINISHED when the block completes; KILLED, tagged ``killed_reason``, on Ctrl-C,
    SIGTERM or the end of the launcher; and FAILED, tagged ``failed_reason``, otherwise. So no
    run is ever left RUNNING by this process while it can still act. A process that lost the
    run's lease, or whose server is gone, writes nothing more to it.
    """
    _quiet_system_metrics_logging()
    # MLflow's system metrics (CPU, memory, and a GPU where there is one) for every run, unless
    # the user turned them off with MLflow's own variable.
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    with _open_run(placement, continue_run_id) as run:
        run_id = run.info.run_id
        try:
            try:
                # Inside the try: a signal while the tags are being written still ends the run KILLED.
                run_lease = held or lease.Lease.new_run(run_id)
                _HELD[run_id] = run_lease
                named = {"mlflow.runName": placement.run_name, **placement.tags, **(tags or {})}
                mlflow.set_tags({**named, **lifecycle.process_identity()})
                watch.WATCH.add(run_id, run_lease)
                yield run_id
            finally:
                watch.WATCH.remove(run_id)
            # The last safe point before FINISHED: a stop that was lost on its way ends the run KILLED.
            lifecycle.raise_pending_stop()
            _deliver_ledger(run_id)
            run_lease.verify()
            _end_run(run_id, "FINISHED")
        except BaseException as error:
            raise _ending(run_id, error) from None
        finally:
            _HELD.pop(run_id, None)


def _open_run(placement: RunPlacement, continue_run_id: str | None):
    """The MLflow run to work in: the killed run reopened, a child of a study's parent, the
    launcher's run, or a new run in the experiment chosen for this kind of work."""
    if continue_run_id:
        launcher = launcher_run_id()
        if launcher and launcher != continue_run_id:
            client = MlflowClient()
            client.set_tag(launcher, "resumed_run_id", continue_run_id)
            client.set_tag(launcher, "mlflow.note.content", f"This launch continued run {continue_run_id}.")
        return mlflow.start_run(run_id=continue_run_id)
    if placement.parent_run_id:
        experiment_id = MlflowClient().get_run(placement.parent_run_id).info.experiment_id
        return mlflow.start_run(
            experiment_id=experiment_id,
            run_name=placement.run_name,
            parent_run_id=placement.parent_run_id,
            description=placement.description,
        )
    return mlflow.start_run(experiment_id=current_experiment_id(), description=placement.description)


def _deliver_ledger(run_id: str) -> None:
    late = watch.deliver_ledger(run_id)
    if late:
        print(f"The tracking server had not taken {late}; sent them again", flush=True)


def _ending(run_id: str, error: BaseException) -> BaseException:
    """Ends the run as ``error`` says, and returns what the process raises.

    - the lease lost (taken over, or the run closed by someone else): nothing is written;
    - the server gone: nothing is written; the ledger goes to the spool;
    - Ctrl-C, SIGTERM, the launcher's end: KILLED with ``killed_reason``;
    - anything else: FAILED with ``failed_reason``, the error's own line when it has none better.
    """
    stop = error if isinstance(error, KeyboardInterrupt) else lifecycle.termination_from(error)
    if isinstance(stop, lease.LeaseLost) or isinstance(error, lease.LeaseLost):
        _let_go(run_id)
        return stop if isinstance(stop, lease.LeaseLost) else error
    lost = stop if isinstance(stop, watch.TrackingServerLost) else None
    if lost is None and not isinstance(error, KeyboardInterrupt):
        lost = watch.server_lost(error, run_id)
    if lost is not None:
        return _abandon(run_id, lost)
    if stop is not None:
        _end_run(run_id, "KILLED", KILLED_REASON_TAG, lifecycle.interruption_reason(stop))
        return stop
    if isinstance(error, RunFailedError):
        _end_run(run_id, "FAILED", FAILED_REASON_TAG, str(error))
        return error
    failure = watch.upload_failure(error) if isinstance(error, Exception) else None
    if failure is not None:
        _end_run(run_id, "FAILED", FAILED_REASON_TAG, failure)
        return RunFailedError(failure)
    first_line = (str(error).strip().splitlines() or [""])[0][:500]
    _end_run(run_id, "FAILED", FAILED_REASON_TAG, f"{type(error).__name__}: {first_line}")
    return error


def _end_run(run_id: str, status: str, tag: str | None = None, reason: str = "") -> None:
    """Ends the run with ``status``. A run that did not finish gets its reason and lets its
    lease go, in one request, so that the next command may resume it at once (a FINISHED run is
    never taken over). A process already stopping ignores a second signal meanwhile, which must
    not leave the run RUNNING; a run that finishes still takes a stop."""
    if tag is None:
        mlflow.end_run(status)
        return
    with lifecycle.signals_deferred():
        try:
            MlflowClient().log_batch(run_id, tags=[RunTag(lease.LEASE_UNTIL_TAG, "0"), RunTag(tag, reason[:5000])])
        finally:
            mlflow.end_run(status)


def _let_go(run_id: str) -> None:
    """Leaves a run that someone else took over or closed, as they left it."""
    watch.WATCH.remove(run_id)
    watch.forget_active_run()


def _abandon(run_id: str, lost: watch.TrackingServerLost) -> watch.TrackingServerLost:
    """Lets go of a run whose server is gone, keeping what it could not send in the spool."""
    watch.forget_active_run()
    watch.silence_background_logging()
    kept, epochs = watch.spool_run(run_id, lost.reason)
    if kept is not None:
        lost.reason += (
            f". Its per-epoch metrics are kept in {kept}; the next command against that server delivers "
            "what it lacks and closes the run FAILED"
        )
    elif epochs:
        lost.reason += (
            f". The metrics of {epochs} epoch(s) could not be kept either: the spool folder "
            f"{watch.spool_dir()} cannot be written ({watch.SPOOL_DIR_ENV})"
        )
    return lost


def _quiet_system_metrics_logging() -> None:
    """MLflow's system-metrics monitor logs a line at every start and stop, and a warning when
    the server does not answer; the project says what matters in its own lines."""
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
