"""Who holds a run: a lease with a fencing token, judged on the tracking server's clock.

A process writes to a run only while it holds the run's lease. The lease is two tags: the
token (``<fence>:<holder>``, the fence a number that grows with every holder) and the time, on
the tracking server's clock, until which the holder promises to renew it or to have stopped.

- A run this process creates is its own at once (fence 1): no one else knows its id yet.
- Taking a run over (a resume, or a search trial queued again) installs the next fence. A
  holder whose token was replaced finds out at its next check and stops without writing.
- MLflow has no compare-and-set, so a take-over is a claim in three moves: read the run (no
  live lease may be on it), write the token, and read it back ``SETTLE_S`` later. The last
  writer wins. This holds when every claimer's read and write fall within
  ``CLAIM_WINDOW_S`` of each other, and ``SETTLE_S`` is at least that long: a rival who read
  the run before our write wrote before our read-back, so the read-back sees the winner. A
  claimer that took longer withdraws. It may have overwritten the winner's token; the winner
  then stops at its next check and nobody writes, which is safe, and the run's lease expires.
- Time is the server's: the ``Date`` header of its answers (one second's resolution) gives this
  process's offset from it once. A reader judges a lease on the same clock as its writer.
- Between two looks at the server, a holder trusts its lease only for the time it has left
  by its own monotonic clock, less a margin. A process that was suspended past that (SIGSTOP,
  a paused VM, a laptop lid) asks the server again before its next write. Within it, a renewal
  is one request; every ``VERIFY_EVERY_RENEWALS``-th also reads the run back, to notice a run
  closed by someone else.

The remaining gap: a process frozen between its last local check and the request that follows
(microseconds) can still send that one request after a take-over.
"""

from __future__ import annotations

import email.utils
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from mnist_mlflow import lifecycle
from mnist_mlflow.tracking.server import server_timeout_s

LEASE_TAG = "mnist_mlflow.lease"
LEASE_UNTIL_TAG = "mnist_mlflow.lease_until"
# A claim's read and write must fall within this many seconds; its read-back waits as long.
CLAIM_WINDOW_S = 3.0
SETTLE_S = CLAIM_WINDOW_S
# How long before its lease runs out, by its own clock, a holder asks the server again.
LOCAL_MARGIN_S = 5.0
# The Date header says whole seconds; two estimates of the server's time can differ by this.
CLOCK_RESOLUTION_S = 2.0
# The longest pause between two renewals: a renewal costs one small request, and every
# VERIFY_EVERY_RENEWALS-th one a second, which reads the run back.
MAX_RENEWAL_INTERVAL_S = 15.0
VERIFY_EVERY_RENEWALS = 4


class LeaseLost(lifecycle.Terminated):
    """Another process took over a run that this process held (or closed it)."""

    exit_status = 1

    def line(self) -> str:
        return f"error: {self.reason}"


class LeaseRefused(Exception):
    """Another process holds, or is taking, the run this process meant to take over."""


class ServerClock:
    """The tracking server's clock, as this process's clock plus an offset measured once per server."""

    def __init__(self) -> None:
        self._offsets: dict[str, float] = {}
        self._lock = threading.Lock()

    def now(self) -> float:
        uri = mlflow.get_tracking_uri()
        with self._lock:
            if uri not in self._offsets:
                self._offsets[uri] = _measure_offset(uri)
            return time.time() + self._offsets[uri]


def _measure_offset(uri: str) -> float:
    """The server's clock minus this one's, from the ``Date`` header of ``/health``; 0 for a
    local store (one machine, one clock) or a server that sends no date."""
    if not uri.startswith(("http://", "https://")):
        return 0.0
    import requests

    try:
        before = time.time()
        response = requests.get(uri.rstrip("/") + "/health", timeout=10)
        after = time.time()
        server_time = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    except (requests.RequestException, KeyError, TypeError, ValueError):
        return 0.0
    # The header truncates to the second: the server's time was within [date, date + 1).
    return server_time + 0.5 - (before + after) / 2


CLOCK = ServerClock()


def lease_duration_s() -> float:
    """How long a lease lasts unrenewed: the holder's server timeout, plus two renewals' time."""
    return server_timeout_s() + 2 * renewal_interval_s()


def renewal_interval_s() -> float:
    """How often a holder renews: four times per server timeout, and at least every ``MAX_RENEWAL_INTERVAL_S``."""
    return max(1.0, min(MAX_RENEWAL_INTERVAL_S, server_timeout_s() / 4))


@dataclass(frozen=True)
class Token:
    fence: int
    holder: str

    def __str__(self) -> str:
        return f"{self.fence}:{self.holder}"

    @classmethod
    def parse(cls, text: str | None) -> Token | None:
        try:
            fence, holder = str(text).split(":", 1)
            return cls(int(fence), holder)
        except ValueError:
            return None


