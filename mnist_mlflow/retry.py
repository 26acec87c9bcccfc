"""The project's one way to try an action again.

Three things are retried, each for a reason of its own: a tag two workers write at the same
moment (the second insert fails on the unique key, and the update that follows succeeds), the
Optuna tables two workers create at once (optuna#1092), and a checkpoint upload while the
tracking server does not answer. Each says which errors are worth another try; everything else
is raised at once.

This module imports nothing of the project's or of TensorFlow's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def retry(
    action: Callable[[], Result],
    worth_retrying: Callable[[Exception], bool],
    *,
    attempts: int | None = None,
    within_s: float | None = None,
    pause_s: Callable[[int], float] = lambda attempt: 0.2 * (attempt + 1),
) -> Result:
    """Calls ``action`` until it returns; an error it raises is tried again while
    ``worth_retrying(error)`` says so, at most ``attempts`` times in all and for at most
    ``within_s`` seconds, pausing ``pause_s(attempt)`` between tries. The last error is raised."""
    give_up = time.monotonic() + within_s if within_s is not None else None
    attempt = 0
    while True:
        try:
            return action()
        except Exception as error:
            attempt += 1
            out_of_attempts = attempts is not None and attempt >= attempts
            out_of_time = give_up is not None and time.monotonic() > give_up
            if out_of_attempts or out_of_time or not worth_retrying(error):
                raise
            time.sleep(pause_s(attempt - 1))


def jittered(base_s: float, spread_s: float) -> Callable[[int], float]:
    """Pauses that grow with the attempt and differ between workers, so that two workers that
    collided once do not collide again."""
    return lambda attempt: base_s + spread_s * random.random() * (attempt + 1)
