"""Entry-point parameters, each declared once, on the config field it sets.

A field of a config dataclass becomes an entry-point parameter when it is declared with
:func:`parameter`: its default, its help text, and its :class:`Kind`, which says how the
parameter's text is read and written, and which values it admits. Everything else is derived
from the declarations:

- the command-line flags and their help (``cli.parse_config``);
- ``as_params`` and ``from_params`` of every config (:class:`Parameters`);
- the checks every value of a kind gets (:func:`check_parameters`, from ``__post_init__``);
- MLproject's parameters and command lines, and the docs' parameter tables
  (``python -m mnist_mlflow.entry_points --write``; a test fails when they differ).

A run config nests configs (``model``, ``training``, ``data``): their declared fields are its
parameters, in the order of declaration. One parameter can set two fields, as ``seed`` sets
both the training and the data seed: the second field is declared with :func:`same_parameter`.

This module imports neither TensorFlow nor MLflow, so that a bad value is one line at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any


class UserInputError(ValueError):
    """An error caused by what the user asked for; reported as one line, without a traceback."""


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters, for error messages.

    A message must stay one short line whatever the user gave, even a value that a YAML
    alias made enormous. ``reprlib`` never builds the whole repr, so this is cheap too.
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 6
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."


class ConfigError(UserInputError):
    """A parameter has a value that cannot be used."""


def parse_int(name: str, text: Any, minimum: int | None = None) -> int:
    """Parses a whole number, refusing floats such as "2.5" and anything below ``minimum``."""
    try:
        number = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={text!r} must be at least {minimum}")
    return number


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


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_bool_list(name: str, text: Any) -> tuple[bool, ...]:
    flags = []
    for item in parse_list(name, text):
        if item.lower() not in BOOLEANS:
            raise ConfigError(f"{name}={text!r}: {item!r} is not true or false")
        flags.append(BOOLEANS[item.lower()])
    return tuple(flags)


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


def check_name(name: str, value: str) -> str:
    """The one rule for every name the project uses in run searches and URLs (registered models,
    sweep ids, study names): at most 64 letters, digits, '-', '_' and '.'."""
    if len(value) > 64 or not all(char.isalnum() or char in "-_." for char in value):
        raise ConfigError(f"{name}={value!r} may hold at most 64 letters, digits, '-', '_' and '.'")
    return value


@dataclass(frozen=True)
class Kind:
    """How a parameter's text is read into a value and written back, and which values it admits.

    ``read(name, text)`` and ``check(name, value)`` raise :class:`ConfigError` with one line
    that names the parameter and the value. ``mlproject_type`` is MLflow's parameter type.
    """

    read: Callable[[str, str], Any]
    write: Callable[[Any], str] = str
    check: Callable[[str, Any], None] = lambda name, value: None
    mlproject_type: str = "string"
    describe: str = ""


def whole_number(minimum: int = 1, maximum: int | None = None) -> Kind:
    """A whole number from ``minimum`` (to ``maximum``)."""

    def check(name: str, value: int) -> None:
        if maximum is not None and not minimum <= value <= maximum:
            raise ConfigError(f"{name}={value!r} must lie between {minimum} and {maximum}")
        if value < minimum:
            raise ConfigError(f"{name}={value!r} must be at least {minimum}")

    return Kind(read=parse_int, check=check)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Kind:
    """A finite number; with ``low`` (and ``high``) it must lie in that interval."""

    def check(name: str, value: float) -> None:
        if low is None:
            return
        if high is None:
            if low == 0 and not low_inclusive and not value > 0:
                raise ConfigError(f"{name}={value!r} must be positive")
            if low == 0 and low_inclusive and value < 0:
                raise ConfigError(f"{name}={value!r} must be zero or positive")
            return
        require_range(name, value, low, high, low_inclusive=low_inclusive, high_inclusive=high_inclusive)

    return Kind(read=parse_float, check=check, mlproject_type="float")


POSITIVE_NUMBER = number(0.0, low_inclusive=False)
NON_NEGATIVE_NUMBER = number(0.0)
FRACTION = number(0.0, 1.0, low_inclusive=False, high_inclusive=False)
RATE = number(0.0, 1.0, high_inclusive=False)


def choice(*choices: str) -> Kind:
    """One of ``choices``, in any case."""
    return Kind(
        read=lambda name, text: str(text).strip().lower(),
        check=lambda name, value: require_choice(name, value, choices),
        describe=f"one of: {', '.join(choices)}",
    )


def text(check: Callable[[str, str], Any] | None = None, lower: bool = False) -> Kind:
    """Free text, stripped (and lower-cased); ``check`` refuses what cannot be used."""
    return Kind(
        read=lambda name, value: str(value).strip().lower() if lower else str(value).strip(),
        check=check or (lambda name, value: None),
    )


NAME = text(check_name)


def widths(allow_empty: bool = False) -> Kind:
    """A comma list of positive whole numbers (layer widths, filter counts); maybe empty."""

    def read(name: str, value: str) -> tuple[int, ...]:
        value = str(value).strip()
        return () if allow_empty and not value else parse_positive_int_list(name, value)

    def check(name: str, value: tuple[int, ...]) -> None:
        if (not value and not allow_empty) or any(width <= 0 for width in value):
            raise ConfigError(f"{name}={value!r} must be positive widths")

    return Kind(read=read, write=lambda value: ",".join(map(str, value)), check=check)


def names(choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> Kind:
    """A comma list of lower-case names, each one of ``choices`` when given; maybe empty."""

    def read(name: str, value: str) -> tuple[str, ...]:
        value = str(value).strip()
        return () if allow_empty and not value else tuple(item.lower() for item in parse_list(name, value))

    def check(name: str, value: tuple[str, ...]) -> None:
        for item in value if choices else ():
            require_choice(name, item, choices)

    def write(value: tuple[str, ...]) -> str:
        # One name when every entry shares it, as a single name is read for every layer.
        return value[0] if value and len(set(value)) == 1 and len(value) > 1 else ",".join(value)

    return Kind(read=read, write=write, check=check, describe=f"each one of: {', '.join(choices)}" if choices else "")


def flags() -> Kind:
    """A comma list of true/false; empty means the field's own rule for none given."""

    def read(name: str, value: str) -> tuple[bool, ...]:
        value = str(value).strip()
        return () if not value else parse_bool_list(name, value)

    return Kind(read=read, write=lambda value: ",".join(str(flag).lower() for flag in value))


