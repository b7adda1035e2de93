"""Flags as declared aliases of config keys: `--concurrency 4` is `concurrency=4`. Each verb lists its aliases;
`options` turns them into click options without defaults (an unset flag leaves the model's default alone) and
with the key, description and default from the model in --help; `overrides` turns the given flags into typed
(key, value, label) overrides for ftx.core.config.load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


@dataclass
class Alias:
    flag: str  # --concurrency
    key: str  # concurrency (dotted key path of the verb's model)
    help: str | None = None  # default: the field's description
    multiple: bool = False
    is_flag: bool = False  # a switch: sets `value` when given
    value: Any = True
    parse: Callable[[list[str]], list[tuple[str, Any]]] | None = None  # the flag's texts -> (key, value) pairs
    metavar: str | None = None
    raw: bool = False  # keep the text as a string (paths, names), else read it like a YAML value


def field_of(model, key: str):
    """The pydantic field at a dotted key path (None if the path goes through a dict or a union)."""
    f = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        f = fields[part]
        model = f.annotation
        args = getattr(model, "__args__", ())
        model = next((a for a in args if hasattr(a, "model_fields")), model)
    return f


def _help(model, a: Alias) -> str:
    f = field_of(model, a.key)
    text = a.help or (f.description if f is not None else "") or ""
    default = None
    if f is not None and not a.is_flag and not f.is_required():
        d = f.get_default(call_default_factory=True)
        default = d.model_dump() if hasattr(d, "model_dump") else d
    return f"{text} [{a.key}" + (f"; default: {default}" if default not in (None, [], {}, "") else "") + "]"


def options(model, aliases: list[Alias]):
    """click options for the aliases (no click defaults: unset flags leave the model's defaults alone)."""

    def decorate(fn):
        for a in reversed(aliases):
            name = a.flag.lstrip("-").replace("-", "_")
            kw = dict(help=_help(model, a), metavar=a.metavar)
            if a.is_flag:
                fn = click.option(a.flag, name, is_flag=True, default=False, help=kw["help"])(fn)
            else:
                fn = click.option(a.flag, name, multiple=a.multiple, default=None, **kw)(fn)
        return fn

    return decorate


def overrides(aliases: list[Alias], params: dict) -> list[tuple[str, Any, str]]:
    """(key, value, label) for every flag given, in the order declared."""
    out = []
    for a in aliases:
        given = params.get(a.flag.lstrip("-").replace("-", "_"))
        if given in (None, False, ()):
            continue
        texts = list(given) if a.multiple else [given]
        label = a.flag if a.is_flag else f"{a.flag} {' '.join(map(str, texts))}"
        if a.is_flag:
            out.append((a.key, a.value, label))
        elif a.parse:
            out += [(k, v, label) for k, v in a.parse(texts)]
        else:
            values = [t if a.raw else parse_value(t) for t in texts]
            out.append((a.key, values if a.multiple else values[0], label))
    return out


def parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _path(text: str) -> str:
    return str(Path(text).expanduser().absolute())


def abs_path(key: str) -> Callable[[list[str]], list[tuple[str, Any]]]:
    """A path flag (several: a list), relative to the working directory."""
    return lambda texts: [(key, _path(texts[0]) if len(texts) == 1 else [_path(t) for t in texts])]


def numbers(key: str) -> Callable[[list[str]], list[tuple[str, Any]]]:
    """A comma-separated list of numbers: `--sweep 1,2,4,8`."""

    def parse(texts: list[str]):
        try:
            return [(key, [float(x) for x in texts[0].split(",") if x.strip()])]
        except ValueError:
            raise click.BadParameter(f"{texts[0]!r}: expected numbers separated by commas, e.g. 1,2,4,8") from None

    return parse


def named(key: str) -> Callable[[list[str]], list[tuple[str, Any]]]:
    """NAME=PATH into `key.NAME` (the path relative to the working directory): `--adapter sft=dir/`."""

    def parse(texts: list[str]):
        out = []
        for text in texts:
            n, ok, value = text.partition("=")
            if not ok or not n:
                raise click.BadParameter(f"{text!r}: expected NAME=PATH")
            out.append((f"{key}.{n}", _path(value)))
        return out

    return parse
