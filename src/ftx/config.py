"""YAML files validated by pydantic (recipes, serve configs, hardware profiles, API price lists), with
`key.path=value` overrides. Any problem is one FtxError naming `file:line` and the key path, e.g.
`recipes/my.yaml:23: train.learning_rte: unknown key`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import FtxError

M = TypeVar("M", bound=BaseModel)
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "missing required key"}


class Loaded:
    """A validated document plus where each key was written (for later errors about values)."""

    def __init__(self, path: Path, model, lines: dict[tuple, int], overridden: dict[tuple, str]):
        self.path, self.model, self.lines, self.overridden = path, model, lines, overridden

    def where(self, loc: tuple) -> str:
        """`override '...'` when the key came from the command line, else `file:line` (nearest key above)."""
        if loc in self.overridden:
            return f"override {self.overridden[loc]!r}"
        line = next((self.lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in self.lines), None)
        return f"{self.path}:{line}" if line else str(self.path)

    def resolve_file(self, loc: tuple, value: Path | None, kind: str = "file") -> Path | None:
        """A path relative to the YAML file's directory; it must exist (kind: file | dir)."""
        if value is None:
            return None
        full = value if Path(value).expanduser().is_absolute() else (self.path.parent / value).resolve()
        full = Path(full).expanduser()
        ok = full.is_file() if kind == "file" else full.is_dir()
        if not ok:
            raise FtxError(f"{'.'.join(map(str, loc))}: {kind} not found: {full}", where=self.where(loc))
        return full


def key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (k.value,)
            lines[path] = k.start_mark.line + 1
            lines.update(key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[prefix + (i,)] = v.start_mark.line + 1
            lines.update(key_lines(v, prefix + (i,)))
    return lines


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in text or text.startswith("="):
        raise FtxError(f"override {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def _set(raw: dict, path: tuple[str, ...], value: Any, text: str) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise FtxError(f"override {text!r}: {part} is not a section")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def read_yaml(path: Path, what: str = "file") -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file: (data, key path -> line)."""
    path = Path(path)
    if not path.is_file():
        raise FtxError(f"{what} not found", where=str(path))
    text = path.read_text()
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FtxError(f"invalid YAML: {getattr(e, 'problem', None) or e}", where=where) from None
    return raw, (key_lines(node) if node else {})


def load(path: Path | None, model: type[M], overrides: list[str] | tuple[str, ...] = (), what: str = "file",
         patch: dict | None = None) -> Loaded:
    """Parse, apply `patch` (top-level keys merged into the document's sections) and `key.path=value`
    overrides, validate; returns Loaded (its .model is the validated `model`). No path: an empty document
    (everything comes from the patch and the overrides)."""
    if path is None:
        path, raw, lines = Path("(command line)"), {}, {}
    else:
        path = Path(path)
        raw, lines = read_yaml(path, what)
    if not isinstance(raw, dict):
        raise FtxError(f"a {what} must be a YAML mapping", where=str(path))
    for k, v in (patch or {}).items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    overridden: dict[tuple, str] = {}
    for text_ov in overrides:
        key, value = parse_override(text_ov)
        _set(raw, key, value, text_ov)
        overridden[key] = text_ov
    try:
        obj = model.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, path, lines, overridden) from None
    return Loaded(path, obj, lines, overridden)


def validation_error(e: ValidationError, path: Path, lines: dict[tuple, int], overridden: dict[tuple, str],
                     prefix: tuple = ()) -> FtxError:
    err = e.errors()[0]
    loc = prefix + tuple(str(x) if not isinstance(x, int) else x for x in err["loc"])
    field = ".".join(map(str, loc))
    msg = _MESSAGES.get(err["type"], err["msg"])
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return FtxError(f"{field}: {msg}", where=f"override {overridden[loc[:n]]!r}")
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    if line is None and len(loc) > 1:  # missing key: point at its section
        line = lines.get(loc[:-1])
    return FtxError(f"{field}: {msg}", where=f"{path}:{line}" if line else str(path))