def _read_boolean(name: str, value: str) -> bool:
    if "," in str(value):
        raise ConfigError(f"{name}={value!r} is not true or false")
    (flag,) = parse_bool_list(name, value)
    return flag


BOOLEAN = Kind(read=_read_boolean, write=lambda value: str(value).lower())


def numbers() -> Kind:
    """A comma list of numbers, written with ten significant digits."""
    return Kind(
        read=lambda name, value: tuple(parse_float(name, item) for item in parse_list(name, value)),
        write=lambda value: ",".join(f"{item:.10g}" for item in value),
    )


PARAMETER = "mnist_mlflow.parameter"


@dataclass(frozen=True)
class Declaration:
    """What :func:`parameter` attaches to a field."""

    help: str
    kind: Kind
    flag: str | None = None
    default_text: str | None = None
    same_as: str | None = None


def parameter(default: Any, help: str, kind: Kind, *, flag: str | None = None, default_text: str | None = None):
    """A dataclass field that is an entry-point parameter.

    ``flag`` is the parameter's name when it differs from the field's (``dropout`` sets
    ``dropout_rate``). ``default_text`` is the default as users write it, when the default
    value is derived from other fields (``pooling``: empty, a pool after every convolution).
    """
    declaration = Declaration(help=help, kind=kind, flag=flag, default_text=default_text)
    return dataclasses.field(default=default, metadata={PARAMETER: declaration})


def same_parameter(flag: str, default: Any):
    """A field set by the parameter ``flag``, which another field of the same run config declares."""
    return dataclasses.field(
        default=default, metadata={PARAMETER: Declaration(help="", kind=Kind(read=str), same_as=flag)}
    )


@dataclass(frozen=True)
class Flag:
    """One entry-point parameter of a config class, with every field it sets."""

    name: str
    help: str
    kind: Kind
    paths: tuple[tuple[str, ...], ...]
    default_text: str

    @property
    def help_text(self) -> str:
        return f"{self.help} ({self.kind.describe})" if self.kind.describe else self.help


