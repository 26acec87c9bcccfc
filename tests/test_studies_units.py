"""Study definitions and statistics: exercise configs, weight-decay seeds and factors, summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mnist_mlflow import models
from mnist_mlflow.config import ConfigError
from mnist_mlflow.studies import exercises, summaries, weight_decay
from mnist_mlflow.studies.engine import fingerprint
from mnist_mlflow.studies.exercises import ExercisesConfig
from mnist_mlflow.studies.weight_decay import WeightDecayConfig


def test_weight_decay_default_factors_are_numpy_linspace():
    np.testing.assert_allclose(WeightDecayConfig().factors, np.linspace(1e-6, 1e-3, 5), rtol=1e-12)
    parsed = WeightDecayConfig.from_params({"factors": WeightDecayConfig().as_params()["factors"]})
    np.testing.assert_allclose(parsed.factors, np.linspace(1e-6, 1e-3, 5), rtol=1e-9)


def test_replicates_share_seeds_across_factors_and_the_split_across_everything():
    config = WeightDecayConfig(factors=(1e-5, 1e-3), replicates=3, seed=7)
    for replicate in range(3):
        seeds = {weight_decay.child_config(config, factor, replicate).training.seed for factor in config.factors}
        assert seeds == {7 + replicate}
    splits = {
        weight_decay.child_config(config, factor, replicate).data for factor in config.factors for replicate in range(3)
    }
    assert len(splits) == 1


def test_weight_decay_network_regularises_only_the_first_kernel_when_asked():
    config = weight_decay.child_config(WeightDecayConfig(regularized_layers="first"), 1e-3, 0)
    model = models.build_dense_model(
        config.model.hidden_units, config.model.activations, l2_factor=1e-3, regularized_layers="first"
    )
    hidden = [layer for layer in model.layers if layer.name.startswith("hidden_")]
    assert [layer.units for layer in hidden] == [500, 300]
    assert hidden[0].kernel_regularizer is not None and hidden[1].kernel_regularizer is None
    everywhere = models.build_dense_model((500, 300), ("relu", "relu"), l2_factor=1e-3, regularized_layers="all")
    assert all(layer.kernel_regularizer is not None for layer in everywhere.layers if layer.name.startswith("hidden_"))


def test_dense_exercises_change_one_thing_each():
    base = exercises.base_config(ExercisesConfig())
    configs = {exercise.exercise_id: exercise.make_config(base) for exercise in exercises.DENSE_EXERCISES}
    assert list(configs) == ["baseline"] + [str(number) for number in range(1, 11)]
    assert configs["baseline"] == base
    assert configs["1"].model.hidden_units == (200, 200)
    assert configs["2"].model.hidden_units == (50, 50, 50)
    assert len(configs["3"].model.hidden_units) == 5
    assert configs["4"].model.activations == ("sigmoid", "sigmoid")
    assert configs["5"].model.activations == ("relu", "tanh")
    assert configs["6"].training.batch_size == 10_000
    assert configs["7"].training.batch_size == 1
    assert configs["8"].training.learning_rate == 0.0001
    assert configs["9"].training.learning_rate == 0.02
    assert configs["10"].model.hidden_units == (1024, 1024) and configs["10"].model.dropout_rate == 0.2
    assert configs["10"].training.epochs == 2 * base.training.epochs
    assert configs["10"].training.lr_schedule == "cosine"
    for exercise_id in ("1", "2", "3", "4", "5"):
        assert configs[exercise_id].training == base.training
    for exercise_id in ("6", "7", "8", "9"):
        assert configs[exercise_id].model == base.model


def test_conv_exercises_have_the_reference_parameter_counts():
    base = exercises.base_config(ExercisesConfig(suite="conv"))
    assert base.data.dataset == "fashion_mnist" and base.training.optimizer == "adam" and base.training.batch_size == 32
    counts = {}
    for exercise in exercises.CONV_EXERCISES:
        config = exercise.make_config(base)
        if hasattr(config.model, "filters"):
            model = models.build_cnn_model(
                config.model.filters, pooling=config.model.pooling, dense_units=config.model.dense_units
            )
        else:
            model = models.build_dense_model(config.model.hidden_units, config.model.activations)
        counts[exercise.exercise_id] = models.count_trainable_parameters(model)
    # The counts of docs/experiments.md section 3.
    assert counts == {"dense": 101_770, "1": 243_786, "2": 55_098, "3": 347_690, "4": 43_578, "5": 693_962}


def test_exercise_ids_are_checked_per_suite():
    assert ExercisesConfig.from_params({"only": " 1, 4 "}).only == ("1", "4")
    with pytest.raises(ConfigError, match="'11'"):
        ExercisesConfig.from_params({"only": "11"})
    with pytest.raises(ConfigError, match="twice"):
        ExercisesConfig.from_params({"only": "1,1"})
    assert ExercisesConfig.from_params({"suite": "conv", "only": "dense,5"}).only == ("dense", "5")


def test_fingerprint_ignores_the_sweep_id_but_not_the_settings():
    params = WeightDecayConfig().as_params()
    assert fingerprint({**params, "sweep_id": "a"}) == fingerprint({**params, "sweep_id": "b"})
    assert fingerprint(params) != fingerprint({**params, "epochs": 11})


def test_mean_std_and_confidence_interval():
    from scipy import stats

    values = [0.95, 0.96, 0.98]
    mean, deviation, low, high = summaries.mean_std_ci(values)
    assert mean == pytest.approx(np.mean(values))
    assert deviation == pytest.approx(np.std(values, ddof=1))
    expected_low, expected_high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx((expected_low, expected_high))
    single = summaries.mean_std_ci([0.9])
    assert single[0] == 0.9 and all(np.isnan(value) for value in single[1:])


def test_markdown_table_formats_named_columns():
    frame = pd.DataFrame([{"exercise": "1", "val_accuracy": 0.98765, "trainable_parameters": 42310, "best_epoch": 4}])
    text = summaries.markdown_table(frame, exercises.EXERCISE_FORMATS)
    assert text.splitlines() == [
        "| exercise | val_accuracy | trainable_parameters | best_epoch |",
        "|---|---|---|---|",
        "| 1 | 98.77% | 42,310 | 4 |",
    ]


def test_the_exercise_figure_labels_each_point_with_its_change_and_no_labels_overlap():
    from mnist_mlflow import plots
    from mnist_mlflow.studies.exercises import SUITES

    labels = [exercise.point_label for exercise in SUITES["dense"]]
    assert labels[:2] == ["baseline", "1: width 200"] and "7: batch 1" in labels
    # The dense suite's figures from docs/studies.md: most points crowd around 0.5 s and 97%.
    seconds = [0.45, 0.5, 0.55, 1.9, 0.46, 0.47, 0.2, 14.6, 0.5, 0.49, 3.2]
    accuracies = [0.966, 0.975, 0.968, 0.975, 0.94, 0.965, 0.81, 0.965, 0.90, 0.967, 0.982]
    figure = plots.accuracy_vs_time_figure(labels, seconds, accuracies, highlight="baseline")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [text for text in figure.axes[0].texts if text.get_text()]
    assert sorted(text.get_text() for text in texts) == sorted(labels)
    boxes = [text.get_window_extent(renderer) for text in texts]
    overlapping = [
        (texts[first].get_text(), texts[second].get_text())
        for first in range(len(boxes))
        for second in range(first + 1, len(boxes))
        if boxes[first].overlaps(boxes[second])
    ]
    assert overlapping == []
    plots.close(figure)
