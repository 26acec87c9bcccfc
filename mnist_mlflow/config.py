"""Typed, validated configurations for every entry point.

Each dataclass mirrors the arguments of the function it configures, so a config can be
built in Python as easily as from the command line. Validation happens in
``__post_init__``: a bad value raises :class:`ConfigError` with one sentence that names the
parameter and the value, before any data is loaded or any MLflow run is created.

This module imports neither TensorFlow nor MLflow, so that a bad parameter is reported
within a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class UserInputError(ValueError):
    """An error caused by what the user asked for; reported as one line, without a traceback."""


class ConfigError(UserInputError):
    """A parameter has a value that cannot be used."""


class RunFailedError(RuntimeError):
    """A run failed for a reason that one line explains (not a bug): reported without a traceback."""


class TrainingDivergedError(RunFailedError):
    """The training loss became NaN or infinite; the same settings would diverge again."""


DATASETS = ("mnist", "fashion_mnist")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu", "selu", "gelu", "softplus", "swish", "leaky_relu", "linear")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
PRECISIONS = ("auto", "float32", "bfloat16")
# A shift of more than a quarter of the 28-pixel image would move most digits out of it.
MAX_SHIFT_LIMIT = 7
LR_SCHEDULES = ("constant", "cosine")
REGULARIZED_LAYERS = ("all", "first")


def parse_int(name: str, text: Any, minimum: int | None = None) -> int:
    """Parses a whole number, refusing floats such as "2.5" and anything below ``minimum``."""
    try:
        number = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={text!r} must be at least {minimum}")
    return number


# Seeds go to NumPy's and TensorFlow's generators, which take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
# The largest model the entry points build, in trainable parameters: many times the largest
# exercise (10's 1024-1024 network), and still a few hundred megabytes with Adam's moments and
# the gradients, so a typo such as hidden_units=100000000 is refused before TensorFlow runs out
# of memory.
MAX_PARAMETERS = 50_000_000
# Images per split of MNIST and Fashion-MNIST (both: 60,000 training, 10,000 test, 28x28x1).
TRAIN_SPLIT_EXAMPLES = 60_000
IMAGE_SIZE = 28
NUM_CLASSES = 10


def parse_seed(text: Any) -> int:
    """A seed: a whole number from 0 to 2**32 - 1."""
    return check_seed("seed", parse_int("seed", text, minimum=0))


def check_seed(name: str, value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name}={value!r} must lie between 0 and {MAX_SEED} (2**32 - 1)")
    return value


def check_model_size(description: str, parameters: int) -> None:
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"{description} would have {parameters:,} trainable parameters, more than the cap of {MAX_PARAMETERS:,}"
        )


def check_name(name: str, value: str) -> str:
    """The one rule for every name the project uses in run searches and URLs (registered models,
    sweep ids, study names): at most 64 letters, digits, '-', '_' and '.'."""
    if len(value) > 64 or not all(char.isalnum() or char in "-_." for char in value):
        raise ConfigError(f"{name}={value!r} may hold at most 64 letters, digits, '-', '_' and '.'")
    return value


def parse_float(name: str, text: Any) -> float:
    try:
        number = float(str(text).strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={text!r} must be a finite number")
    return number


def parse_list(name: str, text: Any) -> list[str]:
    """Splits a comma list such as "50, 50" into stripped items, refusing empty items."""
    if isinstance(text, (list, tuple)):
        items = [str(item).strip() for item in text]
    else:
        items = [item.strip() for item in str(text).split(",")]
    if not items or any(item == "" for item in items):
        raise ConfigError(f"{name}={text!r} must be a comma-separated list with no empty items")
    return items


def parse_positive_int_list(name: str, text: Any) -> tuple[int, ...]:
    items = parse_list(name, text)
    numbers = []
    for item in items:
        try:
            number = int(item)
        except ValueError:
            number = 0
        if number <= 0:
            raise ConfigError(f"{name}={text!r}: {item!r} is not a positive whole number")
        numbers.append(number)
    return tuple(numbers)


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(choices)}")


def require_range(
    name: str, value: float, low: float, high: float, *, low_inclusive: bool, high_inclusive: bool
) -> None:
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (above_low and below_high):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ConfigError(f"{name}={value!r} must lie in {left}{low:g}, {high:g}{right}")


def require_non_negative(name: str, value: float, meaning_of_zero: str = "") -> None:
    if value < 0:
        raise ConfigError(f"{name}={value!r} must be zero{meaning_of_zero} or positive")


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to split it; mirrors :func:`mnist_mlflow.data.load_splits`."""

    dataset: str = "mnist"
    validation_fraction: float = 0.1
    seed: int = 0
    max_train_examples: int = 0
    tfds_data_dir: str | None = None

    def __post_init__(self) -> None:
        require_choice("dataset", self.dataset, DATASETS)
        require_range(
            "validation_fraction", self.validation_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False
        )
        check_seed("seed", self.seed)
        require_non_negative("max_train_examples", self.max_train_examples, " (all)")
        validation = round(TRAIN_SPLIT_EXAMPLES * self.validation_fraction)
        if not 1 <= validation < TRAIN_SPLIT_EXAMPLES:
            raise ConfigError(
                f"validation_fraction={self.validation_fraction!r} leaves {validation} of the "
                f"{TRAIN_SPLIT_EXAMPLES:,} training images for validation; it must leave at least one for each split"
            )