def _declared_fields(instance, path: tuple[str, ...] = ()):
    """(path, field, declaration) of every declared field of ``instance`` and of its nested configs."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        declaration = field.metadata.get(PARAMETER)
        if declaration is not None:
            yield (*path, field.name), field, declaration
        elif dataclasses.is_dataclass(value):
            yield from _declared_fields(value, (*path, field.name))


def _value_at(instance, path: tuple[str, ...]):
    for name in path:
        instance = getattr(instance, name)
    return instance


@cache
def flags_of(config_class) -> tuple[Flag, ...]:
    """The entry-point parameters of ``config_class``, in the order they are declared."""
    default = config_class()
    declared: dict[str, dict] = {}
    followers: list[tuple[str, tuple[str, ...]]] = []
    for path, field, declaration in _declared_fields(default):
        if declaration.same_as:
            followers.append((declaration.same_as, path))
            continue
        name = declaration.flag or field.name
        if name in declared:
            raise TypeError(f"{config_class.__name__}: parameter {name!r} is declared twice")
        shown = declaration.default_text
        declared[name] = {
            "help": declaration.help,
            "kind": declaration.kind,
            "paths": [path],
            "default_text": declaration.kind.write(_value_at(default, path)) if shown is None else shown,
        }
    for name, path in followers:
        if name not in declared:
            raise TypeError(f"{config_class.__name__}: {'.'.join(path)} follows {name!r}, which nothing declares")
        declared[name]["paths"].append(path)
    return tuple(
        Flag(
            name=name,
            help=entry["help"],
            kind=entry["kind"],
            paths=tuple(entry["paths"]),
            default_text=entry["default_text"],
        )
        for name, entry in declared.items()
    )


def defaults_of(config_class) -> dict[str, str]:
    """Each parameter's default, as users write it (the flags', MLproject's and the docs' default)."""
    return {flag.name: flag.default_text for flag in flags_of(config_class)}


def as_params(config) -> dict[str, str]:
    """The entry-point parameters of ``config``, as text, under the names users type."""
    return {flag.name: flag.kind.write(_value_at(config, flag.paths[0])) for flag in flags_of(type(config))}


def from_params(config_class, params: Mapping[str, Any]):
    """Builds ``config_class`` from entry-point parameters given as text (or values); unset or
    ``None`` parameters take their defaults, and unknown names are refused."""
    all_flags = flags_of(config_class)
    known = [flag.name for flag in all_flags]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(known)}")
    values: dict[tuple[str, ...], Any] = {}
    for flag in all_flags:
        given = params.get(flag.name)
        text = flag.default_text if given is None else given
        value = flag.kind.read(flag.name, text)
        try:
            flag.kind.check(flag.name, value)
        except ConfigError as error:
            # Name the value as the user wrote it: seed='-1', not seed=-1.
            raise ConfigError(str(error).replace(f"{flag.name}={value!r}", f"{flag.name}={text!r}", 1)) from None
        for path in flag.paths:
            values[path] = value
    return _build(config_class, config_class(), values, ())


def _build(config_class, default, values: dict[tuple[str, ...], Any], path: tuple[str, ...]):
    arguments = {}
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        field_path = (*path, field.name)
        nested = getattr(default, field.name)
        if field_path in values:
            arguments[field.name] = values[field_path]
        elif PARAMETER not in field.metadata and dataclasses.is_dataclass(nested):
            arguments[field.name] = _build(type(nested), nested, values, field_path)
        else:
            arguments[field.name] = nested
    return config_class(**arguments)


def check_parameters(config) -> None:
    """The checks every declared field of ``config`` gets from its kind; call from ``__post_init__``."""
    for field in dataclasses.fields(config):
        declaration = field.metadata.get(PARAMETER)
        if declaration is not None and not declaration.same_as:
            declaration.kind.check(declaration.flag or field.name, getattr(config, field.name))


class Parameters:
    """``as_params`` and ``from_params`` for a config whose fields declare its parameters."""

    def as_params(self) -> dict[str, str]:
        return as_params(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]):
        return from_params(cls, params)
