"""Training without MLflow: the library returns its metrics and restores the best epoch."""

import numpy as np

from mnist_mlflow import data, models, training


def _fit(splits, epochs=2, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    model = models.build_dense_model((32,), ("relu",))
    models.compile_model(model, "adam", 0.001, training.steps_per_execution_for(len(splits.train_labels), 100))
    return model, training.train_and_evaluate(model, splits, batch_size=100, epochs=epochs, seed=seed, verbose=0)


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
