"""Validated config dataclasses: declarative field checks, one-line errors, dict/YAML loading, overrides.

A config is a plain ``@dataclass`` whose ``__post_init__`` runs :func:`validate` over a table of
field -> :class:`Check` (built by :func:`integer`, :func:`number`, :func:`choice`, :func:`boolean`,
:func:`optional`, :func:`sequence`, ...), then checks the relations between fields, raising
:meth:`ConfigError.invalid` for the field at fault::

    @dataclass
    class RunConfig:
        steps: int = 100
        lr: float = 3e-4
        layers: tuple[int, ...] = (0, 2)

        def __post_init__(self) -> None:
            validate(self, {"steps": integer(1), "lr": number(0, lo_open=True),
                            "layers": sequence(integer(0), distinct=True, sort=True)})

    from_dict(RunConfig, {"lr": "1e-3"})            # -> RunConfig(steps=100, lr=0.001, layers=(0, 2))
    from_file(RunConfig, "run.yaml")                # "run.yaml: RunConfig.steps: expected a positive
                                                    #  integer, got 0"
    parse_overrides(["steps=5"], RunConfig)         # -> {"steps": 5}

Checks normalize what they accept (numeric strings such as YAML 1.1's ``3e-4`` become floats, lists
become tuples), so a config built from YAML or JSON compares equal to one built in Python.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Check", "ConfigError", "boolean", "choice", "config_fields", "from_dict", "from_file", "integer",
    "mapping", "number", "optional", "parse_overrides", "parse_value", "path", "power_of_two",
    "read_config_file", "sequence", "string", "validate",
]

C = TypeVar("C")
_MISSING = object()


class ConfigError(ValueError):
    """A config file, field or override that cannot be used; the message is one line.

    Field errors read ``"[source: ]Owner.field: expected <what>, got <value!r>"``; ``owner``, ``field``,
    ``expected``, ``value`` and ``source`` are kept as attributes (None / "" when not about one field).
    """

    def __init__(self, message: str, *, owner: str | None = None, field: str | None = None,
                 expected: str | None = None, value: Any = None, source: str = "") -> None:
        super().__init__(message)
        self.owner, self.field, self.expected, self.value, self.source = owner, field, expected, value, source

    @classmethod
    def invalid(cls, owner: Any, field: str, expected: str, value: Any, source: str = "") -> ConfigError:
        """The error for ``owner.field`` holding ``value`` where ``expected`` was wanted.

        ``owner`` is a config instance, its class, or a name.
        """
        name = _owner_name(owner)
        where = f"{source}: " if source else ""
        return cls(f"{where}{name}.{field}: expected {expected}, got {value!r}", owner=name, field=field,
                   expected=expected, value=value, source=source)

    def with_source(self, source: str) -> ConfigError:
        """This error with ``"source: "`` in front (unchanged when it already names a source)."""
        if not source or self.source:
            return self
        return type(self)(f"{source}: {self}", owner=self.owner, field=self.field, expected=self.expected,
                          value=self.value, source=source)


def _owner_name(owner: Any) -> str:
    if isinstance(owner, str):
        return owner
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


# ------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One field rule: ``normalize(value)`` returns the value to store, or raises ``ValueError`` /
    ``TypeError`` when it is invalid; ``expected`` says what is accepted ("a positive integer")."""

    expected: str
    normalize: Callable[[Any], Any]

    def __call__(self, value: Any) -> Any:
        return self.normalize(value)


def _reject() -> None:
    raise ValueError("invalid")


