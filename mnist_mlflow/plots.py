"""Matplotlib figures people would rather look at than read. No MLflow here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str], title: str = "Confusion matrix (test)"):
    """An annotated heat map: true labels as rows, predicted labels as columns."""
    figure, axes = plt.subplots(figsize=(8, 7))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("True label")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            count = int(matrix[row, column])
            axes.text(
                column, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black",
            )
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axes.set_title(f"{title}: accuracy {accuracy:.2%}")
    figure.tight_layout()
    return figure


def history_figure(history: dict[str, list[float]], best_epoch: int | None = None):
    """Training vs validation loss and accuracy per epoch, with the selected epoch marked."""
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axes, metric, label in ((loss_axes, "loss", "Loss"), (accuracy_axes, "accuracy", "Accuracy")):
        axes.plot(epochs, history[metric], marker="o", label="training")
        if f"val_{metric}" in history:
            axes.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        if best_epoch is not None and best_epoch >= 0:
            axes.axvline(best_epoch + 1, color="grey", linestyle="--", label=f"selected epoch ({best_epoch + 1})")
        axes.set_xlabel("Epoch")
        axes.set_ylabel(label)
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("Training vs validation")
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)
