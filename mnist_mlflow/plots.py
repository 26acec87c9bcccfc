"""Matplotlib figures people would rather look at than read. No MLflow here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# The widest figure drawn (inches), so that even the largest grid makes a figure of sane size.
MAX_FIGURE_INCHES = 20
# A heatmap labels at most this many rows and columns, and writes values in cells only while
# the columns are this few.
MAX_TICK_LABELS = 30
MAX_ANNOTATED_COLUMNS = 15


def _log_x_if_spread(axes, values) -> None:
    """A logarithmic x axis when the positive values span more than a factor of 20."""
    positive = [value for value in values if value > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_xscale("log")


def _finish(figure, axes, xlabel: str, ylabel: str, title: str, legend: str | None = "lower right"):
    """Labels, title, a light grid and the legend; the figure laid out and returned."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3, which="both")
    if legend:
        axes.legend(loc=legend)
    figure.tight_layout()
    return figure


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str], title: str = "Confusion matrix (test)"):
    """scikit-learn's annotated confusion matrix: true labels as rows, predicted labels as columns."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axes = plt.subplots(figsize=(8, 7))
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(ax=axes, cmap="Blues", values_format="d", xticks_rotation=45, colorbar=True)
    for text in display.text_.ravel():
        text.set_fontsize(8)
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


def image_mosaic(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """The images (n, height, width[, 1]) tiled row by row into one array, with a gap between them."""
    images = images.reshape(len(images), images.shape[1], images.shape[2])
    rows = max(1, int(np.ceil(len(images) / columns)))
    height, width = images.shape[1] + gap, images.shape[2] + gap
    mosaic = np.zeros((rows * height + gap, columns * width + gap), dtype=np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        mosaic[gap + row * height : (row + 1) * height, gap + column * width : (column + 1) * width] = image
    return mosaic


def misclassified_figure(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], max_images: int = 36
):
    """A grid of misclassified test images, each titled with its true and predicted label.

    The grid is one image in one plot (drawing 36 small plots took most of a second).
    """
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)[:max_images]
    columns = 6
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    tile = images.shape[1] + 12  # each tile with room for its two-line title
    figure, axes = plt.subplots(figsize=(columns * 1.8, rows * 2.0 + 0.6))
    spaced = np.zeros((max(len(wrong), 1), tile, images.shape[2]), dtype=np.float32)
    spaced[:, 12:, :] = images[wrong].reshape(-1, images.shape[1], images.shape[2]) if len(wrong) else 0
    axes.imshow(image_mosaic(spaced, columns), cmap="gray_r", interpolation="nearest")
    axes.axis("off")
    for position, index in enumerate(wrong):
        row, column = divmod(position, columns)
        axes.text(
            2 + column * (images.shape[2] + 2) + images.shape[2] / 2,
            2 + row * (tile + 2) + 6,
            f"true {class_names[labels[index]]}\npred "
            f"{class_names[predicted[index]]} ({probabilities[index].max():.0%})",
            ha="center",
            va="center",
            fontsize=8,
            color="firebrick",
        )
    total_wrong = int(np.sum(predicted != labels))
    axes.set_title(f"Misclassified test images: first {len(wrong)} of {total_wrong}")
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.93)
    return figure


def predictions_figure(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], count: int = 6
):
    """The first test images, each next to a bar chart of its predicted class probabilities."""
    count = min(count, len(images))
    figure, axes_grid = plt.subplots(
        count, 2, figsize=(8, count * 1.6), squeeze=False, gridspec_kw={"width_ratios": [1, 3]}
    )
    positions = np.arange(len(class_names))
    for row in range(count):
        image_axes, bar_axes = axes_grid[row]
        image_axes.imshow(images[row].squeeze(), cmap="gray_r")
        image_axes.axis("off")
        predicted = int(probabilities[row].argmax())
        image_axes.set_title(f"true {class_names[labels[row]]}", fontsize=8)
        colours = ["lightgrey"] * len(class_names)
        colours[predicted] = "seagreen" if predicted == labels[row] else "firebrick"
        bar_axes.bar(positions, probabilities[row], color=colours)
        bar_axes.set_ylim(0, 1)
        bar_axes.set_xticks(positions, labels=class_names, fontsize=7, rotation=30 if len(class_names[0]) > 2 else 0)
        bar_axes.set_ylabel("p", fontsize=8)
        bar_axes.set_title(f"predicted {class_names[predicted]} ({probabilities[row, predicted]:.1%})", fontsize=8)
    # Fixed margins: tight_layout would measure every label of twelve plots, which is slow.
    figure.subplots_adjust(left=0.04, right=0.98, bottom=0.05, top=0.95, hspace=0.9, wspace=0.15)
    return figure


def accuracy_vs_time_figure(
    labels: list[str],
    seconds_per_epoch: list[float],
    accuracies: list[float],
    highlight: str | None = None,
    title: str = "Validation accuracy against training time",
):
    """One labelled point per run: validation accuracy against mean seconds per epoch.

    Each label says what the run is (say ``7: batch 1``), placed beside its point where it
    overlaps no other label. The run labelled ``highlight`` (the reference) is drawn larger and in
    another colour. The time axis is logarithmic when the times span more than a factor of 20.
    """
    figure, axes = plt.subplots(figsize=(10, 6.5))
    for label, seconds, accuracy in zip(labels, seconds_per_epoch, accuracies, strict=True):
        is_highlight = label == highlight
        axes.scatter(
            seconds,
            accuracy * 100,
            s=120 if is_highlight else 50,
            zorder=3,
            color="tab:red" if is_highlight else "tab:blue",
            edgecolor="black" if is_highlight else None,
            label=f"{label} (reference)" if is_highlight else None,
        )
    _log_x_if_spread(axes, seconds_per_epoch)
    axes.margins(x=0.15, y=0.12)
    legend = "lower right" if highlight in labels else None
    _finish(figure, axes, "Mean seconds per epoch", "Best validation accuracy (%)", title, legend)
    points = [(seconds, accuracy * 100) for seconds, accuracy in zip(seconds_per_epoch, accuracies)]
    place_labels(figure, axes, points, labels)
    return figure


# Where a point's label may go, in points from the point, nearest first: right, left, above, below.
LABEL_OFFSETS = [(7, 3), (-7, 3), (7, -11), (-7, -11), (0, 10), (0, -16), (7, 15), (-7, 15), (7, -23), (-7, -23)]
LABEL_OFFSETS += [(dx, dy * 2) for dx, dy in LABEL_OFFSETS[4:]]


def place_labels(figure, axes, points: list[tuple[float, float]], labels: list[str], fontsize: int = 8) -> None:
    """Writes each label beside its point at the first offset where its box overlaps no label
    already placed and no other point, and stays inside the axes; failing that, at the offset
    that clashes least. Labels are placed from the most crowded point outwards, so that the
    crowded ones get the nearest places."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    marks = [axes.transData.transform(point) for point in points]

    def crowding(index: int) -> float:
        return -sum(1.0 / (1.0 + np.hypot(*(marks[index] - other))) for other in marks)

    placed = []
    for index in sorted(range(len(points)), key=crowding):
        best = None
        for dx, dy in LABEL_OFFSETS:
            text = axes.annotate(
                labels[index],
                points[index],
                textcoords="offset points",
                xytext=(dx, dy),
                fontsize=fontsize,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
            )
            box = text.get_window_extent(renderer).expanded(1.04, 1.15)
            clashes = sum(box.overlaps(other) for other in placed)
            # A marker is about 8 points across: keep its whole disc clear, not only its centre.
            around = box.padded(5)
            clashes += sum(around.contains(*mark) for position, mark in enumerate(marks) if position != index)
            clashes += 0 if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) else 1
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == 0:
                break
        placed.append(best[2])


