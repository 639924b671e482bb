"""The one way recipes read their settings: a YAML file (``--config``) plus ``--key value``
overrides, parsed straight into the library's dataclasses, so every setting reaches the object it
configures and an unknown key is an error that names it.

Two shapes, one rule each:

- :func:`parse_config`: flat keys, each field name unique across the dataclasses (TRL's
  ``TrlParser``: ``SFTConfig``, ``DPOConfig``, ``ModelConfig`` and the completion configs).
- :func:`parse_sections`: one YAML section per dataclass (``population: {steps: 60}``), overridden
  as ``--population.steps 80``, for jobs whose configs share field names (PITuning's stages all
  have ``steps`` and ``lr``). A dataclass-typed field is a nested section. Keys named in ``shared``
  (the seed) may be set once at the top and reach every section that has them.

Without ``--config`` both use the recipe's default YAML (its CPU default), so each recipe runs
from a fresh clone.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from trl import TrlParser

from scope.data.events import show

OWN_PACKAGES = ("scope", "completion", "recipes", "__main__")


class ConfigParser(TrlParser):
    """``TrlParser`` that also reads ``tuple[X, ...]`` fields (as lists of ``X``; the dataclass turns
    them back into tuples), and leaves out fields set from the data (metadata ``from_data``) and
    nested dataclasses (parsed on their own and put in place by the recipe): those keep their
    defaults here."""

    where = "the command line"  # the config file, for error messages

    def error(self, message):
        """One line naming the config file, instead of argparse's usage text."""
        raise SystemExit(f"{self.where}: {message}")

    def _add_dataclass_arguments(self, dtype):
        super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        fixed = self.__dict__.setdefault("_fixed", {})
        for f in dataclasses.fields(dtype):
            if _left_out(f, hints[f.name]):
                fixed[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for name, value in self.__dict__.get("_fixed", {}).items():
            setattr(namespace, name, value)
        return namespace, rest

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if _left_out(field, field.type):
            return
        if typing.get_origin(field.type) is tuple:
            field = _with_type(field, list[typing.get_args(field.type)[0]])
        HfArgumentParser._parse_dataclass_field(parser, field)


def _left_out(field: dataclasses.Field, kind) -> bool:
    return bool(field.metadata.get("from_data")) or dataclasses.is_dataclass(kind)


def _with_type(field: dataclasses.Field, new_type) -> dataclasses.Field:
    if isinstance(field.default, tuple):  # the parser takes list defaults from a factory
        clone = dataclasses.field(default_factory=lambda default=field.default: list(default), metadata=field.metadata)
    else:
        clone = dataclasses.field(default=field.default, default_factory=field.default_factory,
                                  metadata=field.metadata)
    clone.name, clone.type = field.name, new_type
    return clone


def with_default_config(argv: list[str], default: str | Path | None) -> list[str]:
    """``argv`` (without the program name) with ``--config default`` in front when it names none."""
    argv = list(argv)
    return argv if default is None or "--config" in argv else ["--config", str(default), *argv]


def parse_config(dataclass_types: tuple[type, ...], argv: list[str] | None = None,
                 default_config: str | Path | None = None) -> tuple:
    """One instance of each dataclass, from ``--config`` (or ``default_config``) and the overrides;
    a value of the wrong kind (``steps: 2.5``, ``tasks: short``) stops here, naming the file and key."""
    argv = with_default_config(sys.argv[1:] if argv is None else argv, default_config)
    where = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "the command line"
    parser = ConfigParser(dataclass_types)
    parser.where = where
    try:
        parsed = tuple(parser.parse_args_and_config(argv))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{where}: {err}") from None
    for instance in parsed:
        if type(instance).__module__.split(".")[0] in OWN_PACKAGES:  # TRL's configs validate themselves
            check_types(instance, where)
    return parsed


def _kind_ok(value, kind) -> bool:
    """Whether ``value`` is of the annotated ``kind`` (what a YAML file can hold: bool, int, float,
    str, None, lists of those); kinds beyond that are not checked."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_kind_ok(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin in (list, tuple) and args:
        items = args[:1] if origin is list or args[-1] is Ellipsis else args
        return isinstance(value, (list, tuple)) and (len(items) == 1 or len(items) == len(value)) and all(
            _kind_ok(v, items[0] if len(items) == 1 else k) for v, k in zip(value, items * len(value)))
    return True


def _kind_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def check_types(instance, where: str) -> None:
    """Every field of a parsed dataclass holds a value of its annotated kind, else a one-line error."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if f.name in hints and not _kind_ok(value, hints[f.name]):
            raise SystemExit(f"{where}: '{f.name}' must be {_kind_name(hints[f.name])}, got {show(value)}")


def run_recipe(main: Callable[..., object], *args) -> int:
    """Call a recipe's ``main``: bad input or settings print one line and give exit status 2 (the
    traceback only with ``USCOPE_DEBUG=1``); success gives 0."""
    try:
        main(*args)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as err:  # DataError is a ValueError
        if os.environ.get("USCOPE_DEBUG"):
            raise
        message = str(err).splitlines() or [type(err).__name__]
        print(f"error: {message[0]}" + (f" (+{len(message) - 1} more lines)" if len(message) > 1 else ""),
              file=sys.stderr)
        print("(set USCOPE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


def parse_sections(sections: dict[str, type], argv: list[str] | None = None,
                   default_config: str | Path | None = None, top: type | None = None,
                   shared: tuple[str, ...] = ("seed",)) -> tuple[typing.Any, dict[str, typing.Any]]:
    """``(top-level dataclass, {section: dataclass})`` from a sectioned YAML and ``--a.b value``
    overrides (values are read as YAML: ``80``, ``true``, ``null``, ``[1, 2]``)."""
    argv = with_default_config(sys.argv[1:] if argv is None else argv, default_config)
    where = "the command line"
    raw: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file")
        path = Path(argv[i + 1])
        if not path.exists():
            raise SystemExit(f"{path}: config file not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise SystemExit(f"{path}: expected a mapping of keys to values at the top level")
        where = str(path)
        argv = argv[:i] + argv[i + 2:]
    if len(argv) % 2:
        raise SystemExit(f"expected --key value pairs, got {argv}")
    for flag, value in zip(argv[::2], argv[1::2]):
        if not flag.startswith("--"):
            raise SystemExit(f"expected --key value pairs, got {flag!r}")
        *path_keys, key = flag[2:].split(".")
        node = raw
        for part in path_keys:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"{flag}: {part!r} is not a section")
        node[key] = yaml.safe_load(value)
    top_fields = {f.name for f in dataclasses.fields(top)} if top is not None else set()
    common = {k: raw[k] for k in shared if k in raw}
    unknown = set(raw) - set(sections) - top_fields - set(common)
    if unknown:
        raise SystemExit(f"{where}: unknown key(s) {sorted(unknown)}; expected sections {sorted(sections)}"
                         + (f" or top-level keys {sorted(top_fields)}" if top_fields else ""))
    built = {name: _build(cls, {**{k: v for k, v in common.items() if _has_field(cls, k)}, **(raw.get(name) or {})},
                          f"{where}: section {name!r}") for name, cls in sections.items()}
    head = _build(top, {k: v for k, v in raw.items() if k in top_fields}, where) if top is not None else None
    return head, built


def _has_field(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def _build(cls: type, values, where: str):
    """``cls(**values)``, recursing into dataclass-typed fields; names the section of a bad key."""
    if not isinstance(values, dict):
        raise SystemExit(f"{where}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - names
    if unknown:
        raise SystemExit(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__module__}.{cls.__qualname__}; "
                         f"expected some of {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        kind = hints.get(key)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _build(kind, value, f"{where}.{key}")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{where}: {err}") from None
    check_types(instance, where)
    return instance


def use_threads(requested: int, use_cpu: bool) -> None:
    """``accelerate launch`` without a config sets OMP_NUM_THREADS=1 on CPU-only machines: use the cores."""
    if use_cpu or not torch.cuda.is_available():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(requested or max(1, (os.cpu_count() or 1) // world))
