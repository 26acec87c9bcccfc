"""The hyperparameter search's definition: its config (:class:`SearchConfig`) and its spaces
(docs/experiments.md section 4), built in or read from YAML.

A space lists, for each hyperparameter it varies, either the values to choose from or a range,
and holds every other hyperparameter fixed. The model is always the one of section 4:
Dense(units, activation) -> Dropout(dropout) -> Dense(10, softmax), trained with Adam.

A YAML space file looks like this::

    name: small-grid            # optional; the file name without suffix otherwise
    sampler: grid               # optional default sampler: grid, random or tpe
    fixed:                      # optional; overrides the built-in defaults below
      batch_size: 64
    parameters:
      units: [16, 32, 64]
      dropout: [0.0, 0.5]
      learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range: random and tpe only

This module imports neither Optuna, TensorFlow nor MLflow: a bad space file is reported before
anything heavy is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_mlflow.config import (
    ACTIVATIONS,
    ConfigError,
)
from mnist_mlflow.parameters import brief

SAMPLERS = ("grid", "random", "tpe")
BUILT_IN_SPACES = ("grid", "random")
# A space file is a few lines; anything much larger is a mistake or an attack, refused unread.
MAX_SPACE_FILE_BYTES = 256 * 1024
# The most points a grid search walks. Optuna's GridSampler holds the whole grid in memory and
# the study's summary draws it, so a grid must stay a size a person would run.
MAX_GRID_POINTS = 10_000
# How deep a space file's lists and mappings may nest. A space needs three levels (the file, its
# ``parameters``, one range); PyYAML parses deep nesting in quadratic time and composes it by
# recursion, so a few thousand brackets would take a minute and end in a RecursionError.
MAX_SPACE_NESTING = 8

# The hyperparameters a space may vary or fix, with the value they take when it does neither.
HYPERPARAMETER_DEFAULTS: dict[str, Any] = {
    "units": 128,
    "dropout": 0.0,
    "activation": "relu",
    "batch_size": 32,
    "learning_rate": 0.001,
}
INTEGER_HYPERPARAMETERS = ("units", "batch_size")


@dataclass(frozen=True)
class Range:
    """A numeric range for random or TPE sampling; ``log`` samples its logarithm uniformly."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class SearchSpace:
    """What a search varies (``parameters``: choices or ranges) and what it holds ``fixed``."""

    name: str
    parameters: Mapping[str, tuple[Any, ...] | Range]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    default_sampler: str = "random"
    source: str = "built-in"

    @property
    def is_grid(self) -> bool:
        """True when every parameter is a list of choices, so the space can be walked as a grid."""
        return all(not isinstance(choices, Range) for choices in self.parameters.values())

    @property
    def grid_size(self) -> int:
        if not self.is_grid:
            raise ConfigError(f"space {self.name!r} has ranges, so it has no grid size")
        return math.prod(len(choices) for choices in self.parameters.values())

    def grid(self) -> dict[str, list[Any]]:
        """The choices per parameter, as Optuna's GridSampler takes them."""
        return {name: list(choices) for name, choices in self.parameters.items()}

    def suggest(self, trial) -> dict[str, Any]:
        """Draws every varied hyperparameter from an Optuna trial; returns the full set, fixed ones included."""
        values = dict(self.all_fixed())
        for name, choices in self.parameters.items():
            if isinstance(choices, Range):
                suggest = trial.suggest_int if choices.integer else trial.suggest_float
                low, high = (int(choices.low), int(choices.high)) if choices.integer else (choices.low, choices.high)
                values[name] = suggest(name, low, high, log=choices.log)
            else:
                values[name] = trial.suggest_categorical(name, list(choices))
        return values

    def all_fixed(self) -> dict[str, Any]:
        """Every hyperparameter the space does not vary, with its value."""
        fixed = {**HYPERPARAMETER_DEFAULTS, **self.fixed}
        return {name: value for name, value in fixed.items() if name not in self.parameters}

    def describe(self) -> dict[str, Any]:
        """A plain description (for the study's settings and the parent run)."""
        return {
            "name": self.name,
            "parameters": {
                name: choices.as_dict() if isinstance(choices, Range) else list(choices)
                for name, choices in self.parameters.items()
            },
            "fixed": self.all_fixed(),
        }