def pareto_front_figure(
    trial_numbers: list[int],
    costs: list[float],
    accuracies: list[float],
    on_front: list[bool],
    chosen: int | None,
    cost_label: str,
    within: float,
    title: str = "Validation accuracy against cost: the Pareto front",
):
    """Every finished trial as a point, the Pareto front joined as a staircase, the chosen trial
    circled, and the band of accuracy within ``within`` of the best shaded.

    The cost axis is logarithmic when the costs span more than a factor of 20.
    """
    figure, axes = plt.subplots(figsize=(9, 6))
    costs_array = np.asarray(costs, dtype=float)
    percent = np.asarray(accuracies, dtype=float) * 100
    front = np.asarray(on_front, dtype=bool)
    axes.scatter(costs_array[~front], percent[~front], color="tab:gray", s=25, alpha=0.7, label="dominated trial")
    order = np.argsort(costs_array[front])
    axes.step(
        costs_array[front][order],
        percent[front][order],
        where="post",
        color="tab:orange",
        linewidth=2,
        marker="o",
        label="Pareto front",
        zorder=3,
    )
    for number, cost, accuracy in zip(
        np.asarray(trial_numbers)[front], costs_array[front], percent[front], strict=True
    ):
        axes.annotate(str(number), (cost, accuracy), textcoords="offset points", xytext=(5, -10), fontsize=8)
    if percent.size:
        best = percent.max()
        axes.axhspan(best - within * 100, best, color="tab:green", alpha=0.12, label=f"within {within:.2%} of the best")
    if chosen is not None:
        index = list(trial_numbers).index(chosen)
        axes.scatter(
            costs_array[index],
            percent[index],
            s=250,
            facecolors="none",
            edgecolors="tab:red",
            linewidths=2,
            zorder=4,
            label=f"chosen: trial {chosen}",
        )
    _log_x_if_spread(axes, list(costs_array))
    if percent.size:
        axes.set_ylim(max(percent.min() - 1, np.percentile(percent, 10) - 5), min(100.2, percent.max() + 0.5))
    return _finish(figure, axes, cost_label, "Best validation accuracy (%)", title)


