"""Scores of a selected model on the test split, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix


def confusion_counts(labels: np.ndarray, probabilities: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts with true labels as rows and predicted labels as columns."""
    return confusion_matrix(labels, probabilities.argmax(axis=1), labels=list(range(num_classes)))


def per_class_report(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Per-class precision, recall, F1 and support, plus accuracy and averages."""
    return classification_report(
        labels,
        probabilities.argmax(axis=1),
        labels=list(range(len(class_names))),
        target_names=class_names,
        output_dict=True,
        zero_division=0,
    )


def confusion_csv(matrix: np.ndarray, class_names: list[str]) -> str:
    """The confusion matrix as CSV: a header of predicted labels, one row per true label."""
    lines = ["true\\predicted," + ",".join(class_names)]
    for name, row in zip(class_names, matrix):
        lines.append(name + "," + ",".join(str(int(count)) for count in row))
    return "\n".join(lines) + "\n"
