import keras
import numpy as np

from mnist_mlflow import models


def test_baseline_has_42310_trainable_parameters_and_returns_probabilities():
    model = models.build_dense_model((50, 50), ("relu", "relu"))
    assert models.count_trainable_parameters(model) == 42310
    output = model(np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 1)).astype("float32"))
    assert output.shape == (3, 10)
    np.testing.assert_allclose(np.sum(output, axis=1), 1.0, rtol=1e-5)


def test_scaling_lives_inside_the_model():
    model = models.build_dense_model((8,), ("relu",))
    rescale = model.get_layer("rescale")
    assert float(rescale(np.full((1, 28, 28, 1), 255.0, dtype="float32")).numpy().max()) == 1.0


def test_per_layer_activations_dropout_and_l2():
    model = models.build_dense_model((20, 10), ("sigmoid", "tanh"), dropout_rate=0.3, l2_factor=1e-4)
    hidden = [layer for layer in model.layers if layer.name.startswith("hidden_")]
    assert [layer.activation.__name__ for layer in hidden] == ["sigmoid", "tanh"]
    assert [layer.units for layer in hidden] == [20, 10]
    assert all(isinstance(layer.kernel_regularizer, keras.regularizers.L2) for layer in hidden)
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.3, 0.3]


def test_optimizers_by_name():
    assert isinstance(models.make_optimizer("sgd", 0.1), keras.optimizers.SGD)
    assert isinstance(models.make_optimizer("rmsprop", 0.1), keras.optimizers.RMSprop)
    assert float(models.make_optimizer("adam", 0.02).learning_rate) == np.float32(0.02)