def _accepts(expected: str, ok: Callable[[Any], bool]) -> Check:
    """A check that keeps the value as is when ``ok(value)``."""
    def normalize(v: Any) -> Any:
        if not ok(v):
            _reject()
        return v
    return Check(expected, normalize)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_float(v: Any) -> float:
    """A finite float from an int, float or numeric string (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(type(v).__name__)
    out = float(v)
    if not math.isfinite(out):
        _reject()
    return out


def integer(min: int | None = None, max: int | None = None, *, expected: str | None = None) -> Check:
    """An ``int`` (not a bool) in ``[min, max]`` (either bound optional)."""
    if expected is None:
        if max is None:
            expected = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
                min, f"an integer >= {min}")
        else:
            expected = f"an integer <= {max}" if min is None else f"an integer in [{min}, {max}]"
    return _accepts(expected, lambda v: _is_int(v) and (min is None or v >= min)
                    and (max is None or v <= max))


def power_of_two(min: int = 1, *, expected: str | None = None) -> Check:
    """An ``int`` power of two, at least ``min``."""
    expected = expected or ("a power of two" if min <= 1 else f"a power of two >= {min}")
    return _accepts(expected, lambda v: _is_int(v) and v >= max(min, 1) and not v & (v - 1))


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        if lo == 0:
            return "a positive float" if lo_open else "a non-negative float"
        return "a float" if lo == -math.inf else f"a float {'>' if lo_open else '>='} {lo:g}"
    if lo == -math.inf:
        return f"a float {'<' if hi_open else '<='} {hi:g}"
    return f"a float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
           expected: str | None = None) -> Check:
    """A finite number in the interval from ``lo`` to ``hi`` (open ends as flagged), stored as ``float``.

    Ints and numeric strings are accepted (YAML 1.1 reads ``3e-4`` as a string); bools are not.
    """
    expected = expected or _interval(lo, hi, lo_open, hi_open)

    def normalize(v: Any) -> float:
        x = _as_float(v)
        if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
            _reject()
        return x
    return Check(expected, normalize)


def boolean(*, expected: str = "true or false") -> Check:
    """A ``bool`` (not 0/1, not a string)."""
    return _accepts(expected, lambda v: isinstance(v, bool))


def _show(option: Any) -> str:
    return "null" if option is None else repr(option)


def choice(*options: Any, expected: str | None = None) -> Check:
    """One of ``options`` (compared with ``==``; ``None`` is spelled ``null`` in the message)."""
    expected = expected or "one of " + ", ".join(_show(o) for o in options)
    return _accepts(expected, lambda v: any(v == o and type(v) is type(o) for o in options))  # True is not 1


def string(*, nonempty: bool = False, pattern: str | None = None, expected: str | None = None) -> Check:
    """A ``str``; with ``pattern``, one that matches the whole regular expression."""
    regex = re.compile(pattern) if pattern is not None else None
    expected = expected or ("a non-empty string" if nonempty else "a string")
    return _accepts(expected, lambda v: isinstance(v, str) and (bool(v) or not nonempty)
                    and (regex is None or regex.fullmatch(v) is not None))


def path(*, expected: str = "a path") -> Check:
    """A non-empty ``str`` or ``os.PathLike``, stored as ``str``."""
    def normalize(v: Any) -> str:
        if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
            _reject()
        return str(os.fspath(v))
    return Check(expected, normalize)


def mapping(*, expected: str = "a mapping of name -> value") -> Check:
    """A mapping with ``str`` keys, stored as a new ``dict``."""
    def normalize(v: Any) -> dict[str, Any]:
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            _reject()
        return dict(v)
    return Check(expected, normalize)


def optional(check: Check, *, expected: str | None = None) -> Check:
    """``None`` or what ``check`` accepts."""
    return Check(expected or f"{check.expected} or null", lambda v: None if v is None else check(v))


_COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}


def sequence(item: Check, *, length: int | None = None, distinct: bool = False, sort: bool = False,
             expected: str | None = None) -> Check:
    """A list or tuple whose items ``item`` accepts (``length`` of them when given), stored as a tuple
    (sorted when ``sort``)."""
    if expected is None:
        count = "" if length is None else f"{_COUNTS.get(length, length)} "
        expected = f"a list of {count}{'distinct ' if distinct else ''}items, each {item.expected}"

    def normalize(v: Any) -> tuple:
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            _reject()
        out = tuple(item(x) for x in v)
        if distinct and len(set(out)) != len(out):
            _reject()
        return tuple(sorted(out)) if sort else out
    return Check(expected, normalize)


def validate(config: Any, checks: Mapping[str, Check]) -> None:
    """Check and normalize the fields of ``config`` named in ``checks`` (in that order), in place.

    Raises :class:`ConfigError` for the first invalid field. Works on frozen dataclasses too.
    """
    for name, check in checks.items():
        value = getattr(config, name)
        try:
            normalized = check(value)
        except (TypeError, ValueError):
            raise ConfigError.invalid(config, name, check.expected, value) from None
        object.__setattr__(config, name, normalized)


# ------------------------------------------------------------------------------------------ loading


def config_fields(cls: type) -> list[str]:
    """The settable fields of dataclass ``cls``, in order (``init=False`` and ``_private`` ones left out)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _unknown_field(cls: type, key: Any, names: Iterable[str], where: str, probe: Any = None) -> ConfigError:
    names = list(names)
    close = difflib.get_close_matches(str(key if probe is None else probe), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; expected one of {', '.join(names)}"
    return ConfigError(f"{where}{cls.__name__}: unknown field {key!r}{hint}")


def from_dict(cls: type[C], data: Any, source: str = "", *, strict: bool = True,
              key: Callable[[str], str] | None = None, **fixed: Any) -> C:
    """``cls(**data)`` for a mapping of field -> value, with one-line :class:`ConfigError` s.

    Unknown keys are an error naming the closest field (or listing all) when ``strict``, else ignored.
    ``key`` maps each key to a field name first (e.g. ``str.lower``); errors quote the key as given.
    ``source`` (a file name) prefixes every message; ``fixed`` are extra keyword arguments of ``cls``.
    """
    where = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}{cls.__name__}: expected a mapping of field: value, got "
                          f"{type(data).__name__}")
    names = config_fields(cls)
    kwargs = {}
    for raw, value in data.items():
        name = key(raw) if key is not None and isinstance(raw, str) else raw
        if name in names:
            kwargs[name] = value
        elif strict:
            raise _unknown_field(cls, raw, names, where, probe=name)
    try:
        return cls(**kwargs, **fixed)
    except ConfigError as exc:
        raise exc.with_source(source) from None


