"""JSON from disk, treated as untrusted: size and nesting limits, standard tokens only, schemas.

Every JSON file vaekit reads (config.json, MANIFEST.json, state.json, evaluation.json,
metrics.jsonl) may have been edited, damaged or planted. So it is read as a regular file of at
most `max_bytes`; its nesting depth is measured on the raw text before the parser sees it (a
document nested 100,000 deep would otherwise exhaust the parser's recursion); NaN and
Infinity, which Python's json accepts but JSON does not, are refused; and the result can be
checked against a small schema. Every problem is one line naming the file.

Writing: `dumps` never emits NaN or Infinity: a non-finite float becomes null, which every JSON
reader understands as "no number".

Torch-free: config.py and the explorer use it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import RunError
from .safefiles import read_regular

MAX_JSON_BYTES = 16 * 2**20  # vaekit's own JSON files are kilobytes; a long run's metrics ~1 MB
MAX_DEPTH = 32  # vaekit nests at most 5 deep

# An escape (a backslash and the character it escapes), a quote, or a bracket: one linear scan
# over these tells strings from structure without a regex that could backtrack.
_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def nesting_depth(text: str) -> int:
    """Deepest nesting of [ and { in JSON text, strings skipped; linear time, no recursion."""
    depth = deepest = 0
    in_string = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str, where: str, *, error=RunError, max_depth: int = MAX_DEPTH,
          fix: str = "restore the original") -> Any:
    """Parse JSON text with the depth limit and without NaN/Infinity; one-line errors."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} deep, more than the {max_depth} levels vaekit "
                    f"reads; it was not written by vaekit, {fix}")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{where}: not valid JSON ({reason}); {fix}") from None


def read_text(path: Path, what: str, *, error=RunError, max_bytes: int = MAX_JSON_BYTES,
              fix: str = "restore the original") -> str:
    data = read_regular(Path(path), what, error, max_bytes,
                        fix=f"it was not written by vaekit, {fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.start}); {fix}") from None


def read_json(path: Path, what: str, *, error=RunError, schema: Any = None,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
              fix: str = "restore the original") -> Any:
    """One JSON document from a regular file, within the limits, checked against `schema`."""
    value = loads(read_text(path, what, error=error, max_bytes=max_bytes, fix=fix), str(path),
                  error=error, max_depth=max_depth, fix=fix)
    if schema is not None:
        check(value, schema, str(path), error=error, fix=fix)
    return value


def read_json_lines(path: Path, what: str, *, error=RunError, schema: Any = None,
                    max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
                    fix: str = "restore the original") -> list:
    """A JSON Lines file (metrics.jsonl): one document per non-blank line."""
    text = read_text(path, what, error=error, max_bytes=max_bytes, fix=fix)
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{path} line {number}"
            value = loads(line, where, error=error, max_depth=max_depth, fix=fix)
            if schema is not None:
                check(value, schema, where, error=error, fix=fix)
            values.append(value)
    return values


# ------------------------------------------------------------------------------------------------
# Schemas: a type or tuple of types; {key: schema} (those keys required, others allowed);
# [schema] (a list whose items all match); Optional(schema) for a key that may be absent.

class Optional:
    """A key of a {key: schema} that may be absent (if present it must match)."""

    def __init__(self, schema: Any):
        self.schema = schema


_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          float: "a number", bool: "true or false", type(None): "null"}


def _describe(schema) -> str:
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    kinds = schema if isinstance(schema, tuple) else (schema,)
    return " or ".join(_NAMES.get(kind, kind.__name__) for kind in kinds)


def _matches(value, kinds: tuple) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:  # JSON does not tell 1 from 1.0
        return True
    return isinstance(value, kinds)


def check(value: Any, schema: Any, where: str, *, error=RunError,
          fix: str = "restore the original") -> Any:
    """Raise `error` naming the first place where `value` does not match `schema`."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise error(f"{where}: expected an object, got {_NAMES.get(type(value), 'another')} "
                        f"value; {fix}")
        for key, inner in schema.items():
            optional = isinstance(inner, Optional)
            inner = inner.schema if optional else inner
            if key not in value:
                if optional:
                    continue
                raise error(f"{where}: lacks key {key!r}; {fix}")
            check(value[key], inner, f"{where}: {key!r}" if ":" not in where
                  else f"{where}.{key}", error=error, fix=fix)
        return value
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {_NAMES.get(type(value), 'another')} "
                        f"value; {fix}")
        for index, item in enumerate(value):
            check(item, schema[0], f"{where}[{index}]", error=error, fix=fix)
        return value
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if not _matches(value, kinds):
        raise error(f"{where} must be {_describe(schema)}, got "
                    f"{_NAMES.get(type(value), type(value).__name__)}; {fix}")
    return value


# ------------------------------------------------------------------------------------------------
# Writing


def finite(value: Any) -> Any:
    """A copy of a JSON-able value with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **options) -> str:
    """json.dumps that writes standard JSON only (non-finite floats become null)."""
    return json.dumps(finite(value), allow_nan=False, **options)
