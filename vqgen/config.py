"""Typed configs: dataclasses are the schema, YAML files hold values, dotted `section.key=value` overrides win;
unknown keys and wrong types are errors, and `--help` lists every key with its type, default and comment."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from vqgen.cli import VqgenError


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and coerce int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except VqgenError as e:
                errors.append(str(e))
        raise VqgenError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise VqgenError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VqgenError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    # bool is an int subclass: `true` must not pass as an integer, nor 1 as a boolean.
    ok = {float: (int, float), int: (int,), bool: (bool,), str: (str,), dict: (dict,)}.get(origin or tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} at {where}")
    if not isinstance(value, ok) or (tp is not bool and isinstance(value, bool)):
        raise VqgenError(f"{where}: expected {type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise VqgenError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise VqgenError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise VqgenError(f"{where}: unknown key(s) {unknown}. Valid keys: {names}. Fix the spelling")
    try:
        return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()})
    except (ValueError, TypeError) as e:
        raise VqgenError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def type_name(tp: Any) -> str:
    """`int | None` -> 'integer or null', Literal -> 'one of [...]' (for errors and --help)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(origin or tp, str(tp))


def option(default: Any, help: str) -> Any:
    """A config field with its documentation: `field(default=..., metadata={"help": ...})`, the convention of
    transformers' HfArgumentParser, which `--help` reads (a mutable default gets a factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def config_help(cls: type) -> str:
    """Every key of a sectioned config dataclass with its type, default and comment (for --help)."""
    lines = []
    for section in dataclasses.fields(cls):
        scls = typing.get_type_hints(cls)[section.name]
        hints, default = typing.get_type_hints(scls), scls()
        for f in dataclasses.fields(scls):
            value = json.dumps(getattr(default, f.name))
            note = f"  {f.metadata['help']}" if "help" in f.metadata else ""
            lines.append(f"  {section.name}.{f.name}={value}  ({type_name(hints[f.name])}){note}")
    return "\n".join(lines)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string and `no`/`off`/`yes`/`on` as booleans
    (so `train.mixed_precision=no` became False); YAML 1.2 and every user mean a float and a word."""


# YAML 1.2's booleans: true and false only. The class's resolver table is rebuilt, not edited in place, so
# yaml.SafeLoader itself keeps its own.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def parse_overrides(items: list[str], cls: type | None = None) -> dict:
    """`a.b=1 --c.d=x --e.f g` -> nested dict; values parsed as YAML scalars (so 1e-3, true, null work).

    With `cls` (a sectioned config), a flag without a section (`--max_steps 5`) is answered with the dotted
    form it should take (`train.max_steps=5`).
    """
    out: dict = {}
    i = 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, raw = key.split("=", 1)
        elif item.startswith("--") and "." in key and i + 1 < len(items):
            i += 1
            raw = items[i]
        else:
            raise VqgenError(f"cannot parse {item!r}: {_override_hint(key, cls)}")
        if "." not in key:
            raise VqgenError(f"{item!r} has no section: {_override_hint(key, cls)}")
        value = load_yaml(raw) if raw != "" else ""
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise VqgenError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
        i += 1
    return out


def _override_hint(key: str, cls: type | None) -> str:
    key = key.lstrip("-").replace("-", "_")
    if cls is not None and "." not in key:
        for section in dataclasses.fields(cls):
            scls = typing.get_type_hints(cls)[section.name]
            if key in {f.name for f in dataclasses.fields(scls)}:
                return f"write config keys as {section.name}.{key}=VALUE (see --help)"
    return "write config keys as section.key=VALUE (see --help for every key)"


def deep_update(base: dict, new: dict) -> dict:
    merged = dict(base)
    for k, v in new.items():
        merged[k] = deep_update(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _configs_root():
    """The repo's configs/ folder: beside the package in a checkout (or editable install), inside it in a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return checkout if checkout.is_dir() else resources.files("vqgen.configs")


def builtin_configs() -> list[str]:
    """Names of the configs shipped with vqgen (`mnist/stage1.yaml`, ...)."""
    root = _configs_root()
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name != "accelerate"]  # launch configs, not vqgen's
    return sorted(f"{d.name}/{f.name}" for d in dirs for f in d.iterdir() if f.name.endswith(".yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML path as given, else one of the built-in configs by name (works from an installed wheel)."""
    p = Path(path)
    if p.is_file():
        return p
    name = path.removeprefix("configs/")
    candidate = _configs_root().joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return Path(str(candidate))
    raise VqgenError(f"config file {path} does not exist. Pass a YAML file, or one of {builtin_configs()}")


def load_config(cls: type, path: str | None, overrides: list[str]) -> Any:
    """YAML file + dotted overrides -> validated dataclass `cls`."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VqgenError(f"config file {p} is not valid YAML: {e}") from None
    data = deep_update(data, parse_overrides(overrides, cls))
    if hasattr(cls, "derived_keys"):  # keys that follow others (stage 1: the model's image geometry)
        data = cls.derived_keys(data)
    return from_dict(cls, data)
