"""Typed, validated configurations for every entry point.

Each dataclass mirrors the arguments of the function it configures, so a config can be
built in Python as easily as from the command line. Each field that users set from the command
line is declared once, with its default, help and kind (``mnist_mlflow.parameters``), and the
entry points, MLproject and the docs' tables follow from the declarations. Validation happens in
``__post_init__``: a bad value raises :class:`ConfigError` with one sentence that names the
parameter and the value, before any data is loaded or any MLflow run is created.

This module imports neither TensorFlow nor MLflow, so that a bad parameter is reported
at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mnist_mlflow.parameters import (
    BOOLEAN,
    FRACTION,
    NAME,
    NON_NEGATIVE_NUMBER,
    POSITIVE_NUMBER,
    RATE,
    Kind,
    Parameters,
    check_parameters,
    choice,
    flags,
    names,
    number,
    parameter,
    same_parameter,
    text,
    whole_number,
    widths,
)

# The errors and parsing helpers live in mnist_mlflow.parameters; they are imported from here too.
from mnist_mlflow.parameters import ConfigError as ConfigError
from mnist_mlflow.parameters import UserInputError as UserInputError
from mnist_mlflow.parameters import check_name as check_name
from mnist_mlflow.parameters import parse_bool_list as parse_bool_list
from mnist_mlflow.parameters import parse_float as parse_float
from mnist_mlflow.parameters import parse_int as parse_int
from mnist_mlflow.parameters import parse_list as parse_list
from mnist_mlflow.parameters import parse_positive_int_list as parse_positive_int_list
from mnist_mlflow.parameters import require_choice as require_choice
from mnist_mlflow.parameters import require_range as require_range


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


def check_seed(name: str, value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name}={value!r} must lie between 0 and {MAX_SEED} (2**32 - 1)")
    return value


def check_model_size(description: str, parameters: int) -> None:
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"{description} would have {parameters:,} trainable parameters, more than the cap of {MAX_PARAMETERS:,}"
        )


SEED = Kind(read=parse_int, check=check_seed)
EXAMPLES_CAP = whole_number(minimum=0)


def max_train_examples_parameter():
    """The ``max_train_examples`` parameter, the same in every entry point that has it."""
    return parameter(
        0, "cap on training examples for quick runs (0: all); validation keeps its full size", EXAMPLES_CAP
    )


def sweep_id_parameter():
    """The ``sweep_id`` parameter of the exercises and the weight-decay sweep."""
    return parameter(
        "", "a study's id: empty starts a new study; an earlier id resumes it, training only what is missing", NAME
    )


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to split it; mirrors :func:`mnist_mlflow.data.load_splits`."""

    dataset: str = parameter("mnist", "the data set", choice(*DATASETS))
    validation_fraction: float = parameter(
        0.1, "share of the 60,000 training images held out for validation, chosen by seed", FRACTION
    )
    seed: int = parameter(
        0,
        "0 to 2**32 - 1; seeds the split, the initial weights and the shuffling; the same seed gives the same run",
        SEED,
    )
    max_train_examples: int = max_train_examples_parameter()
    tfds_data_dir: str | None = None

    def __post_init__(self) -> None:
        check_parameters(self)
        validation = round(TRAIN_SPLIT_EXAMPLES * self.validation_fraction)
        if not 1 <= validation < TRAIN_SPLIT_EXAMPLES:
            raise ConfigError(
                f"validation_fraction={self.validation_fraction!r} leaves {validation} of the "
                f"{TRAIN_SPLIT_EXAMPLES:,} training images for validation; it must leave at least one for each split"
            )

    @property
    def train_examples(self) -> int:
        """How many examples training sees: what validation leaves, capped by ``max_train_examples``."""
        available = TRAIN_SPLIT_EXAMPLES - round(TRAIN_SPLIT_EXAMPLES * self.validation_fraction)
        return min(available, self.max_train_examples) if self.max_train_examples else available


def check_batch_fits(batch_size: int, data: DataConfig) -> None:
    """Refuses a batch larger than the training set: every step would see the same examples,
    and the run would record a batch size it never trained with."""
    if batch_size > data.train_examples:
        raise ConfigError(
            f"batch_size={batch_size} is more than the {data.train_examples:,} training examples "
            f"(validation_fraction={data.validation_fraction:g}, max_train_examples={data.max_train_examples})"
        )


def dense_parameter_count(hidden_units: tuple[int, ...]) -> int:
    """Trainable parameters of a dense classifier of 28x28 images with these hidden widths."""
    widths = [IMAGE_SIZE * IMAGE_SIZE, *hidden_units, NUM_CLASSES]
    return sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))


@dataclass(frozen=True)
class DenseModelConfig:
    """A fully connected classifier; mirrors :func:`mnist_mlflow.models.build_dense_model`.

    One activation given for several hidden layers applies to every one of them.
    """

    hidden_units: tuple[int, ...] = parameter((50, 50), "comma list of hidden-layer widths", widths())
    activations: tuple[str, ...] = parameter(
        ("relu", "relu"),
        "one activation for every hidden layer, or a comma list with one per layer, such as relu,tanh",
        names(ACTIVATIONS),
        flag="activation",
    )
    dropout_rate: float = parameter(0.0, "dropout after every hidden layer, in [0, 1)", RATE, flag="dropout")
    l2_factor: float = parameter(0.0, "L2 weight-decay factor on the hidden kernels", NON_NEGATIVE_NUMBER, flag="l2")
    regularized_layers: str = parameter(
        "all", "which hidden kernels get the L2 penalty: all of them, or only the first", choice(*REGULARIZED_LAYERS)
    )

    def __post_init__(self) -> None:
        if len(self.activations) == 1 and len(self.hidden_units) > 1:
            object.__setattr__(self, "activations", self.activations * len(self.hidden_units))
        check_parameters(self)
        if len(self.activations) != len(self.hidden_units):
            raise ConfigError(
                f"activation={','.join(self.activations)!r} has {len(self.activations)} entries "
                f"but hidden_units has {len(self.hidden_units)} layers; give one activation or one per layer"
            )
        check_model_size(
            f"hidden_units={','.join(map(str, self.hidden_units))!r}", dense_parameter_count(self.hidden_units)
        )


