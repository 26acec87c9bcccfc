"""Training without MLflow: the library returns its metrics and restores the best epoch."""

import numpy as np
import pytest

from mnist_mlflow import data, models, training
from mnist_mlflow.config import TrainingConfig


def _fit(splits, epochs=2, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    model = models.build_dense_model((32,), ("relu",))
    models.compile_model(model, "adam", 0.001, training.steps_per_execution_for(len(splits.train_labels), 100))
    return model, training.train_and_evaluate(
        model, splits, TrainingConfig(batch_size=100, epochs=epochs, seed=seed), verbose=0
    )


def test_result_holds_histories_timings_and_test_scores(small_splits):
    model, result = _fit(small_splits)
    assert len(result.history["val_accuracy"]) == 2
    assert len(result.epoch_times) == 2 and all(seconds > 0 for seconds in result.epoch_times)
    assert result.history["epoch_time_s"] == result.epoch_times
    assert 0.5 < result.test_accuracy <= 1.0
    assert result.test_probabilities.shape == (10000, 10)
    assert result.examples_per_s > 0
    expected_accuracy = np.mean(result.test_probabilities.argmax(axis=1) == small_splits.test_labels)
    assert abs(expected_accuracy - result.test_accuracy) < 1e-4


def test_the_best_epoch_weights_are_restored(small_splits):
    model, result = _fit(small_splits, epochs=3)
    scores = result.history["val_accuracy"]
    best = max(range(len(scores)), key=lambda epoch: (scores[epoch], epoch))
    assert result.best_epoch == best
    _, validation_accuracy = model.evaluate(
        data.evaluation_dataset(small_splits.validation_images, small_splits.validation_labels), verbose=0
    )
    assert abs(validation_accuracy - result.history["val_accuracy"][best]) < 1e-6


def test_restore_best_weights_rolls_back_a_worse_last_epoch():
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    callback = training.RestoreBestWeights("val_accuracy")
    callback.set_model(model)
    model.layers[0].kernel.assign([[1.0]])
    callback.on_epoch_end(0, {"val_accuracy": 0.9})
    model.layers[0].kernel.assign([[2.0]])
    callback.on_epoch_end(1, {"val_accuracy": 0.8})
    callback.on_train_end()
    assert callback.best_epoch == 0
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 1.0


def test_restore_best_weights_prefers_the_later_epoch_on_a_tie():
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    callback = training.RestoreBestWeights("val_accuracy")
    callback.set_model(model)
    for epoch, (weight, score) in enumerate([(1.0, 0.9), (2.0, 0.95), (3.0, 0.95), (4.0, 0.7)]):
        model.layers[0].kernel.assign([[weight]])
        callback.on_epoch_end(epoch, {"val_accuracy": score})
    callback.on_train_end()
    assert callback.best_epoch == 2
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 3.0


def test_same_seed_same_history(small_splits):
    _, first = _fit(small_splits, seed=5)
    _, second = _fit(small_splits, seed=5)
    _, other = _fit(small_splits, seed=6)
    assert first.history["val_accuracy"] == second.history["val_accuracy"]
    assert first.history["val_accuracy"] != other.history["val_accuracy"]


def _fit_dense(splits, batch_size, jit_compile, several_batches_per_step, max_shift=0):
    """Two epochs of a small dense net; optionally forced to one batch per step."""
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_dense_model((32,), ("relu",))
    optimizer = models.make_optimizer("adam", 0.001, "cosine", 2 * len(splits.train_labels) // batch_size)
    models.compile_model(model, optimizer, steps_per_execution=1, jit_compile=jit_compile)
    if not several_batches_per_step:
        # A plain Sequential trains one batch per step, the ordinary Keras way.
        model = keras.Sequential(model.layers, name="plain")
        models.compile_model(model, optimizer, steps_per_execution=1, jit_compile=jit_compile)
    result = training.train_and_evaluate(
        model, splits, TrainingConfig(batch_size=batch_size, epochs=2, seed=0, max_shift=max_shift), verbose=0
    )
    return model, result


@pytest.mark.parametrize("jit_compile", [True, False])
def test_several_batches_per_step_train_exactly_like_one_batch_per_step(small_splits, jit_compile):
    batch_size = 50
    assert training.batches_per_step_for(models.build_dense_model((32,), ("relu",)), 2000, batch_size) == 40
    chunked, chunked_result = _fit_dense(small_splits, batch_size, jit_compile, several_batches_per_step=True)
    plain, plain_result = _fit_dense(small_splits, batch_size, jit_compile, several_batches_per_step=False)
    # The optimizer took every real step: 2 epochs of 40 batches, and the schedule with it.
    assert int(chunked.optimizer.iterations) == int(plain.optimizer.iterations) == 80
    for mine, theirs in zip(chunked.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    for name in ("loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(chunked_result.history[name], plain_result.history[name], rtol=1e-4, atol=1e-5)


def test_when_several_batches_per_step_are_used():
    import keras

    dense = models.build_dense_model((32,), ("relu",))
    models.compile_model(dense, "adam", 0.001, jit_compile=True)
    # The largest count within the limits that divides the batches of an epoch.
    assert training.batches_per_step_for(dense, 54000, 100) == 90
    assert training.batches_per_step_for(dense, 54000, 1) == 200
    # A last batch smaller than the others: one batch per step.
    assert training.batches_per_step_for(dense, 54000, 64) == 1
    # A plain Sequential has no multi-batch step.
    assert training.batches_per_step_for(keras.Sequential(dense.layers), 54000, 100) == 1
    # A CNN under XLA: one batch per step (XLA runs convolutions in a loop slowly on CPU).
    cnn = models.build_cnn_model((8, 8))
    models.compile_model(cnn, "sgd", 0.1, jit_compile=True)
    assert training.batches_per_step_for(cnn, 54000, 100) == 1
    models.compile_model(cnn, "sgd", 0.1, jit_compile=False)
    assert training.batches_per_step_for(cnn, 54000, 100) == 90


def test_test_loss_and_accuracy_agree_with_keras_evaluate(small_splits):
    model, result = _fit(small_splits, epochs=1)
    keras_loss, keras_accuracy = model.evaluate(
        data.evaluation_dataset(small_splits.test_images, small_splits.test_labels), verbose=0
    )
    assert abs(result.test_loss - keras_loss) < 1e-4
    assert abs(result.test_accuracy - keras_accuracy) < 1e-6


def test_patience_stops_training_once_validation_accuracy_stops_improving(small_splits):
    """Early stopping: with a learning rate too small to change anything, validation accuracy never
    improves on the first epoch, so training stops after 1 + patience epochs instead of 10."""
    model = models.build_dense_model((16,), ("relu",))
    models.compile_model(model, "adam", 1e-12, 1)
    result = training.train_and_evaluate(
        model, small_splits, TrainingConfig(batch_size=500, epochs=10, patience=2), verbose=0
    )
    assert len(result.history["loss"]) == 3 and len(result.epoch_times) == 3
    assert len(set(result.history["val_accuracy"])) == 1
    # Without patience, the same model trains every epoch.
    again = training.train_and_evaluate(model, small_splits, TrainingConfig(batch_size=500, epochs=4), verbose=0)
    assert len(again.history["loss"]) == 4
