"""YAML files validated by pydantic (recipes, serve and bench configs, hardware profiles, API price lists), with
`key.path=value` overrides. Any problem is one FtxError naming `file:line` and the key path, e.g.
`recipes/my.yaml:23: train.learning_rte: unknown key`.

Paths a config reads are typed `InputPath` (or `InputFile` / `InputDir`): the loader resolves them relative to the
YAML file (relative to the working directory when they come from the command line), checks that they exist (an
error names the key's line), and the runner hashes their content into the cache key of the stage whose config
holds them, so a new file input can never be left out of a key. Fields marked `NOT_KEYED` (an API key, a port)
do not change what a stage computes and are left out of its key (`key_dump`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import FtxError

M = TypeVar("M", bound=BaseModel)
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "missing required key"}
NOT_KEYED = {"key": False}  # json_schema_extra of a field that does not change what a stage computes
MAX_YAML_NODES = 100_000  # a YAML document whose aliases expand beyond this is refused (billion laughs)


class InputPath(type(Path())):
    """A file or directory that a config reads (see the module docstring). `packaged`: a folder of packaged
    resources whose files can be named by their stem instead (`bench.hardware: cloud-2vcpu`)."""

    kind = "path"  # file | dir | path (either)
    packaged: str | None = None

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, handler(Path))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"type": "string", "format": cls.kind}


class InputFile(InputPath):
    kind = "file"


class InputDir(InputPath):
    kind = "dir"


class OutputDir(type(Path())):
    """A directory a config writes to: resolved like an input path (relative to the YAML file, to the working
    directory from the command line) but not required to exist, and not hashed."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, handler(Path))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"type": "string", "format": "directory"}


class HardwareFile(InputFile):
    packaged = "hardware"


class PricesFile(InputFile):
    packaged = "."


def walk(obj: Any, loc: tuple = ()) -> Iterator[tuple[tuple, Any, Any, Any]]:
    """(location, value, container, key) of every value inside a model, depth first (containers: models, dicts,
    lists); `container[key]` (or setattr for models) replaces the value."""
    if isinstance(obj, BaseModel):
        items = [(name, getattr(obj, name)) for name in type(obj).model_fields]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return
    for k, v in items:
        yield (*loc, k), v, obj, k
        yield from walk(v, (*loc, k))


def inputs(model: BaseModel) -> dict[str, Path]:
    """Every InputPath inside `model`, by dotted key path."""
    return {".".join(map(str, loc)): v for loc, v, _, _ in walk(model) if isinstance(v, InputPath)}