def read_config_file(file: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file (JSON when the name ends in ``.json``); an empty file gives ``{}``.

    A missing file, a parse error (with its line) or a non-mapping document raises :class:`ConfigError`.
    """
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    text = file.read_text()
    if file.suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{file}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def from_file(cls: type[C], file: str | os.PathLike, **kwargs: Any) -> C:
    """``from_dict(cls, read_config_file(file), source=str(file), **kwargs)``."""
    return from_dict(cls, read_config_file(file), str(file), **kwargs)


# ---------------------------------------------------------------------------------------- overrides

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _annotation(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            t = f.type
            return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).replace(" ", "")
    raise _unknown_field(cls, name, config_fields(cls), "")


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # reported by the field's check


def parse_value(cls: type, name: str, text: str) -> Any:
    """The command-line text ``text`` for field ``name`` of dataclass ``cls``, typed by its annotation.

    ``str`` fields keep the text as is; ``bool`` fields take true/false/yes/no/on/off/1/0; optional
    fields take null/none/~ for None; tuple/list fields take a YAML list or ``a,b,c``; anything else is
    read as a YAML value (``16`` -> int, ``3e-4`` -> str, which :func:`number` accepts). Values that do
    not parse are returned as given for the field's check to report.
    """
    annotation = _annotation(cls, name)
    parts = annotation.split("|")
    text = text.strip()
    if "None" in parts and text.lower() in ("null", "none", "~"):
        return None
    base = next((p for p in parts if p != "None"), annotation)
    if base == "str":
        return text
    if base == "bool":
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if base.startswith(("tuple", "list")) and not text.startswith("["):
        return [_yaml_value(p) for p in text.split(",") if p.strip()]
    return _yaml_value(text)


def parse_overrides(items: Iterable[str], cls: type, flag: str = "--set") -> dict[str, Any]:
    """``["d_state=16", "name=run1"]`` -> ``{"d_state": 16, "name": "run1"}``, each typed by the field
    of dataclass ``cls`` (:func:`parse_value`); an item without ``=`` or an unknown field is a
    :class:`ConfigError` quoting ``flag`` and the item. Later items win."""
    names = config_fields(cls)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        if name not in names:
            raise _unknown_field(cls, name, names, f"{flag} {item!r}: ")
        out[name] = parse_value(cls, name, text)
    return out
