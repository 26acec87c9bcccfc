"""The CNN config and builder, the promotion rule's input checks, and the image client's preprocessing."""

import numpy as np
import pytest

from mnist_mlflow import models, training
from mnist_mlflow.config import CnnRunConfig, ConfigError, TrainingConfig


def test_cnn_defaults_are_the_mnist_cnn_of_experiments_section_3():
    config = CnnRunConfig.from_params({})
    assert config.model.filters == (32, 32)
    assert config.model.pooling == (True, True)
    assert config.model.dense_units == (64, 64)
    assert config.training.optimizer == "sgd"
    assert config.training.learning_rate == 0.1
    assert config.training.batch_size == 32
    assert config.register_as == "mnist-cnn"


def test_empty_pooling_means_pool_after_every_convolution_and_empty_register_means_none():
    config = CnnRunConfig.from_params({"filters": "64,32,16", "pooling": "", "register_as": ""})
    assert config.model.pooling == (True, True, True)
    assert config.register_as == ""
    assert CnnRunConfig.from_params({"filters": "64,32,16", "pooling": "true,yes,false"}).model.pooling == (
        True,
        True,
        False,
    )


@pytest.mark.parametrize(
    "params, named",
    [
        ({"filters": "32,x"}, "filters"),
        ({"filters": "32,32", "pooling": "true"}, "pooling"),
        ({"pooling": "true,maybe"}, "pooling"),
        ({"kernel_size": "0"}, "kernel_size"),
        ({"kernel_size": "15", "filters": "8,8"}, "kernel_size"),
        ({"dense_units": "64,-1"}, "dense_units"),
        ({"register_as": "bad name!"}, "register_as"),
        ({"optimizer": "adagrad"}, "optimizer"),
    ],
)
def test_bad_cnn_parameters_are_named(params, named):
    with pytest.raises(ConfigError, match=named):
        CnnRunConfig.from_params(params)


@pytest.mark.parametrize(
    "filters, pooling, dense_units, expected",
    [
        ((32, 32), (True, True), (64, 64), 65_642),  # the MNIST CNN
        # The Fashion-MNIST variants of docs/experiments.md section 3, with their reference counts.
        ((64, 64), (True, True), (128,), 243_786),
        ((16, 16), (True, True), (128,), 55_098),
        ((16,), (True,), (128,), 347_690),
        ((64, 32, 16), (True, True, False), (128,), 43_578),
        ((32,), (True,), (128,), 693_962),
    ],
)
def test_cnn_parameter_counts_match_the_references(filters, pooling, dense_units, expected):
    model = models.build_cnn_model(filters, 3, pooling, dense_units)
    assert models.count_trainable_parameters(model) == expected
    output = model(np.zeros((2, 28, 28, 1), dtype="float32"))
    assert output.shape == (2, 10)


def test_dropout_sits_just_before_the_output_layer():
    model = models.build_cnn_model((8,), 3, (True,), (16,), dropout_rate=0.25)
    assert [layer.name for layer in model.layers][-2:] == ["dropout", "probabilities"]


@pytest.mark.parametrize("input_shape", [(26, 26, 32), (11, 11, 32), (7, 6, 3)])
def test_reshape_pooling_matches_max_pooling_in_values_and_gradients_including_odd_sizes(input_shape):
    import keras
    import tensorflow as tf

    # Distinct values, so that no window has a tie and the gradients are unique.
    inputs = tf.constant(
        np.random.default_rng(1).permutation(3 * np.prod(input_shape)).reshape(3, *input_shape).astype("float32")
    )
    results = []
    for layer in (keras.layers.MaxPooling2D(2, 2), models.ReshapeMaxPooling2D()):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs)
            loss = tf.reduce_sum(outputs * outputs)
        results.append((outputs.numpy(), tape.gradient(loss, inputs).numpy()))
    (expected, expected_gradient), (actual, actual_gradient) = results
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(actual_gradient, expected_gradient)


