"""Structured-output metrics (`eval.task: structured`): does the answer parse as JSON, does it validate against
the JSON Schema the recipe gives (`eval.json_schema`, checked with `jsonschema`), and how many of the reference
answer's fields it gets right. An answer wrapped in a Markdown code fence is read inside the fence, as the
clients that consume such output do."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from .base import Metric

_FENCE = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```$", re.DOTALL)


def parse(text: str):
    """The JSON value of an answer, or raise ValueError."""
    text = text.strip()
    m = _FENCE.match(text)
    return json.loads(m.group(1) if m else text)


def _structured(settings) -> bool:
    return getattr(settings, "task", "chat") == "structured"


class JsonValid(Metric):
    name, label, kind, percent = "json_valid", "answer parses as JSON", "generation", True

    def applies(self, settings) -> bool:
        return _structured(settings)

    def per_example(self, output, reference, settings) -> float:
        try:
            parse(output)
        except ValueError:
            return 0.0
        return 1.0


@cache
def _validator(path: str):
    import jsonschema

    schema = json.loads(Path(path).read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class JsonSchemaValid(Metric):
    name, label, kind, percent = "json_schema", "answer valid against the JSON Schema", "generation", True
    library = "jsonschema"

    def applies(self, settings) -> bool:
        return _structured(settings) and bool(getattr(settings, "json_schema", None))

    def per_example(self, output, reference, settings) -> float:
        try:
            value = parse(output)
        except ValueError:
            return 0.0
        return float(_validator(str(settings.json_schema)).is_valid(value))


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{'a.b[0]': leaf} for every leaf of a JSON value (an empty object or list is a leaf)."""
    if isinstance(value, dict) and value:
        return {
            k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


class JsonFields(Metric):
    name, label, kind, percent = "json_fields", "JSON fields equal to the reference's", "generation", True

    def applies(self, settings) -> bool:
        return _structured(settings)

    def per_example(self, output, reference, settings) -> float:
        """The share of the reference's leaf fields (by path) whose value the answer has; 0 if either does not
        parse (a reference that is not JSON scores every answer 0: the data is wrong for this task)."""
        try:
            want, got = flatten(parse(reference)), flatten(parse(output))
        except ValueError:
            return 0.0
        return sum(1 for k, v in want.items() if k in got and got[k] == v) / len(want)