@dataclass(frozen=True)
class TrainingConfig:
    """How to fit a model; mirrors :func:`mnist_mlflow.training.train_and_evaluate`."""

    optimizer: str = parameter("adam", "the optimizer", choice(*OPTIMIZERS))
    learning_rate: float = parameter(
        0.001, "the optimizer's learning rate (the initial one with a schedule)", POSITIVE_NUMBER
    )
    batch_size: int = parameter(100, "examples per training step", whole_number())
    epochs: int = parameter(5, "passes over the training data", whole_number())
    seed: int = same_parameter("seed", 0)
    lr_schedule: str = parameter(
        "constant", "cosine decays the learning rate to zero over all epochs", choice(*LR_SCHEDULES)
    )
    max_shift: int = parameter(
        0,
        f"augmentation: move each training image by up to this many pixels each way (0 to {MAX_SHIFT_LIMIT}), "
        "afresh each epoch; 0 means none",
        whole_number(minimum=0, maximum=MAX_SHIFT_LIMIT),
    )
    patience: int = parameter(
        0,
        "early stopping: stop after this many epochs without a better val_accuracy (the best epoch is kept); "
        "0 trains every epoch",
        whole_number(minimum=0),
    )
    checkpoint: bool = parameter(
        True,
        "keep a checkpoint with the run after every epoch, so that a killed run resumes from its last epoch; "
        "false: none",
        BOOLEAN,
    )

    def __post_init__(self) -> None:
        check_parameters(self)
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class DenseRunConfig(Parameters):
    """Everything one ``dense`` run needs."""

    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_batch_fits(self.training.batch_size, self.data)


@dataclass(frozen=True)
class CnnModelConfig:
    """A convolutional classifier; mirrors :func:`mnist_mlflow.models.build_cnn_model`.

    ``pooling`` holds one flag per convolution: a 2x2 max-pool (stride 2) after it or not;
    none given means a pool after every convolution.
    """

    filters: tuple[int, ...] = parameter(
        (32, 32), "one Conv2D (relu, valid padding) per entry, with that many filters", widths()
    )
    kernel_size: int = parameter(3, "square kernel of every convolution", whole_number())
    pooling: tuple[bool, ...] = parameter(
        (),
        "comma list of true/false, one per convolution: a 2x2 max-pool (stride 2) after it; empty: after every one",
        flags(),
        default_text="",
    )
    dense_units: tuple[int, ...] = parameter(
        (64, 64), "relu layers after the convolutions; empty: none", widths(allow_empty=True)
    )
    dropout_rate: float = parameter(0.0, "dropout just before the output layer, in [0, 1)", RATE, flag="dropout")
    # The number format of the arithmetic: float32; bfloat16 (mixed precision: bfloat16
    # arithmetic, float32 weights); or auto, which is bfloat16 where the processor multiplies
    # bfloat16 matrices itself (AMX or AVX512-BF16) and float32 elsewhere.
    precision: str = parameter(
        "auto",
        "float32; bfloat16 (bfloat16 arithmetic, float32 weights); auto: bfloat16 where the CPU has bfloat16 "
        "matrix units, else float32. The saved model computes in float32",
        choice(*PRECISIONS),
    )

    def __post_init__(self) -> None:
        if not self.pooling:
            object.__setattr__(self, "pooling", (True,) * len(self.filters))
        check_parameters(self)
        if len(self.pooling) != len(self.filters):
            raise ConfigError(
                f"pooling={','.join(str(flag).lower() for flag in self.pooling)!r} has {len(self.pooling)} entries "
                f"but filters has {len(self.filters)} convolutions; give one flag per convolution"
            )
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
class CnnRunConfig(Parameters):
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
    register_as: str = parameter(
        "mnist-cnn", "registered model name for the selected model; empty: do not register", NAME
    )

    def __post_init__(self) -> None:
        check_parameters(self)
        check_batch_fits(self.training.batch_size, self.data)


@dataclass(frozen=True)
class PromoteConfig(Parameters):
    """The ``promote`` entry point: which registered model, ranked by which validation metric."""

    model_name: str = parameter("mnist-cnn", "the registered model", NAME)
    metric: str = parameter(
        "val_accuracy", "validation metric to rank versions by (higher is better); test metrics are refused", text()
    )
    min_val_accuracy: float = parameter(
        0.0,
        "the gate: the chosen model's accuracy on its validation split, measured again by "
        "mlflow.models.evaluate, must reach this, or the alias stays where it was",
        number(0.0, 1.0),
    )

    def __post_init__(self) -> None:
        check_parameters(self)
        if not self.model_name:
            raise ConfigError("model_name='' must name a registered model")


@dataclass(frozen=True)
class ReconcileConfig(Parameters):
    """The ``reconcile`` entry point: which runs to close."""

    experiment: str = parameter("", "experiment name or id to reconcile; empty: every experiment", text())
    max_age_hours: float = parameter(
        24.0, "age after which a RUNNING run without process information is closed", POSITIVE_NUMBER
    )
    dry_run: bool = parameter(False, "true: only list what would be closed", BOOLEAN)

    def __post_init__(self) -> None:
        check_parameters(self)