def key_dump(obj: Any) -> Any:
    """The JSON form of a config for a cache key: NOT_KEYED fields dropped; input paths left out (their content
    hashes are added by the runner, so moving a recipe does not invalidate its cache)."""
    if isinstance(obj, BaseModel):
        out = {}
        for name, field in type(obj).model_fields.items():
            if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("key") is False:
                continue
            out[name] = key_dump(getattr(obj, name))
        return out
    if isinstance(obj, InputPath):
        return "<input>"
    if isinstance(obj, OutputDir):
        return "<output>"
    if isinstance(obj, dict):
        return {str(k): key_dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_dump(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Loaded:
    """A validated document plus where each key was written (for later errors about values)."""

    def __init__(self, path: Path, model, lines: dict[tuple, int], overridden: dict[tuple, str]):
        self.path, self.model, self.lines, self.overridden = path, model, lines, overridden

    def where(self, loc: tuple) -> str:
        """`override '...'` when the key came from the command line, else `file:line` (nearest key above)."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.overridden:
                return f"override {self.overridden[loc[:n]]!r}"
        line = next((self.lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in self.lines), None)
        return f"{self.path}:{line}" if line else str(self.path)

    def fail(self, loc: tuple, message: str) -> FtxError:
        return FtxError(f"{'.'.join(map(str, loc))}: {message}", where=self.where(loc))

    def resolve(self, loc: tuple, value: Path, kind: str = "path", packaged: str | None = None) -> Path:
        """An existing path: relative to the YAML file's directory (to the working directory when the key came from
        the command line), or a packaged resource named by its stem."""
        value = Path(value).expanduser()
        full = value if value.is_absolute() else (self.base(loc) / value).resolve()
        if not full.exists() and packaged and not value.is_absolute() and len(value.parts) == 1:
            from . import resources

            named = resources.folder(packaged) / f"{value.name.removesuffix('.yaml')}.yaml"
            full = named if named.is_file() else full
        ok = {"file": full.is_file, "dir": full.is_dir, "path": full.exists}[kind]()
        if not ok:
            raise self.fail(loc, f"{'path' if kind == 'path' else kind} not found: {full}")
        return full

    def base(self, loc: tuple) -> Path:
        """What a relative path at `loc` is relative to: the working directory for a command-line value, else the
        YAML file's directory."""
        from_cli = any(loc[:n] in self.overridden for n in range(len(loc), 0, -1))
        return Path.cwd() if from_cli or not self.path.is_file() else self.path.parent

    def resolve_inputs(self) -> None:
        """Resolve and check every InputPath of the model in place (and resolve every OutputDir)."""
        for loc, value, container, key in list(walk(self.model)):
            if isinstance(value, OutputDir):
                full = OutputDir((self.base(loc) / Path(value).expanduser()).resolve())
                if isinstance(container, BaseModel):
                    object.__setattr__(container, key, full)
                else:
                    container[key] = full
            elif isinstance(value, InputPath):
                full = type(value)(self.resolve(loc, value, value.kind, value.packaged))
                if isinstance(container, BaseModel):
                    object.__setattr__(container, key, full)
                else:
                    container[key] = full


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


def expanded_size(node: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes the document has once its aliases are expanded (aliases share nodes; memoized, so this is linear in
    the file). A few hundred bytes of nested aliases can expand to billions of nodes."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            children = (
                [c for kv in n.value for c in kv]
                if isinstance(n, yaml.MappingNode)
                else (n.value if isinstance(n, yaml.SequenceNode) else [])
            )
            sizes[id(n)] = min(limit + 1, 1 + sum(size(c) for c in children))
        return sizes[id(n)]

    return size(node)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in text or text.startswith("="):
        raise FtxError(f"override {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def set_key(raw: dict, path: tuple[str, ...], value: Any, text: str) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise FtxError(f"override {text!r}: {part} is not a section")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def read_yaml(path: Path, what: str = "file") -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file: (data, key path -> line). Refuses documents whose aliases expand beyond MAX_YAML_NODES."""
    path = Path(path)
    if not path.is_file():
        raise FtxError(f"{what} not found", where=str(path))
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and expanded_size(node) > MAX_YAML_NODES:
            raise FtxError(
                f"YAML aliases expand to more than {MAX_YAML_NODES:,} nodes; refusing to read it", where=str(path)
            )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FtxError(f"invalid YAML: {getattr(e, 'problem', None) or e}", where=where) from None
    return raw, (key_lines(node) if node else {})


def load(path: Path | None, model: type[M], overrides=(), what: str = "file", resolve: bool = True) -> Loaded:
    """Parse, apply the overrides, validate, resolve the input paths (`resolve`); returns Loaded (its .model is the
    validated `model`). An override is `key.path=value` text (the value read as YAML), or (key.path, value, label)
    with the value already typed (a command-line flag; errors name the label). No path: an empty document
    (everything comes from the overrides)."""
    if path is None:
        path, raw, lines = Path("(command line)"), {}, {}
    else:
        path = Path(path)
        raw, lines = read_yaml(path, what)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FtxError(f"a {what} must be a YAML mapping", where=str(path))
    overridden: dict[tuple, str] = {}
    for ov in overrides:
        if isinstance(ov, tuple):
            key, value, label = tuple(ov[0].split(".")), ov[1], ov[2]
        else:
            (key, value), label = parse_override(ov), ov
        set_key(raw, key, value, label)
        overridden[key] = label
    try:
        obj = model.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e, path, lines, overridden) from None
    doc = Loaded(path, obj, lines, overridden)
    if resolve:
        doc.resolve_inputs()
    return doc


def validation_error(
    e: ValidationError, path: Path, lines: dict[tuple, int], overridden: dict[tuple, str], prefix: tuple = ()
) -> FtxError:
    err = e.errors()[0]
    loc = prefix + tuple(str(x) if not isinstance(x, int) else x for x in err["loc"])
    loc = tuple(x for x in loc if not (isinstance(x, str) and ("[" in x or x.startswith("function-"))))
    field = ".".join(map(str, loc))
    msg = _MESSAGES.get(err["type"], err["msg"]).removeprefix("Value error, ")
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return FtxError(f"{field}: {msg}" if field else msg, where=f"override {overridden[loc[:n]]!r}")
    inner = [label for key, label in overridden.items() if key[: len(loc)] == loc]  # a key inside this section
    if inner:
        return FtxError(f"{field}: {msg}" if field else msg, where=f"override {inner[-1]!r}")
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    if line is None and len(loc) > 1:  # missing key: point at its section
        line = lines.get(loc[:-1])
    return FtxError(f"{field}: {msg}" if field else msg, where=f"{path}:{line}" if line else str(path))