def lease_expired(tags: dict[str, str], now_s: float | None = None) -> bool:
    """Whether a run's lease has run out on the server's clock (a run without one has none to hold)."""
    try:
        until = float(tags[LEASE_UNTIL_TAG])
    except (KeyError, ValueError):
        return True
    return (CLOCK.now() if now_s is None else now_s) > until + CLOCK_RESOLUTION_S


class Lease:
    """This process's hold on one run (see the module docstring)."""

    def __init__(self, run_id: str, token: Token) -> None:
        self.run_id = run_id
        self.token = token
        self._valid_until = 0.0  # On this process's monotonic clock.
        self._lock = threading.Lock()

    @classmethod
    def new_run(cls, run_id: str) -> Lease:
        """The lease of a run this process has just created."""
        lease = cls(run_id, Token(1, _holder_id()))
        lease._write()
        return lease

    @classmethod
    def take_over(cls, run_id: str) -> Lease:
        """Claims a run another process held; raises :class:`LeaseRefused` when another process
        holds it or wins the claim. Takes about ``SETTLE_S`` seconds."""
        client = MlflowClient()
        started = time.monotonic()
        run = client.get_run(run_id)
        tags = run.data.tags
        current = Token.parse(tags.get(LEASE_TAG))
        if current is not None and not lease_expired(tags):
            raise LeaseRefused(f"another process holds run {run_id} (fence {current.fence}) and renews it")
        lease = cls(run_id, Token((current.fence if current else 0) + 1, _holder_id()))
        lease._write()
        if time.monotonic() - started > CLAIM_WINDOW_S:
            raise LeaseRefused(
                f"claiming run {run_id} took longer than {CLAIM_WINDOW_S:g} s, too long to be sure of it"
            )
        time.sleep(SETTLE_S)
        # The read-back: the run is still KILLED (it is reopened once the claim holds), so only
        # the token counts here.
        read_back = client.get_run(run_id)
        if Token.parse(read_back.data.tags.get(LEASE_TAG)) != lease.token:
            raise LeaseRefused(f"another process claimed run {run_id} at the same moment, and won")
        return lease

    def _write(self) -> None:
        sent = time.monotonic()
        until = CLOCK.now() + lease_duration_s()
        # One request, so that no reader sees the token without its time.
        MlflowClient().log_batch(
            self.run_id, tags=[RunTag(LEASE_TAG, str(self.token)), RunTag(LEASE_UNTIL_TAG, f"{until:.1f}")]
        )
        self._valid_until = sent + lease_duration_s() - LOCAL_MARGIN_S

    def renew(self, verify: bool = True) -> None:
        """Extends the lease. With ``verify``, or when the lease may have run out meanwhile (by
        this process's clock), it first checks with the server that the lease is still this
        process's and the run still RUNNING. Otherwise nobody can have taken the run over (a
        take-over waits for the lease to run out), so one request does."""
        with self._lock:
            if verify or time.monotonic() >= self._valid_until:
                self._raise_if_lost(MlflowClient().get_run(self.run_id))
            sent = time.monotonic()
            until = CLOCK.now() + lease_duration_s()
            MlflowClient().set_tag(self.run_id, LEASE_UNTIL_TAG, f"{until:.1f}")
            self._valid_until = sent + lease_duration_s() - LOCAL_MARGIN_S

    def verify(self) -> None:
        """Checks with the server, without extending the lease, that the run is still this
        process's and RUNNING (before its last writes)."""
        with self._lock:
            self._raise_if_lost(MlflowClient().get_run(self.run_id))

    def check(self) -> None:
        """Before a write: passes at once while the lease is surely held, else asks the server."""
        if time.monotonic() < self._valid_until:
            return
        self.renew()

    def release(self) -> None:
        """Lets the run go (it has ended): anyone may take it over at once."""
        MlflowClient().set_tag(self.run_id, LEASE_UNTIL_TAG, "0")

    def _raise_if_lost(self, run) -> None:
        token = Token.parse(run.data.tags.get(LEASE_TAG))
        if token != self.token:
            fence = f"fence {token.fence}" if token else "no lease"
            raise LeaseLost(
                f"run {self.run_id} was taken over by another process ({fence}; this one held fence "
                f"{self.token.fence}) while this one was paused or cut off; stopping without writing to it"
            )
        if run.info.status != "RUNNING":
            reason = run.data.tags.get("killed_reason") or run.data.tags.get("failed_reason") or "no reason given"
            raise LeaseLost(
                f"run {self.run_id} was closed {run.info.status} by another process while this one was "
                f"still training it ({reason[:200]}); stopping without touching it"
            )


def _holder_id() -> str:
    """Who holds a lease: this host and process, and a random part no other claim shares."""
    return f"{platform.node()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