def dense_parameter_count(hidden_units: tuple[int, ...]) -> int:
    """Trainable parameters of a dense classifier of 28x28 images with these hidden widths."""
    widths = [IMAGE_SIZE * IMAGE_SIZE, *hidden_units, NUM_CLASSES]
    return sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))


@dataclass(frozen=True)
class DenseModelConfig:
    """A fully connected classifier; mirrors :func:`mnist_mlflow.models.build_dense_model`."""

    hidden_units: tuple[int, ...] = (50, 50)
    activations: tuple[str, ...] = ("relu", "relu")
    dropout_rate: float = 0.0
    l2_factor: float = 0.0
    # Which hidden kernels the L2 penalty applies to: "all" or only the "first".
    regularized_layers: str = "all"

    def __post_init__(self) -> None:
        require_choice("regularized_layers", self.regularized_layers, REGULARIZED_LAYERS)
        if not self.hidden_units or any(width <= 0 for width in self.hidden_units):
            raise ConfigError(f"hidden_units={self.hidden_units!r} must be positive widths")
        if len(self.activations) != len(self.hidden_units):
            raise ConfigError(
                f"activation={','.join(self.activations)!r} has {len(self.activations)} entries "
                f"but hidden_units has {len(self.hidden_units)} layers; give one activation or one per layer"
            )
        for activation in self.activations:
            require_choice("activation", activation, ACTIVATIONS)
        require_range("dropout", self.dropout_rate, 0.0, 1.0, low_inclusive=True, high_inclusive=False)
        require_non_negative("l2", self.l2_factor)
        check_model_size(
            f"hidden_units={','.join(map(str, self.hidden_units))!r}", dense_parameter_count(self.hidden_units)
        )


@dataclass(frozen=True)
class TrainingConfig:
    """How to fit a model; mirrors :func:`mnist_mlflow.training.train_and_evaluate`."""

    optimizer: str = "adam"
    learning_rate: float = 0.001
    batch_size: int = 100
    epochs: int = 5
    seed: int = 0
    # "cosine" decays the learning rate from its initial value to zero over all epochs.
    lr_schedule: str = "constant"
    # Augmentation: each training image is moved by up to this many pixels in each direction,
    # afresh every time it is drawn; 0 trains on the images as they are.
    max_shift: int = 0

    def __post_init__(self) -> None:
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be positive")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size!r} must be a positive whole number")
        if self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs!r} must be a positive whole number")
        if not 0 <= self.max_shift <= MAX_SHIFT_LIMIT:
            raise ConfigError(
                f"max_shift={self.max_shift!r} must be a whole number of pixels from 0 to {MAX_SHIFT_LIMIT}"
            )
        check_seed("seed", self.seed)


def merge_params(defaults: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Entry-point parameters over their defaults; unknown names are refused."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(defaults)}")
    return {**defaults, **{name: value for name, value in params.items() if value is not None}}


def parse_activations(text: Any, num_layers: int) -> tuple[str, ...]:
    """One activation for every layer, or one per layer."""
    activations = tuple(item.lower() for item in parse_list("activation", text))
    return activations * num_layers if len(activations) == 1 else activations


def parse_training(raw: Mapping[str, Any], seed: int) -> TrainingConfig:
    return TrainingConfig(
        optimizer=str(raw["optimizer"]).strip().lower(),
        learning_rate=parse_float("learning_rate", raw["learning_rate"]),
        batch_size=parse_int("batch_size", raw["batch_size"], minimum=1),
        epochs=parse_int("epochs", raw["epochs"], minimum=1),
        seed=seed,
        lr_schedule=str(raw["lr_schedule"]).strip().lower(),
        max_shift=parse_int("max_shift", raw["max_shift"], minimum=0),
    )