def error_bar_figure(
    factors: list[float],
    means: list[float],
    standard_deviations: list[float],
    reference: float | None = None,
    reference_label: str = "",
    log_x: bool = False,
    title: str = "Validation accuracy against weight decay",
):
    """Mean validation accuracy per factor with one-standard-deviation bars and a reference line."""
    figure, axes = plt.subplots(figsize=(8, 5))
    means_percent = np.asarray(means) * 100
    errors_percent = np.nan_to_num(np.asarray(standard_deviations, dtype=float) * 100)
    axes.errorbar(factors, means_percent, yerr=errors_percent, fmt="o-", capsize=5, label="mean ± 1 standard deviation")
    if reference is not None:
        axes.axhline(reference * 100, color="tab:red", linestyle="--", label=reference_label)
    if log_x:
        axes.set_xscale("log")
    xlabel = "L2 weight-decay factor" + (" (log scale)" if log_x else "")
    return _finish(figure, axes, xlabel, "Validation accuracy (%)", title, legend="best")


def heatmap_figure(
    row_name: str,
    row_values: list,
    column_name: str,
    column_values: list,
    matrix: np.ndarray,
    title: str = "Validation accuracy over the grid",
):
    """Validation accuracy (%) per grid cell, annotated; empty cells (not finished) are left blank."""
    rows, columns = len(row_values), len(column_values)
    # A cell is readable at about an inch; past that, the figure stops growing and the cells shrink.
    figure, axes = plt.subplots(figsize=(min(1.2 * columns + 3, MAX_FIGURE_INCHES), min(0.8 * rows + 2.5, 12)))
    percent = np.asarray(matrix, dtype=float) * 100
    image = axes.imshow(np.ma.masked_invalid(percent), cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="Validation accuracy (%)")
    for set_ticks, values in ((axes.set_xticks, column_values), (axes.set_yticks, row_values)):
        shown = range(0, len(values), max(1, -(-len(values) // MAX_TICK_LABELS)))
        set_ticks(list(shown), labels=[str(values[index]) for index in shown])
    axes.set_xlabel(column_name)
    axes.set_ylabel(row_name)
    finite = percent[np.isfinite(percent)]
    threshold = (finite.min() + finite.max()) / 2 if finite.size else 0
    # Numbers in the cells only while they fit.
    if rows <= MAX_TICK_LABELS and columns <= MAX_ANNOTATED_COLUMNS:
        for row in range(rows):
            for column in range(columns):
                value = percent[row, column]
                if np.isfinite(value):
                    axes.text(
                        column,
                        row,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="black" if value > threshold else "white",
                    )
    axes.set_title(title)
    figure.tight_layout()
    return figure


def best_so_far_figure(
    trial_numbers: list[int],
    values: list[float],
    pruned: list[bool],
    title: str = "Best validation accuracy so far",
):
    """Every trial's validation accuracy (pruned ones hollow) and the best so far, by trial number."""
    figure, axes = plt.subplots(figsize=(9, 5))
    order = np.argsort(trial_numbers)
    numbers = np.asarray(trial_numbers)[order]
    percent = np.asarray(values, dtype=float)[order] * 100
    pruned_mask = np.asarray(pruned, dtype=bool)[order]
    complete = ~pruned_mask
    axes.scatter(numbers[complete], percent[complete], color="tab:blue", s=25, label="finished trial")
    if pruned_mask.any():
        axes.scatter(
            numbers[pruned_mask],
            percent[pruned_mask],
            facecolors="none",
            edgecolors="tab:gray",
            s=25,
            label="pruned trial (accuracy when stopped)",
        )
    best = np.maximum.accumulate(np.where(complete, percent, -np.inf)) if complete.any() else np.array([])
    if best.size:
        shown = np.isfinite(best)
        axes.step(
            numbers[shown], best[shown], where="post", color="tab:orange", linewidth=2, label="best finished so far"
        )
    if percent.size:
        axes.set_ylim(
            max(percent.min() - 1, np.percentile(percent, 10) - 5),
            100.5 if percent.max() > 99.5 else percent.max() + 0.5,
        )
    axes.set_xlabel("Trial number")
    axes.set_ylabel("Validation accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def best_of_n_figure(
    ns: list[int],
    expected: list[float],
    low: list[float],
    high: list[float],
    pool_size: int,
    reference: dict[int, float] | None = None,
    title: str = "Expected best of N trials",
):
    """The exact expected best validation accuracy of N trials, with its 10-90% band and any reference points."""
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.fill_between(
        ns,
        np.asarray(low) * 100,
        np.asarray(high) * 100,
        color="tab:blue",
        alpha=0.2,
        label="10th-90th percentile of the best",
    )
    axes.plot(
        ns, np.asarray(expected) * 100, "o-", color="tab:blue", label=f"expected best (exact, pool of {pool_size})"
    )
    if reference:
        axes.plot(
            list(reference),
            [value * 100 for value in reference.values()],
            "s--",
            color="tab:red",
            label="reference (3 re-runs per N)",
        )
    axes.set_xscale("log")
    axes.set_xticks(ns, labels=[str(n) for n in ns])
    axes.set_xlabel("N, trials drawn without replacement (log scale)")
    axes.set_ylabel("Validation accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def parameter_importance_figure(study):
    """Optuna's own parameter-importance plot (its default evaluator, PED-ANOVA) of a study with at
    least two finished trials.

    In a multi-objective study it shows what matters for the first objective, validation accuracy.
    Optuna's evaluator takes a given target for one to lower, so the accuracy is negated; the
    importances do not depend on the sign.
    """
    import warnings

    from optuna.visualization.matplotlib import plot_param_importances

    options = {}
    if len(study.directions) > 1:
        options = {"target": lambda trial: -trial.values[0], "target_name": "validation accuracy"}
    # Optuna switches matplotlib to its own style; keep that to this figure.
    with plt.style.context("default"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
        axes = plot_param_importances(study, **options)
    figure = axes.figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)
