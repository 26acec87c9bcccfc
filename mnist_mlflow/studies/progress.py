"""A live view of long studies: one line after each finished child or trial, and the same figures
on the parent run, so that a terminal and the MLflow UI both say how far along the work is.

    [12/50] best val_accuracy 0.9781 (trial 7) · 6 min elapsed · about 9 min left

With several workers on one search, the counts are the whole study's, read from the shared
Optuna storage; the estimate comes from how fast the study's count grew while this worker watched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from mnist_mlflow import tracking


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


@dataclass
class Progress:
    """Counts finished children against ``total`` and says so, in a line and on the parent run."""

    parent_run_id: str
    total: int
    started: float = field(default_factory=time.monotonic)
    done_at_start: int | None = None
    last_done: int = -1

    def line(self, done: int, best_value: float | None, best_label: str | None) -> str:
        """The progress line for ``done`` finished children, the best so far and what is left."""
        elapsed = time.monotonic() - self.started
        if self.done_at_start is None:
            self.done_at_start = done - 1 if done else 0
        best = f"best val_accuracy {best_value:.4f} ({best_label})" if best_value is not None else "no result yet"
        finished_here = done - self.done_at_start
        if done >= self.total:
            left = "done"
        elif finished_here > 0 and elapsed > 0:
            left = f"about {_minutes((self.total - done) * elapsed / finished_here)} left"
        else:
            left = "estimating what is left"
        return f"[{done}/{self.total}] {best} · {_minutes(elapsed)} elapsed · {left}"

    def report(self, done: int, best_value: float | None, best_label: str | None) -> None:
        """Prints the line and records ``children_done`` (and the best so far) on the parent run,
        at step ``done``, once for each new count."""
        if done == self.last_done:
            return
        self.last_done = done
        print(self.line(done, best_value, best_label), flush=True)
        metrics = {"children_done": float(done), "children_total": float(self.total)}
        if best_value is not None and math.isfinite(best_value):
            metrics["best_val_accuracy_so_far"] = float(best_value)
        tracking.log_run_metrics(self.parent_run_id, metrics, step=done)