def parse_data(raw: Mapping[str, Any], seed: int) -> DataConfig:
    return DataConfig(
        dataset=str(raw["dataset"]).strip().lower(),
        validation_fraction=parse_float("validation_fraction", raw["validation_fraction"]),
        seed=seed,
        max_train_examples=parse_int("max_train_examples", raw["max_train_examples"], minimum=0),
    )


def training_and_data_params(training: TrainingConfig, data: DataConfig) -> dict[str, Any]:
    return {
        "optimizer": training.optimizer,
        "learning_rate": training.learning_rate,
        "lr_schedule": training.lr_schedule,
        "max_shift": training.max_shift,
        "batch_size": training.batch_size,
        "epochs": training.epochs,
        "dataset": data.dataset,
        "validation_fraction": data.validation_fraction,
        "seed": data.seed,
        "max_train_examples": data.max_train_examples,
    }


@dataclass(frozen=True)
class DenseRunConfig:
    """Everything one ``dense`` run needs."""

    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def as_params(self) -> dict[str, Any]:
        """The entry-point parameters, under the names the MLproject file uses."""
        return {
            "hidden_units": ",".join(str(width) for width in self.model.hidden_units),
            # One name when every layer shares it, as the MLproject default ("relu") is written.
            "activation": ",".join(
                sorted(set(self.model.activations)) if len(set(self.model.activations)) == 1 else self.model.activations
            ),
            "dropout": self.model.dropout_rate,
            "l2": self.model.l2_factor,
            "regularized_layers": self.model.regularized_layers,
            **training_and_data_params(self.training, self.data),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DenseRunConfig:
        """Builds a config from entry-point parameters given as strings (or values)."""
        raw = merge_params(cls().as_params(), params)
        hidden_units = parse_positive_int_list("hidden_units", raw["hidden_units"])
        seed = parse_seed(raw["seed"])
        return cls(
            model=DenseModelConfig(
                hidden_units=hidden_units,
                activations=parse_activations(raw["activation"], len(hidden_units)),
                dropout_rate=parse_float("dropout", raw["dropout"]),
                l2_factor=parse_float("l2", raw["l2"]),
                regularized_layers=str(raw["regularized_layers"]).strip().lower(),
            ),
            training=parse_training(raw, seed),
            data=parse_data(raw, seed),
        )


def parse_bool_list(name: str, text: Any) -> tuple[bool, ...]:
    values = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    flags = []
    for item in parse_list(name, text):
        if item.lower() not in values:
            raise ConfigError(f"{name}={text!r}: {item!r} is not true or false")
        flags.append(values[item.lower()])
    return tuple(flags)


@dataclass(frozen=True)
class CnnModelConfig:
    """A convolutional classifier; mirrors :func:`mnist_mlflow.models.build_cnn_model`.

    ``pooling`` holds one flag per convolution: a 2x2 max-pool (stride 2) after it or not.
    """

    filters: tuple[int, ...] = (32, 32)
    kernel_size: int = 3
    pooling: tuple[bool, ...] = (True, True)
    dense_units: tuple[int, ...] = (64, 64)
    dropout_rate: float = 0.0
    # The number format of the arithmetic: float32; bfloat16 (mixed precision: bfloat16
    # arithmetic, float32 weights); or auto, which is bfloat16 where the processor multiplies
    # bfloat16 matrices itself (AMX or AVX512-BF16) and float32 elsewhere.
    precision: str = "auto"

    def __post_init__(self) -> None:
        require_choice("precision", self.precision, PRECISIONS)
        if not self.filters or any(count <= 0 for count in self.filters):
            raise ConfigError(f"filters={self.filters!r} must be positive counts")
        if len(self.pooling) != len(self.filters):
            raise ConfigError(
                f"pooling={','.join(str(flag).lower() for flag in self.pooling)!r} has {len(self.pooling)} entries "
                f"but filters has {len(self.filters)} convolutions; give one flag per convolution"
            )
        if any(width <= 0 for width in self.dense_units):
            raise ConfigError(f"dense_units={self.dense_units!r} must be positive widths")
        if self.kernel_size <= 0:
            raise ConfigError(f"kernel_size={self.kernel_size!r} must be a positive whole number")
        require_range("dropout", self.dropout_rate, 0.0, 1.0, low_inclusive=True, high_inclusive=False)
        size = 28
        for index, pooled in enumerate(self.pooling, start=1):
            size -= self.kernel_size - 1
            if size < 1:
                raise ConfigError(
                    f"kernel_size={self.kernel_size} with filters={','.join(map(str, self.filters))!r}: "
                    f"convolution {index} would shrink the 28x28 image below 1x1"
                )
            if pooled:
                size //= 2
                if size < 1:
                    raise ConfigError(f"pooling={self.pooling!r}: pooling after convolution {index} leaves no pixels")
        check_model_size(
            f"filters={','.join(map(str, self.filters))!r} with dense_units={','.join(map(str, self.dense_units))!r}",
            cnn_parameter_count(self.filters, self.kernel_size, self.pooling, self.dense_units),
        )


def cnn_parameter_count(
    filters: tuple[int, ...], kernel_size: int, pooling: tuple[bool, ...], dense_units: tuple[int, ...]
) -> int:
    """Trainable parameters of the convolutional classifier (valid convolutions, 2x2 pools)."""
    count, channels, size = 0, 1, IMAGE_SIZE
    for count_filters, pooled in zip(filters, pooling):
        count += (kernel_size * kernel_size * channels + 1) * count_filters
        channels, size = count_filters, size - (kernel_size - 1)
        if pooled:
            size //= 2
    widths = [size * size * channels, *dense_units, NUM_CLASSES]
    return count + sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))


