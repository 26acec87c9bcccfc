"""Pure helpers for study summaries: Markdown tables and statistics.

Each study builds its own summary from its children's records (in its own module); these are
the parts they share. Nothing here logs: the study engine logs a summary in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd


def as_number(value: str | float | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def markdown_table(frame: pd.DataFrame, formats: dict[str, str]) -> str:
    """A GitHub Markdown table; ``formats`` maps column names to format specs such as ``.2%``."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    lines = [header, rule]
    # Records keep each column's type; iterrows would turn the whole row into floats.
    for row in frame.to_dict("records"):
        cells = []
        for column in frame.columns:
            value = row[column]
            spec = formats.get(column)
            if spec and isinstance(value, (int, float, np.floating, np.integer)) and not pd.isna(value):
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_std_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and a Student-t confidence interval of the mean.

    With one value the standard deviation and interval are undefined and returned as NaN.
    """
    from scipy import stats

    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    mean = float(array.mean())
    if len(array) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    deviation = float(array.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1)) * deviation / math.sqrt(len(array))
    return mean, deviation, mean - half_width, mean + half_width
