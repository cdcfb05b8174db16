"""Command-line flags and keyword options made from the configuration dataclasses.

Each default and help text is written once, on the dataclass field::

    block_size: int = field(default=16, metadata=flag("tokens per KV block"))

`ConfigFlags(CacheConfig)` then declares ``--block-size`` (type, default and help from the field) and builds
the ``CacheConfig`` back from the parsed namespace; `from_options` builds a config from flat keyword
arguments, as ``LLM(model, num_blocks=64)`` takes them. A leaf module: it imports no other part of pdserve.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_KEY = "pdserve.flag"


@dataclass(frozen=True)
class FlagSpec:
    """How a field appears on the command line. ``unit``: the flag counts units of this many (2**20: MiB)."""

    help: str
    name: str | None = None  # default: --<prefix><field-name>
    choices: tuple[str, ...] | None = None
    unit: int = 1


def flag(help: str, *, name: str | None = None, choices: Sequence[str] | None = None, unit: int = 1) -> dict[str, Any]:
    """Field metadata that makes the field a flag; see `FlagSpec`."""
    return {_KEY: FlagSpec(help, name, tuple(choices) if choices is not None else None, unit)}


@dataclass(frozen=True)
class Flag:
    """One field's flag. A bool field's flag takes no value and sets the field to the opposite of its default."""

    field_name: str
    option: str  # e.g. --kv-cache-mb
    dest: str  # the attribute of the parsed namespace, e.g. kv_cache_mb
    default: Any  # the field's default
    spec: FlagSpec
    kind: type  # int, float, str or bool

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        if self.kind is bool:
            on = " (on by default; this flag turns it off)" if self.default else ""
            parser.add_argument(self.option, dest=self.dest, action="store_true", help=self.spec.help + on)
            return
        default = self.default if self.spec.unit == 1 else self.default // self.spec.unit
        help_text = self.spec.help if default in (None, "") else f"{self.spec.help} (default: {default})"
        parser.add_argument(self.option, dest=self.dest, type=self.kind, default=default, choices=self.spec.choices,
                            help=help_text)

    def value(self, parsed: Any) -> Any:
        """The field's value for what the namespace holds."""
        if self.kind is bool:
            return (not self.default) if parsed else self.default
        if parsed is None or self.spec.unit == 1:
            return parsed
        return parsed * self.spec.unit


class ConfigFlags(Generic[T]):
    """The flags of one configuration dataclass: every field but those in `exclude`, named --<prefix><field>.

    A flagged field must have a default and `flag(...)` metadata; fields the caller sets itself go in `exclude`.
    """

    def __init__(self, cls: type[T], prefix: str = "", exclude: Iterable[str] = ()) -> None:
        excluded = set(exclude)
        names = {f.name for f in _fields(cls)}
        if excluded - names:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(excluded - names)}")
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.flags = [_flag(cls, f, hints[f.name], prefix) for f in _fields(cls) if f.name not in excluded]

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        for f in self.flags:
            f.add_to(parser)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The flagged fields' values, by field name."""
        return {f.field_name: f.value(getattr(args, f.dest)) for f in self.flags}

    def build(self, args: argparse.Namespace, **others: Any) -> T:
        """The config from the parsed flags, plus `others` for the excluded fields."""
        return self.cls(**self.values(args), **others)


def from_options(cls: type[T], caller: str, options: dict[str, Any], **fixed: Any) -> T:
    """`cls` from flat keyword `options`: each names a field of `cls` or of a dataclass-typed field of it
    (EngineConfig's cache and scheduler), so ``num_blocks=64`` reaches ``cache.num_blocks``. An unknown name
    raises TypeError naming it, as a call to `caller` with a fixed signature would."""
    hints = typing.get_type_hints(cls)
    owner: dict[str, str | None] = {}  # option name -> the dataclass-typed field holding it (None: cls itself)
    nested: dict[str, dict[str, Any]] = {}
    for f in _fields(cls):
        parts = dataclasses.is_dataclass(hints[f.name])
        if parts:
            nested[f.name] = {}
        for name in [sub.name for sub in _fields(hints[f.name])] if parts else [f.name]:
            assert name not in owner, f"{cls.__name__}: option {name!r} is ambiguous"
            owner[name] = f.name if parts else None
    own: dict[str, Any] = dict(fixed)
    for name, value in options.items():
        if name not in owner or name in fixed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        parent = owner[name]
        (own if parent is None else nested[parent])[name] = value
    return cls(**own, **{name: hints[name](**values) for name, values in nested.items()})


def _fields(cls: Any) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def _flag(cls: type, f: dataclasses.Field[Any], hint: Any, prefix: str) -> Flag:
    spec = f.metadata.get(_KEY)
    where = f"{cls.__name__}.{f.name}"
    if not isinstance(spec, FlagSpec):
        raise TypeError(f"{where} has no flag(...) metadata: give it some, or exclude it")
    if f.default is dataclasses.MISSING:
        raise TypeError(f"{where} has no default: exclude it and pass it to build()")
    base = _base_type(hint, where)
    if base is bool and spec.name is None and f.default:
        raise TypeError(f"{where} is on by default: name the flag that turns it off (flag(..., name='--no-...'))")
    if spec.unit != 1 and (base is not int or f.default is None or f.default % spec.unit):
        raise TypeError(f"{where}: a unit needs an int field whose default is a whole number of units")
    option = spec.name or "--" + prefix + f.name.replace("_", "-")
    return Flag(f.name, option, option.removeprefix("--").replace("-", "_"), f.default, spec, base)


def _base_type(hint: Any, where: str) -> type:
    """int for `int` and `int | None`; the same for float, str and bool."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if len(args) != 1 or args[0] not in (int, float, str, bool):
        raise TypeError(f"{where}: a flag needs an int, float, str or bool field (or one of them | None), not {hint}")
    return typing.cast(type, args[0])