def test_saved_cnn_has_stock_layers_and_the_same_predictions():
    import keras

    keras.utils.set_random_seed(3)
    model = models.build_cnn_model([32, 16], pooling=[True, False])
    models.compile_model(model, "sgd", 0.1, steps_per_execution=10, jit_compile=True)
    images = np.random.default_rng(2).integers(0, 256, size=(64, 28, 28, 1)).astype("float32")
    model.fit(images, np.arange(64) % 10, batch_size=16, epochs=1, verbose=0)
    saved = models.prepare_for_inference(model)
    layer_types = {type(layer) for layer in saved.layers}
    assert keras.layers.Conv2D in layer_types and keras.layers.MaxPooling2D in layer_types
    assert models.ReshapeMaxPooling2D not in layer_types
    assert not saved.jit_compile
    assert [layer.name for layer in saved.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(saved.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-4, atol=1e-5)


def _train_bfloat16_cnn(splits):
    import keras

    keras.utils.set_random_seed(5)
    model = models.build_cnn_model([8, 8], dense_units=(16,), precision="bfloat16")
    models.compile_model(model, "sgd", 0.1, jit_compile=models.use_xla(model))
    result = training.train_and_evaluate(model, splits, TrainingConfig(batch_size=32, epochs=1, seed=5), verbose=0)
    return model, result


def test_a_bfloat16_cnn_trains_the_same_twice_and_is_saved_in_float32(small_splits):
    import keras

    model, result = _train_bfloat16_cnn(small_splits)
    # bfloat16 arithmetic, float32 weights and softmax, no XLA, stock pooling.
    assert models.computes_in_bfloat16(model) and not models.use_xla(model)
    assert all(weight.dtype == "float32" for weight in model.weights)
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert models.ReshapeMaxPooling2D not in {type(layer) for layer in model.layers}
    # The same seed gives the same weights.
    again, again_result = _train_bfloat16_cnn(small_splits)
    for mine, theirs in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert result.test_accuracy == again_result.test_accuracy
    # The saved model computes in float32, and the reported test accuracy is that model's.
    saved = models.prepare_for_inference(model)
    assert type(saved) is keras.Sequential and not models.computes_in_bfloat16(saved)
    probabilities = saved.predict(small_splits.test_images.astype("float32"), verbose=0)
    assert probabilities.dtype == np.float32
    assert abs(np.mean(probabilities.argmax(axis=1) == small_splits.test_labels) - result.test_accuracy) < 1e-6


def test_auto_precision_follows_the_processor(monkeypatch):
    monkeypatch.setattr(models, "cpu_multiplies_bfloat16", lambda: True)
    assert models.resolve_precision("auto") == "bfloat16"
    assert models.resolve_precision("float32") == "float32"
    monkeypatch.setattr(models, "cpu_multiplies_bfloat16", lambda: False)
    assert models.resolve_precision("auto") == "float32"
    assert models.resolve_precision("bfloat16") == "bfloat16"


def test_image_client_turns_dark_on_light_colour_images_into_mnist_form(tmp_path):
    from PIL import Image

    from mnist_mlflow.predict import image_to_mnist

    # A dark vertical bar on a white, colour, non-square canvas.
    canvas = np.full((90, 60, 3), 255, dtype=np.uint8)
    canvas[15:75, 26:34] = (10, 10, 40)
    path = tmp_path / "bar.jpg"
    Image.fromarray(canvas).save(path)
    pixels = image_to_mnist(path)
    assert pixels.shape == (28, 28, 1) and pixels.dtype == np.float32
    assert pixels[0, 0, 0] == 0  # background became dark
    assert pixels[14, 14, 0] > 200  # the bar became light and is centred
    rows = np.flatnonzero(pixels[:, :, 0].max(axis=1) > 100)
    assert 18 <= len(rows) <= 21  # fitted into the 20-pixel box


def test_image_client_keeps_mnist_digits_recognisable(small_splits, tmp_path):
    from PIL import Image

    from mnist_mlflow.predict import image_to_mnist

    original = small_splits.test_images[0, :, :, 0]
    path = tmp_path / "digit.png"
    Image.fromarray(original).save(path)
    converted = image_to_mnist(path)[:, :, 0]
    correlation = np.corrcoef(original.reshape(-1).astype(float), converted.reshape(-1))[0, 1]
    assert correlation > 0.8
