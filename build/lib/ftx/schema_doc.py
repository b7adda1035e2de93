"""A config reference in markdown, generated from pydantic models (field types, defaults and descriptions), so
the reference in docs/ is never out of date: `ftx recipe schema` prints it, a test compares it with the file."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def _type(annotation) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in typing.get_args(annotation))}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    name = getattr(annotation, "__name__", str(annotation))
    return {
        "InputPath": "path",
        "InputFile": "file",
        "InputDir": "directory",
        "HardwareFile": "file or profile name",
        "PricesFile": "file",
        "PosixPath": "path",
        "Path": "path",
    }.get(name, name)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if hasattr(value, "__fspath__"):
        return f"`{value}`"
    return f"`{value!r}`" if value not in (None, [], {}) else ("`null`" if value is None else f"`{value!r}`")


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    out = [(prefix, model)]
    for name, f in model.model_fields.items():
        for sub in _models(f.annotation):
            out += sections(sub, f"{prefix}{name}.")
    return out


def reference(model: type[BaseModel], title: str) -> str:
    lines = [f"# {title}", "", "Generated from the models by `ftx recipe schema`; do not edit by hand.", ""]
    seen = set()
    for prefix, m in sections(model):
        if prefix in seen:
            continue
        seen.add(prefix)
        lines += [f"## `{prefix.rstrip('.') or 'top level'}`", ""]
        doc = (m.__doc__ or "").strip().splitlines()
        if doc and not doc[0].startswith(("Usage docs", "!!! abstract", "A base class")):
            lines += [doc[0], ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, f in m.model_fields.items():
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{prefix}{name}` | {_type(f.annotation)} | {_default(f)} | {desc} |")
        lines.append("")
    return "\n".join(lines)
