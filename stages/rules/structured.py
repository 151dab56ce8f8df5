"""Structured output (DESIGN A4): whether an answer holds to the request's ``response_format``.

``json_schema``: the answer must be JSON and validate against the schema;
``json_object``: the answer must be a JSON object; ``text`` (or none): any
answer. Validation uses the ``jsonschema`` library (the maintained reference
implementation for Python, https://python-jsonschema.readthedocs.io/), with
the draft the schema's ``$schema`` names and Draft 2020-12 otherwise, the
draft OpenAI's Structured Outputs documents its subset of
(https://platform.openai.com/docs/guides/structured-outputs#supported-schemas,
read 2026-12-06). Compiled validators are kept in a small LRU cache keyed by
the schema's canonical JSON, so a schema repeated across requests is checked
and compiled once.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import msgspec
from cachetools import LRUCache
from jsonschema.exceptions import best_match

from schemas.request import JsonObjectFormat, JsonSchemaFormat, ResponseFormat

_ENCODER = msgspec.json.Encoder(order="sorted")
_VALIDATORS: LRUCache[bytes, Any] = LRUCache(maxsize=256)


class SchemaProblem(ValueError):
    """The request's JSON Schema itself is not a valid schema (the caller's mistake: ``invalid_request``)."""


def _validator(schema: dict[str, Any]) -> Any:
    key = _ENCODER.encode(schema)
    found = _VALIDATORS.get(key)
    if found is None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise SchemaProblem(
                f"`response_format.json_schema.schema` is not a valid JSON Schema: {exc.message}"
            ) from exc
        found = _VALIDATORS[key] = cls(schema)
    return found


def check_schema(response_format: ResponseFormat | None) -> str | None:
    """Why the request's JSON Schema is unusable (``None``: it is fine, or there is none)."""
    if isinstance(response_format, JsonSchemaFormat) and response_format.json_schema.schema is not None:
        try:
            _validator(response_format.json_schema.schema)
        except SchemaProblem as exc:
            return str(exc)
    return None


def answer_problem(response_format: ResponseFormat | None, content: str | None) -> str | None:
    """Why ``content`` does not hold to ``response_format`` (``None``: it does).

    Returns a short reason: ``"not JSON: ..."``, ``"not a JSON object"`` or the
    first validation error with its JSON path (``"$.age: 'x' is not of type
    'integer'"``).

    Raises:
        SchemaProblem: when the schema itself is invalid (see ``check_schema``).
    """
    if not isinstance(response_format, JsonSchemaFormat | JsonObjectFormat):
        return None
    try:
        value = msgspec.json.decode((content or "").strip() or b"")
    except msgspec.DecodeError as exc:
        return f"not JSON: {exc}"
    if isinstance(response_format, JsonObjectFormat):
        return None if isinstance(value, dict) else "not a JSON object"
    schema = response_format.json_schema.schema
    if schema is None:
        return None
    error = best_match(_validator(schema).iter_errors(value))
    if error is None:
        return None
    return f"{error.json_path}: {error.message[:300]}"