def space_corner(space: SearchSpace, largest: bool) -> dict[str, Any]:
    """Every hyperparameter at the largest (or smallest) value the space can draw; names stay fixed."""
    pick = max if largest else min
    values = space.all_fixed()
    for name, choices in space.parameters.items():
        if isinstance(choices, Range):
            values[name] = choices.high if largest else choices.low
        elif name == "activation":
            values[name] = choices[0]
        else:
            values[name] = pick(choices)
    return values


# docs/experiments.md section 4: a 5 x 5 grid over dropout and units, batch 32; and the random space.
GRID_SPACE = SearchSpace(
    name="grid",
    parameters={"dropout": (0.0, 0.1, 0.3, 0.5, 0.8), "units": (16, 32, 64, 128, 256)},
    fixed={"batch_size": 32},
    default_sampler="grid",
)
RANDOM_SPACE = SearchSpace(
    name="random",
    parameters={
        "batch_size": (16, 32, 64, 128, 256),
        "units": (8, 32, 128, 256, 512),
        "learning_rate": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        "activation": ("relu", "elu", "sigmoid", "tanh"),
        "dropout": (0.0, 0.1, 0.2, 0.3, 0.5, 0.6),
    },
    default_sampler="random",
)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_value(source: str, name: str, value: Any) -> Any:
    """One hyperparameter value, checked and normalised, or a ConfigError that names it."""
    where = f"space {source}: {name}={brief(value)}"
    if name == "activation":
        if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
            raise ConfigError(f"{where} is not one of: {', '.join(ACTIVATIONS)}")
        return value.lower()
    if isinstance(value, str) and _reads_as_number(value):
        # PyYAML reads YAML 1.1, where 1e8 and 1.0e8 are strings: a float needs a dot and a signed exponent.
        raise ConfigError(f"{where} is text to YAML, not a number; write it with a dot and a signed exponent (1.0e+8)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} is not a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        # A whole number too large for a float, such as 10**400 written out.
        raise ConfigError(f"{where} is out of range") from None
    if not finite:
        raise ConfigError(f"{where} is not a finite number")
    if name in INTEGER_HYPERPARAMETERS:
        if value != int(value) or value < 1:
            raise ConfigError(f"{where} must be a positive whole number")
        return int(value)
    if name == "dropout" and not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} must lie in [0, 1)")
    if name == "learning_rate" and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{where} must be a positive number")
    return float(value)


