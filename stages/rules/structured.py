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
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from schemas.request import (
    AIRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoiceNamed,
)

_ENCODER = msgspec.json.Encoder(order="sorted")
_VALIDATORS: LRUCache[bytes, Any] = LRUCache(maxsize=256)
#: Deepest nesting of a schema accepted (levels of objects and arrays).
MAX_SCHEMA_DEPTH = 64


#: What aipipe asks a model for when its API has no JSON mode for the request (Anthropic with tools,
#: or ``json_object``): best effort, the answer is validated anyway. The emulator recognises it.
JSON_INSTRUCTION = "Answer with one JSON object only: no other text before or after it, and no code fences."
#: Follows ``JSON_INSTRUCTION``, then the schema's compact JSON, when the answer must match a schema.
JSON_SCHEMA_LEAD = " It must validate against this JSON Schema: "


class SchemaProblem(ValueError):
    """The request's JSON Schema itself is not usable (the caller's mistake: ``invalid_request``)."""


def _refs(node: Any, depth: int = 0) -> list[str]:
    """Every ``$ref`` value in a schema. Raises SchemaProblem past ``MAX_SCHEMA_DEPTH`` levels."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaProblem(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.append(ref)
        for value in node.values():
            found.extend(_refs(value, depth + 1))
    elif isinstance(node, list):
        for value in node:
            found.extend(_refs(value, depth + 1))
    return found


def _validator(schema: dict[str, Any], where: str) -> Any:
    """A compiled validator for ``schema`` (cached); ``where`` names the field in errors.

    Only references inside the schema itself (``#...``) are allowed, and each
    must resolve: aipipe never fetches a ``$ref`` URL (no request forgery, no
    blocking fetch in the event loop). The validator gets a
    ``referencing.Registry`` holding only the schema, which turns off
    jsonschema's deprecated remote retrieval
    (https://python-jsonschema.readthedocs.io/en/stable/referencing/).

    Raises:
        SchemaProblem: not a valid JSON Schema, nested too deep, a remote or unresolvable ``$ref``.
    """
    key = _ENCODER.encode(schema)
    found = _VALIDATORS.get(key)
    if found is not None:
        return found
    refs = _refs(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaProblem(f"`{where}` is not a valid JSON Schema: {exc.message}") from exc
    except RecursionError as exc:
        raise SchemaProblem(f"`{where}` is nested too deeply") from exc
    remote = [r for r in refs if not r.startswith("#")]
    if remote:
        raise SchemaProblem(
            f"`{where}` refers to {remote[0][:100]!r}: only references inside the schema (#...) are allowed"
        )
    resource = DRAFT202012.create_resource(schema)
    resolver = Registry().resolver_with_root(resource)
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable as exc:
            raise SchemaProblem(f"`{where}`: $ref {ref[:100]!r} does not resolve inside the schema") from exc
    registry: Registry[Any] = Registry().with_resource(resource.id() or "", resource)
    found = _VALIDATORS[key] = cls(schema, registry=registry)
    return found


def schema_problems(response_format: ResponseFormat | None, tools: list[Tool] | None = None) -> str | None:
    """Why the request's JSON Schemas are unusable (``None``: they are fine, or there are none).

    Checks the ``json_schema`` response format's schema and every tool's
    ``parameters``, so a bad schema is the caller's ``invalid_request`` before
    any provider is called.
    """
    try:
        if isinstance(response_format, JsonSchemaFormat) and response_format.json_schema.schema is not None:
            _validator(response_format.json_schema.schema, "response_format.json_schema.schema")
        for i, tool in enumerate(tools or ()):
            if tool.function.parameters is not None:
                _validator(tool.function.parameters, f"tools[{i}].function.parameters")
    except SchemaProblem as exc:
        return str(exc)
    return None


def answer_problem(response_format: ResponseFormat | None, content: str | None) -> str | None:
    """Why ``content`` does not hold to ``response_format`` (``None``: it does).

    Returns a short reason: ``"not JSON: ..."``, ``"not a JSON object"`` or the
    first validation error with its JSON path (``"$.age: 'x' is not of type
    'integer'"``).

    Raises:
        SchemaProblem: when the schema itself is unusable (see ``schema_problems``).
    """
    if not isinstance(response_format, JsonSchemaFormat | JsonObjectFormat):
        return None
    try:
        value = msgspec.json.decode((content or "").strip() or b"")
    except msgspec.DecodeError as exc:
        return f"not JSON: {exc}"
    except RecursionError:
        return "not JSON: nested too deeply"
    if isinstance(response_format, JsonObjectFormat):
        return None if isinstance(value, dict) else "not a JSON object"
    schema = response_format.json_schema.schema
    if schema is None:
        return None
    validator = _validator(schema, "response_format.json_schema.schema")
    try:
        error = best_match(validator.iter_errors(value))
    except RecursionError:
        return "the answer is nested too deeply to validate"
    except Exception as exc:  # a reference the checks above did not foresee: never fetched, never a crash
        return f"the schema could not be applied: {type(exc).__name__}"
    if error is None:
        return None
    return f"{error.json_path}: {error.message[:300]}"


def tool_choice_problem(request: AIRequest, tool_calls: list[ToolCall] | None) -> str | None:
    """Why an answer ignores a forced ``tool_choice`` (``None``: it holds to it, or none was forced).

    ``required`` needs at least one tool call; a named function needs a call of
    that function; ``none`` needs no tool call (OpenAI's documented meanings,
    https://platform.openai.com/docs/api-reference/chat/create#chat-create-tool_choice).
    """
    choice = request.tool_choice
    names = [c.function.name for c in tool_calls or ()]
    if choice == "required" and not names:
        return "tool_choice is required but the answer called no tool"
    if choice == "none" and names:
        return f"tool_choice is none but the answer called {names[0]!r}"
    if isinstance(choice, ToolChoiceNamed) and choice.function.name not in names:
        called = repr(names[0]) if names else "no tool"
        return f"tool_choice names {choice.function.name!r} but the answer called {called}"
    return None
