"""Which models are compiled with XLA: every model except those with dropout (slow under XLA)."""

from mnist_mlflow import models


def test_models_without_dropout_use_xla():
    assert models.use_xla(models.build_dense_model((32,), ("relu",)))
    assert models.use_xla(models.build_cnn_model((8, 8), kernel_size=3, pooling=(True, True), dense_units=(16,)))


def test_models_with_dropout_do_not_use_xla():
    assert not models.use_xla(models.build_dense_model((32,), ("relu",), dropout_rate=0.1))
    assert not models.use_xla(
        models.build_cnn_model((8,), kernel_size=3, pooling=(True,), dense_units=(16,), dropout_rate=0.2)
    )