def _parse_range(source: str, name: str, spec: Mapping[str, Any]) -> Range:
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(
            f"space {source}: {name} must be a list of values or a range {{low, high, log}}; got {brief(dict(spec))}"
        )
    if name == "activation":
        raise ConfigError(f"space {source}: activation takes a list of names, not a range")
    low, high = _check_value(source, name, spec["low"]), _check_value(source, name, spec["high"])
    if not low < high:
        raise ConfigError(f"space {source}: {name} range needs low < high; got low={brief(low)}, high={brief(high)}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"space {source}: {name} log={brief(log)} must be true or false")
    return Range(low, high, log, integer=name in INTEGER_HYPERPARAMETERS)


def space_from_mapping(document: Any, source: str, default_name: str) -> SearchSpace:
    """Builds a space from a parsed YAML document; every problem names the key and value."""
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"space {source} must be a YAML mapping with a 'parameters' key; got {type(document).__name__}"
        )
    unknown_keys = sorted(str(key)[:40] for key in set(document) - {"name", "sampler", "fixed", "parameters"})[:10]
    if unknown_keys:
        raise ConfigError(
            f"space {source}: unknown key(s) {', '.join(unknown_keys)}; known: name, sampler, fixed, parameters"
        )
    raw_parameters = document.get("parameters")
    if not isinstance(raw_parameters, Mapping) or not raw_parameters:
        raise ConfigError(f"space {source}: 'parameters' must map at least one hyperparameter to its values")
    raw_fixed = document.get("fixed") or {}
    if not isinstance(raw_fixed, Mapping):
        raise ConfigError(f"space {source}: 'fixed' must map hyperparameters to single values")
    known = ", ".join(HYPERPARAMETER_DEFAULTS)
    for name in [*raw_parameters, *raw_fixed]:
        if name not in HYPERPARAMETER_DEFAULTS:
            raise ConfigError(f"space {source}: unknown hyperparameter {brief(name)}; known: {known}")
    both = sorted(set(raw_parameters) & set(raw_fixed))
    if both:
        raise ConfigError(f"space {source}: {', '.join(both)} is both varied and fixed")
    parameters: dict[str, tuple[Any, ...] | Range] = {}
    for name, spec in raw_parameters.items():
        if isinstance(spec, Mapping):
            parameters[name] = _parse_range(source, name, spec)
        elif isinstance(spec, list) and spec:
            choices = tuple(_check_value(source, name, value) for value in spec)
            if len(set(choices)) != len(choices):
                raise ConfigError(f"space {source}: {name}={brief(spec)} lists a value twice")
            parameters[name] = choices
        else:
            raise ConfigError(
                f"space {source}: {name}={brief(spec)} must be a non-empty list of values or a range {{low, high, log}}"
            )
    fixed = {name: _check_value(source, name, value) for name, value in raw_fixed.items()}
    name = document.get("name", default_name)
    if not isinstance(name, str) or not name or not all(char.isalnum() or char in "-_." for char in name):
        raise ConfigError(f"space {source}: name={brief(name)} may hold only letters, digits, '-', '_' and '.'")
    space = SearchSpace(name=name, parameters=parameters, fixed=fixed, source=source)
    default_sampler = document.get("sampler", "grid" if space.is_grid else "tpe")
    if default_sampler not in SAMPLERS:
        raise ConfigError(f"space {source}: sampler={brief(default_sampler)} is not one of: {', '.join(SAMPLERS)}")
    return SearchSpace(name, parameters, fixed, default_sampler, source)


def load_space(text: str) -> SearchSpace:
    """``grid``, ``random`` or the path of a YAML space file."""
    if text in BUILT_IN_SPACES:
        return GRID_SPACE if text == "grid" else RANDOM_SPACE
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"space={text!r} is neither a built-in space ({', '.join(BUILT_IN_SPACES)}) nor a .yaml file")
    if not path.is_file():
        raise ConfigError(f"space={text!r}: no such file (relative paths start from {Path.cwd()})")
    import yaml

    size = path.stat().st_size
    if size > MAX_SPACE_FILE_BYTES:
        raise ConfigError(f"space={text!r} is {size} bytes; a space file may hold at most {MAX_SPACE_FILE_BYTES}")
    try:
        source = path.read_text()
        # An alias repeats a node by reference, so a few hundred bytes of nested aliases can
        # expand into gigabytes (a "billion laughs" file). A space file never needs one.
        depth = 0
        for event in yaml.parse(source, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_SPACE_NESTING:
                    mark = event.start_mark
                    raise ConfigError(
                        f"space={text!r} nests lists or mappings more than {MAX_SPACE_NESTING} deep "
                        f"at line {mark.line + 1}, column {mark.column + 1}"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise ConfigError(
                    f"space={text!r} uses a YAML alias (*{event.anchor[:30]}) at line {mark.line + 1}; "
                    "write each value out instead"
                )
        document = yaml.safe_load(source)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"space={text!r} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"space={text!r} is not a UTF-8 text file") from None
    return space_from_mapping(document, repr(str(path)), path.stem)