# The default CNN trains 15 epochs on images moved by up to 2 pixels: the shortest setting
# with which every seed tried cleared 99.2% test accuracy, in bfloat16 and in float32
# (benchmarks/cnn_seeds.py; the figures are in benchmarks/results/cnn_seeds_*.md and
# docs/training.md).
CNN_DEFAULT_EPOCHS = 15
CNN_DEFAULT_MAX_SHIFT = 2


@dataclass(frozen=True)
class CnnRunConfig:
    """Everything one ``cnn`` run needs; ``register_as`` empty means: do not register."""

    model: CnnModelConfig = field(default_factory=CnnModelConfig)
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(
            optimizer="sgd",
            learning_rate=0.1,
            batch_size=32,
            epochs=CNN_DEFAULT_EPOCHS,
            lr_schedule="cosine",
            max_shift=CNN_DEFAULT_MAX_SHIFT,
        )
    )
    data: DataConfig = field(default_factory=DataConfig)
    register_as: str = "mnist-cnn"

    def __post_init__(self) -> None:
        check_name("register_as", self.register_as)

    def as_params(self) -> dict[str, Any]:
        return {
            "filters": ",".join(map(str, self.model.filters)),
            "kernel_size": self.model.kernel_size,
            "pooling": ",".join(str(flag).lower() for flag in self.model.pooling),
            "dense_units": ",".join(map(str, self.model.dense_units)),
            "dropout": self.model.dropout_rate,
            "precision": self.model.precision,
            **training_and_data_params(self.training, self.data),
            "register_as": self.register_as,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CnnRunConfig:
        defaults = cls().as_params()
        raw = merge_params(defaults, params)
        filters = parse_positive_int_list("filters", raw["filters"])
        pooling_text = params.get("pooling")
        if pooling_text is None or not str(pooling_text).strip():
            # Unset or empty: a max-pool after every convolution.
            pooling_text = ",".join(["true"] * len(filters))
        dense_text = str(raw["dense_units"]).strip()
        seed = parse_seed(raw["seed"])
        return cls(
            model=CnnModelConfig(
                filters=filters,
                kernel_size=parse_int("kernel_size", raw["kernel_size"], minimum=1),
                pooling=parse_bool_list("pooling", pooling_text),
                dense_units=parse_positive_int_list("dense_units", dense_text) if dense_text else (),
                dropout_rate=parse_float("dropout", raw["dropout"]),
                precision=str(raw["precision"]).strip().lower(),
            ),
            training=parse_training(raw, seed),
            data=parse_data(raw, seed),
            register_as=str(raw["register_as"]).strip(),
        )


def parse_study_id(text: Any) -> str:
    """A sweep id: empty (a new study) or letters, digits, '-', '_' and '.' (it is used in searches)."""
    study_id = str(text).strip()
    check_name("sweep_id", study_id)
    return study_id
