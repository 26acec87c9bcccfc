import pytest

from mnist_mlflow.config import ConfigError, DenseRunConfig


def test_defaults_are_the_baseline_of_experiments_section_1():
    config = DenseRunConfig.from_params({})
    assert config.model.hidden_units == (50, 50)
    assert config.model.activations == ("relu", "relu")
    assert config.training.optimizer == "adam"
    assert config.training.learning_rate == 0.001
    assert config.training.batch_size == 100
    assert config.training.epochs == 5
    assert config.data.validation_fraction == 0.1
    assert config.data.max_train_examples == 0


def test_strings_are_parsed_and_one_activation_applies_to_every_layer():
    config = DenseRunConfig.from_params(
        {"hidden_units": "200, 100,50", "activation": "TANH", "learning_rate": "1e-3", "seed": "7"}
    )
    assert config.model.hidden_units == (200, 100, 50)
    assert config.model.activations == ("tanh", "tanh", "tanh")
    assert config.training.learning_rate == 0.001
    assert config.training.seed == config.data.seed == 7


def test_one_activation_per_layer():
    config = DenseRunConfig.from_params({"activation": "relu,tanh"})
    assert config.model.activations == ("relu", "tanh")


def test_params_round_trip():
    config = DenseRunConfig.from_params({"hidden_units": "500,300", "dropout": "0.2", "dataset": "fashion_mnist"})
    assert DenseRunConfig.from_params(config.as_params()) == config


@pytest.mark.parametrize(
    "name, value",
    [
        ("hidden_units", "50,abc"),
        ("hidden_units", "50,0"),
        ("hidden_units", "-5"),
        ("hidden_units", "50,,50"),
        ("activation", "swishy"),
        ("activation", "relu,tanh,relu"),
        ("optimizer", "adagrad"),
        ("learning_rate", "fast"),
        ("learning_rate", "0"),
        ("batch_size", "2.5"),
        ("batch_size", "0"),
        ("epochs", "-1"),
        ("dropout", "1.0"),
        ("l2", "-0.1"),
        ("dataset", "cifar10"),
        ("validation_fraction", "1.5"),
        ("validation_fraction", "0"),
        ("seed", "-3"),
        ("max_train_examples", "-10"),
        ("max_shift", "8"),
        ("max_shift", "-1"),
        ("max_shift", "1.5"),
    ],
)
def test_bad_values_name_the_parameter_and_the_value(name, value):
    with pytest.raises(ConfigError) as raised:
        DenseRunConfig.from_params({name: value})
    message = str(raised.value)
    assert name in message
    assert "\n" not in message
    # The offending value (or, for a list, the offending item) is quoted in the message.
    assert any(part.strip() in message for part in value.split(",") if part.strip()) or value in message


def test_unknown_parameter_is_refused():
    with pytest.raises(ConfigError, match="hidden_unit"):
        DenseRunConfig.from_params({"hidden_unit": "50"})


@pytest.mark.parametrize("value", ["fp8", "half", ""])
def test_a_bad_cnn_precision_is_one_line_naming_it(value):
    from mnist_mlflow.config import CnnRunConfig

    with pytest.raises(ConfigError) as raised:
        CnnRunConfig.from_params({"precision": value})
    assert f"precision={value!r}" in str(raised.value) and "\n" not in str(raised.value)
