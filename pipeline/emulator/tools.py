"""Tools, images and structured output in the emulator's three wire formats (DESIGN A4).

Each wire format's request is read into a ``Conversation`` (``parse``), checked
like the real API checks it (errors are ``wire.Problem`` with the provider's
wording), and answered deterministically (``plan_answer``):

1. the request ends with tool results (OpenAI ``tool`` messages, an Anthropic
   user turn of ``tool_result`` blocks, Workers AI ``tool`` messages): a text
   answer that quotes them (``"Based on the tool result: <content>. "`` before
   the usual words), or JSON when a ``response_format`` asks for it;
2. else, with tools offered and a tool choice other than ``none``: a tool call
   when the choice requires one (OpenAI ``required`` or a named function,
   Anthropic ``any`` or ``tool``) or when the last user text names a tool
   (case-insensitive, as a whole word). The named tool is called, else the
   tool named first in the text, else the first tool; its arguments are
   ``instance(schema)``, a JSON object valid against the tool's JSON Schema.
   With parallel calls allowed (no ``parallel_tool_calls: false``, no
   ``disable_parallel_tool_use``) and no named choice, every other tool the
   text names is called too, in the order named;
3. else, with ``response_format`` ``json_schema`` (Anthropic: a ``system``
   prompt holding aipipe's ``JSON_INSTRUCTION``, with the schema after
   ``JSON_SCHEMA_LEAD``): the JSON text of
   ``instance(schema)`` (Workers AI: the value itself in ``result.response``);
   ``json_object``: ``{"answer": "<words>."}``;
4. else the usual text, with ``"I see N image(s). "`` before the words when
   the request holds images.

Tool call ids are derived from the request (SHA-256 of the messages and
tools): OpenAI ``call_`` and Anthropic ``toolu_`` followed by 24 letters and
digits; Workers AI tool calls carry no id. Tool
call answers are not cut to ``max_tokens`` (JSON and text answers are).

Sources (read 2026-12-06): OpenAI function calling, structured outputs and
vision guides (https://platform.openai.com/docs/guides/function-calling ,
https://platform.openai.com/docs/guides/structured-outputs ,
https://platform.openai.com/docs/guides/images-vision); Anthropic tool use and
vision (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview ,
https://docs.anthropic.com/en/docs/build-with-claude/vision); Workers AI
function calling, JSON Mode and vision model pages
(https://developers.cloudflare.com/workers-ai/features/function-calling/traditional/ ,
https://developers.cloudflare.com/workers-ai/features/json-mode/). Error texts
follow the providers' answers as users report them; the Workers AI texts and
those marked "emulator's own" are the emulator's wording where no provider
text is known.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from pipeline.emulator import wire
from pipeline.emulator.spec import Wire
from stages.rules.catalog import ModelInfo
from stages.rules.structured import JSON_INSTRUCTION, JSON_SCHEMA_LEAD

#: Prompt tokens each image adds (OpenAI's price of one low-detail image), under every wire format.
IMAGE_TOKENS = 85
#: Media types every API takes for image bytes.
IMAGE_MEDIA_TYPES: tuple[str, ...] = ("image/jpeg", "image/png", "image/gif", "image/webp")
#: Tool (function) names every API takes.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Anthropic ``tool_use`` ids.
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
#: The longest OpenAI tool call id in a request (characters).
OPENAI_MAX_TOOL_CALL_ID = 40
#: Nesting depth past which the instance generator fills only required fields.
_MAX_DEPTH = 12
_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Anthropic content block types accepted besides text, image, tool_use and tool_result.
_OTHER_ANTHROPIC_BLOCKS = frozenset(
    {"document", "thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result", "search_result"}
)


@dataclass(frozen=True)
class ToolDef:
    """One tool offered: its name, description and JSON Schema of the arguments."""

    name: str
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class Image:
    """One image in a request: where it is (``message``, ``part``), its wire path, and its source."""

    message: int
    part: int
    where: str
    url: str | None = None
    media_type: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """A tool call the emulator answers with (``id`` empty for Workers AI)."""

    id: str
    name: str
    input: dict[str, Any]

    @property
    def arguments(self) -> str:
        """The arguments as compact JSON text (OpenAI's ``function.arguments``)."""
        return compact_json(self.input)

    def tokens(self) -> int:
        """Completion tokens of this call: ``text_tokens(name) + text_tokens(arguments)``."""
        return wire.text_tokens(self.name) + wire.text_tokens(self.arguments)


@dataclass
class Conversation:
    """What a request asks beyond plain text: tools, tool choice, response format, images, tool turns.

    ``choice`` is ``auto``, ``none``, ``required`` (OpenAI ``required``,
    Anthropic ``any``) or ``named`` (``choice_name``). ``tool_results`` are the
    contents of the tool results the request ends with (empty when it ends
    otherwise). ``prompt_text`` is the last user text that is not a tool
    result. ``extra_tokens`` are the prompt tokens beyond the messages' texts
    (tools, images, earlier tool calls, Anthropic tool results). ``seed``
    identifies the request (for tool call ids).
    """

    tools: list[ToolDef] = field(default_factory=list)
    choice: Literal["auto", "none", "required", "named"] = "auto"
    choice_name: str | None = None
    response_format: Literal["json_object", "json_schema"] | None = None
    schema: dict[str, Any] | None = None
    images: list[Image] = field(default_factory=list)
    tool_results: list[str] = field(default_factory=list)
    prompt_text: str = ""
    extra_tokens: int = 0
    seed: str = ""
    parallel: bool = True


@dataclass
class Answer:
    """The answer ``plan_answer`` chose: tool calls, a JSON value, or text with a prefix before the words."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    is_json: bool = False
    json_value: Any = None
    prefix: str = ""


# --- JSON helpers ----------------------------------------------------------------------------------


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text (no spaces, keys in their order), as the APIs send arguments."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON text (sorted keys, no spaces): the same under every wire format."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)


def _validator(schema: Any) -> Any:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def schema_error(schema: Any) -> str | None:
    """Why ``schema`` is no valid JSON Schema (its draft's metaschema), or ``None`` when it is."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return exc.message
    return None


def validates(schema: Any, value: Any) -> bool:
    """Whether ``value`` is valid against the JSON Schema ``schema`` (``jsonschema``)."""
    return bool(_validator(schema).is_valid(value))


def tool_tokens(tools: list[ToolDef]) -> int:
    """Prompt tokens of the offered tools: per tool, its name, description and canonical schema (tokens)."""
    return sum(
        wire.text_tokens(t.name) + wire.text_tokens(t.description) + wire.text_tokens(canonical_json(t.schema))
        for t in tools
    )


# --- the instance generator ------------------------------------------------------------------------


class _Generator:
    """Builds a deterministic JSON value valid against a schema, with words drawn from ``seed``."""

    def __init__(self, root: Any, seed: str) -> None:
        self.root = root
        self.seed = seed

    def word(self, path: str) -> str:
        return wire.words(f"{self.seed}\x00{path}", 1)

    def number_seed(self, path: str) -> int:
        return 1 + hashlib.sha256(f"{self.seed}\x00{path}".encode()).digest()[0] % 100

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for raw in ref[1:].split("/")[1:]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def make(self, schema: Any, path: str, depth: int) -> Any:
        if schema is True or schema is None or schema == {}:
            return self.word(path)
        if schema is False or not isinstance(schema, dict):
            return None
        if isinstance(schema.get("$ref"), str):
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            merged = {**target, **rest} if isinstance(target, dict) else rest
            return self.make(merged, path, depth + 1) if depth < 4 * _MAX_DEPTH else None
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for branch in schema["allOf"]:
                merged = _merge(merged, self._deref(branch))
            return self.make(merged, path, depth + 1)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                first = branches[0]
                return self.make(_merge(rest, first) if isinstance(first, dict) else first, path, depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self.make_object(schema, path, depth)
        if kind == "array":
            return self.make_array(schema, path, depth)
        if kind == "integer":
            return int(self.make_number(schema, path, integer=True))
        if kind == "number":
            return self.make_number(schema, path, integer=False)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.make_string(schema, path)

    def _deref(self, schema: Any) -> Any:
        if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return {**target, **rest} if isinstance(target, dict) else rest
        return schema

    def make_object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        props = _dict(schema.get("properties"))
        required = [r for r in _list(schema.get("required")) if isinstance(r, str)]
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, sub in props.items():
            if depth >= _MAX_DEPTH and key not in required:
                continue
            out[key] = self.make(sub, f"{path}/{key}", depth + 1)
        for key in required:
            if key not in out:
                out[key] = self.make(extra if isinstance(extra, dict) else {}, f"{path}/{key}", depth + 1)
        minimum = schema.get("minProperties")
        n = 0
        while isinstance(minimum, int) and len(out) < minimum and extra is not False:
            key = f"{self.word(f'{path}#key{n}')}_{n}"
            out[key] = self.make(extra if isinstance(extra, dict) else {}, f"{path}/{key}", depth + 1)
            n += 1
        maximum = schema.get("maxProperties")
        if isinstance(maximum, int):
            for key in [k for k in out if k not in required][: max(0, len(out) - maximum)]:
                del out[key]
        return out

    def make_array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        prefix = _list(schema.get("prefixItems"))
        items = schema.get("items")
        count = max(_int(schema.get("minItems"), 0), 0 if depth >= _MAX_DEPTH else 1, len(prefix))
        most = schema.get("maxItems")
        if isinstance(most, int):
            count = min(count, most)
        if items is False:
            count = min(count, len(prefix))
        out: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else (items if isinstance(items, dict) else {})
            out.append(self.make(sub, f"{path}/{i}", depth + 1))
        return out

    def make_number(self, schema: dict[str, Any], path: str, *, integer: bool) -> int | float:
        low = _num(schema.get("minimum"))
        high = _num(schema.get("maximum"))
        low_ex = _num(schema.get("exclusiveMinimum"))
        high_ex = _num(schema.get("exclusiveMaximum"))
        if integer:
            if low is not None:
                low = math.ceil(low)
            if high is not None:
                high = math.floor(high)
            if low_ex is not None:
                low = max(low if low is not None else -math.inf, math.floor(low_ex) + 1)
            if high_ex is not None:
                high = min(high if high is not None else math.inf, math.ceil(high_ex) - 1)
            value: float = float(self.number_seed(path))
            if low is not None and value < low:
                value = low
            if high is not None and value > high:
                value = high
            step = _num(schema.get("multipleOf"))
            if step and step > 0 and float(step).is_integer():
                value = math.ceil(value / step) * step
                if high is not None and value > high:
                    value = math.floor(high / step) * step
            return int(value)
        lower = max((b for b in (low, low_ex) if b is not None), default=None)
        upper = min((b for b in (high, high_ex) if b is not None), default=None)
        value = float(self.number_seed(path))

        def fits(v: float) -> bool:
            return (
                (low is None or v >= low)
                and (high is None or v <= high)
                and (low_ex is None or v > low_ex)
                and (high_ex is None or v < high_ex)
            )

        if not fits(value):
            if lower is not None and upper is not None:
                value = (lower + upper) / 2
            elif lower is not None:
                value = lower if fits(lower) else lower + 1
            elif upper is not None:
                value = upper if fits(upper) else upper - 1
        step = _num(schema.get("multipleOf"))
        if step and step > 0:
            candidate = math.ceil(value / step) * step
            value = candidate if fits(candidate) else math.floor(value / step) * step
        return int(value) if float(value).is_integer() else value

    def make_string(self, schema: dict[str, Any], path: str) -> str:
        word = self.word(path)
        value = _formatted(schema.get("format"), word, path, self.seed)
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            value = _matching(pattern, value, word)
        shortest = _int(schema.get("minLength"), 0)
        while len(value) < shortest:
            value = f"{value} {word}"
        longest = schema.get("maxLength")
        if isinstance(longest, int) and len(value) > longest:
            value = value[:longest]
        return value


def _merge(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    if not isinstance(extra, dict):
        return base
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    return merged


def _type_of(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if isinstance(k, str)]
        return next((k for k in named if k != "null"), "null" if named else None)
    if isinstance(kind, str):
        return kind
    if any(k in schema for k in ("properties", "required", "additionalProperties", "minProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    return "string"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _formatted(fmt: Any, word: str, path: str, seed: str) -> str:
    digest = hashlib.sha256(f"{seed}\x00{path}".encode()).hexdigest()
    return {
        "date-time": "2024-01-01T00:00:00Z",
        "date": "2024-01-01",
        "time": "00:00:00Z",
        "duration": "P1D",
        "email": f"{word}@example.com",
        "idn-email": f"{word}@example.com",
        "hostname": f"{word}.example.com",
        "idn-hostname": f"{word}.example.com",
        "ipv4": "192.0.2.1",
        "ipv6": "2001:db8::1",
        "uri": f"https://example.com/{word}",
        "iri": f"https://example.com/{word}",
        "uri-reference": f"https://example.com/{word}",
        "url": f"https://example.com/{word}",
        "uuid": f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}",
    }.get(fmt if isinstance(fmt, str) else "", word)


def _matching(pattern: str, value: str, word: str) -> str:
    """``value``, or a simple string matching ``pattern`` when ``value`` does not (best effort)."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return value
    for candidate in (value, word, word.upper(), word.capitalize(), "a", "A", "0", "1", "a1", "abc", "ABC", "123"):
        if compiled.search(candidate):
            return candidate
    return value


def instance(schema: Any, seed: str) -> Any:
    """A deterministic JSON value valid against ``schema`` (best effort), with words drawn from ``seed``.

    Objects get every property (and every ``required`` one); strings a word
    from ``seed`` respecting ``enum``/``const``/``format``/``minLength``/
    ``maxLength`` (and simple patterns); numbers respect the bounds and
    ``multipleOf``; arrays get ``max(minItems, 1)`` items; ``anyOf``/``oneOf``
    take the first branch, ``allOf`` merges; local ``$ref`` (``#/$defs/...``,
    ``#/definitions/...``) are resolved.
    """
    return _Generator(schema, seed).make(schema, "", 0)


def violating(schema: Any, seed: str, *, object_only: bool = False) -> Any:
    """A deterministic JSON value ``schema`` rejects (the ``invalid_json_schema`` fault).

    Tried in order: ``{}`` (missing required properties), the valid object
    with one property of a wrong type, with an unexpected property, then
    (unless ``object_only``) values of other types. A schema that accepts
    them all gets the valid instance.
    """
    valid = instance(schema, seed)
    candidates: list[Any] = []
    if isinstance(valid, dict):
        candidates.append({})
        for key in valid:
            wrongs: tuple[Any, ...] = (None, [], {}, "", 0, True)
            candidates.extend({**valid, key: wrong} for wrong in wrongs)
        candidates.append({**valid, "emulator_unexpected_property": True})
    elif object_only:
        candidates.append({})
    if not object_only:
        candidates.extend([[], "", 0, None, True, {}])
    check = _validator(schema)
    return next((c for c in candidates if not check.is_valid(c)), valid)


# --- request parsing: helpers ----------------------------------------------------------------------


def _bad(message: str, *, param: str | None = None, code: str | None = None) -> wire.Problem:
    return wire.Problem("invalid_request", 400, message, param=param, code=code)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _decode_data_uri(url: str) -> tuple[str, bytes] | str:
    """``(media type, bytes)`` of a base64 ``data:`` URI, or why it is none (OpenAI's wording)."""
    match = re.match(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", url, re.S)
    if match is None or ";base64" not in match.group(2).lower():
        return "a value that is not a base64-encoded data URL."
    media_type = match.group(1).lower()
    if media_type not in IMAGE_MEDIA_TYPES:
        return f"unsupported MIME type '{match.group(1)}'."
    try:
        raw = base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        return "an invalid base64 encoding."
    if not raw:
        return "empty base64-encoded bytes."
    return media_type, raw


def _part_text(content: Any) -> str:
    """Text of a content (a string, or the ``text`` parts of a list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _seed(provider: Wire, data: Mapping[str, Any]) -> str:
    basis = {k: data.get(k) for k in ("system", "messages", "prompt", "tools", "tool_choice")}
    return hashlib.sha256(f"{provider}\x00{canonical_json(basis)}".encode()).hexdigest()


def _finish(conv: Conversation, provider: Wire, data: Mapping[str, Any]) -> Conversation:
    conv.extra_tokens += tool_tokens(conv.tools) + IMAGE_TOKENS * len(conv.images)
    conv.seed = _seed(provider, data)
    return conv


def parse(provider: Wire, data: Mapping[str, Any]) -> Conversation:
    """Read and check the tools, tool choice, response format, images and tool turns of a request.

    Call it after the basic checks of the emulator's app (``messages`` is a
    non-empty list of objects with valid roles).

    Raises:
        wire.Problem: a 400 in the provider's wording, for what the real API refuses.
    """
    if provider == "openai":
        return _parse_openai(data)
    if provider == "anthropic":
        return _parse_anthropic(data)
    return _parse_cloudflare(data)


# --- OpenAI ------------------------------------------------------------------------------------------


def _openai_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise _bad(f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter")
    if len(name) > 64:
        raise _bad(
            f"Invalid '{where}': string too long. Expected a string with maximum length 64, but got a string "
            f"with length {len(name)} instead.",
            param=where,
            code="string_above_max_length",
        )
    if not TOOL_NAME.match(name):
        raise _bad(
            f"Invalid '{where}': string does not match pattern. Expected a string that matches the pattern "
            "'^[a-zA-Z0-9_-]+$'.",
            param=where,
            code="invalid_value",
        )
    return name


def strict_problem(schema: Any, context: tuple[str, ...] = ()) -> str | None:
    """Why ``schema`` cannot be used with OpenAI's ``strict: true``, or ``None``.

    Strict schemas close every object (``additionalProperties: false``) and require every property.
    """
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema
    props = _dict(schema.get("properties"))
    if is_object:
        if schema.get("additionalProperties") is not False:
            return f"In context={context!r}, 'additionalProperties' is required to be supplied and to be false."
        required = _list(schema.get("required"))
        missing = [k for k in props if k not in required]
        if missing:
            return (
                f"In context={context!r}, 'required' is required to be supplied and to be an array including every "
                f"key in properties. Missing '{missing[0]}'."
            )
    subs: list[tuple[tuple[str, ...], Any]] = [((*context, "properties", k), v) for k, v in props.items()]
    if isinstance(schema.get("items"), dict):
        subs.append(((*context, "items"), schema["items"]))
    for key in ("anyOf", "allOf"):
        if isinstance(schema.get(key), list):
            subs.extend(((*context, key, str(i)), v) for i, v in enumerate(schema[key]))
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            subs.extend(((*context, key, k), v) for k, v in schema[key].items())
    for where, sub in subs:
        problem = strict_problem(sub, where)
        if problem is not None:
            return problem
    return None


def _openai_tools(data: Mapping[str, Any]) -> list[ToolDef]:
    raw = data.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(
            f"Invalid type for 'tools': expected an array of objects, but got {_json_type(raw)} instead.",
            param="tools",
            code="invalid_type",
        )
    if not raw:
        raise _bad(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param="tools",
            code="empty_array",
        )
    tools: list[ToolDef] = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise _bad(
                f"Invalid type for 'tools[{i}]': expected an object, but got {_json_type(tool)} instead.",
                param=f"tools[{i}]",
                code="invalid_type",
            )
        if tool.get("type") != "function":
            raise _bad(
                f"Invalid value: '{tool.get('type')}'. Supported values are: 'function' and 'custom'.",
                param=f"tools[{i}].type",
                code="invalid_value",
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(
                f"Missing required parameter: 'tools[{i}].function'.",
                param=f"tools[{i}].function",
                code="missing_required_parameter",
            )
        name = _openai_name(fn.get("name"), f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad(
                f"Invalid type for 'tools[{i}].function.parameters': expected an object, but got "
                f"{_json_type(params)} instead.",
                param=f"tools[{i}].function.parameters",
                code="invalid_type",
            )
        problem = schema_error(params)
        if problem is None and fn.get("strict") is True:
            problem = strict_problem(params)
        if problem is not None:
            raise _bad(
                f"Invalid schema for function '{name}': {problem}",
                param=f"tools[{i}].function.parameters",
                code="invalid_function_parameters",
            )
        description = fn.get("description")
        tools.append(ToolDef(name, description if isinstance(description, str) else "", params))
    return tools


def _openai_choice(conv: Conversation, data: Mapping[str, Any]) -> None:
    conv.parallel = data.get("parallel_tool_calls") is not False
    choice = data.get("tool_choice")
    if choice is None:
        return
    if not conv.tools:
        raise _bad(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(
                f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.",
                param="tool_choice",
                code="invalid_value",
            )
        conv.choice = choice  # type: ignore[assignment]
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise _bad(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
            code="invalid_value",
        )
    if name not in {t.name for t in conv.tools}:
        raise _bad(  # emulator's own wording
            f"Invalid value for 'tool_choice': function '{name}' is not one of the functions in 'tools'.",
            param="tool_choice",
            code="invalid_value",
        )
    conv.choice, conv.choice_name = "named", name


def _openai_format(conv: Conversation, data: Mapping[str, Any]) -> None:
    rf = data.get("response_format")
    if rf is None:
        return
    if not isinstance(rf, dict):
        raise _bad(
            f"Invalid type for 'response_format': expected an object, but got {_json_type(rf)} instead.",
            param="response_format",
            code="invalid_type",
        )
    kind = rf.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        conv.response_format = "json_object"
        return
    if kind != "json_schema":
        raise _bad(
            f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and 'text'.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    name = _openai_name(spec.get("name"), "response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad(
            f"Invalid type for 'response_format.json_schema.schema': expected an object, but got "
            f"{_json_type(schema)} instead.",
            param="response_format.json_schema.schema",
            code="invalid_type",
        )
    problem = schema_error(schema)
    if problem is None and spec.get("strict") is True:
        problem = strict_problem(schema)
    if problem is not None:
        raise _bad(f"Invalid schema for response_format '{name}': {problem}", param="response_format")
    conv.response_format, conv.schema = "json_schema", schema


def _openai_image(part: dict[str, Any], i: int, j: int) -> Image:
    where = f"messages[{i}].content[{j}].image_url"
    spec = part.get("image_url")
    if spec is None:
        raise _bad(f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter")
    if not isinstance(spec, dict):
        raise _bad(
            f"Invalid type for '{where}': expected an object, but got {_json_type(spec)} instead.",
            param=where,
            code="invalid_type",
        )
    url = spec.get("url")
    if not isinstance(url, str):
        raise _bad(
            f"Missing required parameter: '{where}.url'.", param=f"{where}.url", code="missing_required_parameter"
        )
    detail = spec.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise _bad(
            f"Invalid value: '{detail}'. Supported values are: 'auto', 'low', and 'high'.",
            param=f"{where}.detail",
            code="invalid_value",
        )
    if url.startswith("data:"):
        decoded = _decode_data_uri(url)
        if isinstance(decoded, str):
            raise _bad(
                f"Invalid '{where}.url'. Expected a base64-encoded data URL with an image MIME type (e.g. "
                f"'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got {decoded}",
                param=f"{where}.url",
                code="invalid_value",
            )
        return Image(i, j, where, media_type=decoded[0])
    if not url.startswith(("https://", "http://")):
        raise _bad(
            f"Invalid '{where}.url'. Expected a valid URL, but got a value with an invalid format.",
            param=f"{where}.url",
            code="invalid_value",
        )
    return Image(i, j, where, url=url)


def _openai_tool_calls(conv: Conversation, message: dict[str, Any], i: int) -> list[str]:
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise _bad(
            f"Invalid type for 'messages[{i}].tool_calls': expected an array of objects, but got "
            f"{_json_type(calls)} instead.",
            param=f"messages[{i}].tool_calls",
            code="invalid_type",
        )
    if not calls:
        raise _bad(
            f"Invalid 'messages[{i}].tool_calls': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param=f"messages[{i}].tool_calls",
            code="empty_array",
        )
    ids: list[str] = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _bad(
                f"Invalid type for '{where}': expected an object, but got {_json_type(call)} instead.",
                param=where,
                code="invalid_type",
            )
        call_id = call.get("id")
        if not isinstance(call_id, str):
            raise _bad(
                f"Missing required parameter: '{where}.id'.", param=f"{where}.id", code="missing_required_parameter"
            )
        if len(call_id) > OPENAI_MAX_TOOL_CALL_ID:
            raise _bad(
                f"Invalid '{where}.id': string too long. Expected a string with maximum length "
                f"{OPENAI_MAX_TOOL_CALL_ID}, but got a string with length {len(call_id)} instead.",
                param=f"{where}.id",
                code="string_above_max_length",
            )
        if call.get("type", "function") != "function":
            raise _bad(
                f"Invalid value: '{call.get('type')}'. Supported values are: 'function' and 'custom'.",
                param=f"{where}.type",
                code="invalid_value",
            )
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _bad(
                f"Missing required parameter: '{where}.function'.",
                param=f"{where}.function",
                code="missing_required_parameter",
            )
        name = _openai_name(fn.get("name"), f"{where}.function.name")
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            raise _bad(
                f"Missing required parameter: '{where}.function.arguments'.",
                param=f"{where}.function.arguments",
                code="missing_required_parameter",
            )
        conv.extra_tokens += wire.text_tokens(name) + wire.text_tokens(arguments)
        ids.append(call_id)
    return ids


def _parse_openai(data: Mapping[str, Any]) -> Conversation:
    conv = Conversation(tools=_openai_tools(data))
    _openai_choice(conv, data)
    _openai_format(conv, data)
    messages: list[Any] = data["messages"]
    calls_of: dict[int, list[str]] = {}
    all_text: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise _bad(
                        f"Invalid type for 'messages[{i}].content[{j}]': expected an object, but got "
                        f"{_json_type(part)} instead.",
                        param=f"messages[{i}].content[{j}]",
                        code="invalid_type",
                    )
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise _bad(
                            f"Missing required parameter: 'messages[{i}].content[{j}].text'.",
                            param=f"messages[{i}].content[{j}].text",
                            code="missing_required_parameter",
                        )
                elif kind == "image_url":
                    if role != "user":
                        raise _bad(
                            f"Invalid 'messages[{i}]'. Image URLs are only allowed for messages with role 'user', "
                            f"but this message with role '{role}' contains an image URL.",
                            param=f"messages[{i}]",
                            code="invalid_value",
                        )
                    conv.images.append(_openai_image(part, i, j))
                elif kind not in ("input_audio", "file", "refusal"):
                    raise _bad(
                        f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url', 'input_audio', "
                        "'refusal', 'audio', and 'file'.",
                        param=f"messages[{i}].content[{j}].type",
                        code="invalid_value",
                    )
        all_text.append(_part_text(content))
        if role == "assistant":
            calls_of[i] = _openai_tool_calls(conv, message, i)
            if content is None and not calls_of[i]:
                raise _bad("Invalid value for 'content': expected a string, got null.", param=f"messages.[{i}].content")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _bad(
                f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                param=f"messages[{i}].tool_call_id",
                code="missing_required_parameter",
            )
    _openai_sequence(messages, calls_of)
    if conv.response_format == "json_object" and not any("json" in t.lower() for t in all_text):
        raise _bad(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
            param="messages",
        )
    tail = len(messages)
    while tail > 0 and messages[tail - 1].get("role") == "tool":
        tail -= 1
    conv.tool_results = [_part_text(m.get("content")) for m in messages[tail:]]
    conv.prompt_text = next((_part_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return _finish(conv, "openai", data)


def _openai_sequence(messages: list[Any], calls_of: dict[int, list[str]]) -> None:
    """Every ``tool`` message answers a call of the assistant message before its run; every call is answered."""
    i = 0
    while i < len(messages):
        role = messages[i].get("role")
        if role == "tool":
            raise _bad(
                "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                "'tool_calls'.",
                param=f"messages.[{i}].role",
            )
        ids = calls_of.get(i) or []
        if role != "assistant" or not ids:
            i += 1
            continue
        answered: set[str] = set()
        j = i + 1
        while j < len(messages) and messages[j].get("role") == "tool":
            call_id = messages[j]["tool_call_id"]
            if call_id not in ids:
                raise _bad(
                    f"Invalid parameter: 'tool_call_id' of '{call_id}' not found in 'tool_calls' of previous message.",
                    param=f"messages.[{j}].tool_call_id",
                )
            answered.add(call_id)
            j += 1
        missing = [c for c in ids if c not in answered]
        if missing:
            raise _bad(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(missing)}",
                param=f"messages.[{i}].role",
            )
        i = j


# --- Anthropic -----------------------------------------------------------------------------------------


def _anthropic_tools(data: Mapping[str, Any]) -> list[ToolDef]:
    raw = data.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("tools: Input should be a valid list")
    tools: list[ToolDef] = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise _bad(f"tools.{i}: Input should be a valid dictionary or object to extract fields from")
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool (web search, ...): offered, never called by the emulator
        name = tool.get("name")
        if not isinstance(name, str):
            raise _bad(f"tools.{i}.custom.name: Field required")
        if not TOOL_NAME.match(name):
            raise _bad(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        schema = tool.get("input_schema")
        if schema is None:
            raise _bad(f"tools.{i}.custom.input_schema: Field required")
        if not isinstance(schema, dict):
            raise _bad(f"tools.{i}.custom.input_schema: Input should be a valid dictionary")
        if schema.get("type") != "object":
            raise _bad(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
        if schema_error(schema) is not None:
            raise _bad(
                f"tools.{i}.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft 2020-12 "
                "(https://json-schema.org/). Learn more about tool use at https://docs.claude.com/en/docs/tool-use."
            )
        if any(t.name == name for t in tools):
            raise _bad("tools: Tool names must be unique.")
        description = tool.get("description")
        tools.append(ToolDef(name, description if isinstance(description, str) else "", schema))
    return tools


def _anthropic_choice(conv: Conversation, data: Mapping[str, Any]) -> None:
    choice = data.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise _bad("tool_choice: Input should be a valid dictionary or object to extract fields from")
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad(
            f"tool_choice: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
            "'auto', 'any', 'tool', 'none'"
        )
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean")
    conv.parallel = parallel is not True
    if kind in ("any", "tool") and not conv.tools:  # emulator's own wording
        raise _bad(f"tool_choice: tool_choice of type `{kind}` requires `tools` to be provided")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.tool.name: Field required")
        if name not in {t.name for t in conv.tools}:  # emulator's own wording
            raise _bad(f"tool_choice.tool.name: tool `{name}` was not found in `tools`")
        conv.choice, conv.choice_name = "named", name
    else:
        conv.choice = {"auto": "auto", "any": "required", "none": "none"}[kind]  # type: ignore[assignment]


def _anthropic_image(conv: Conversation, block: dict[str, Any], i: int, j: int, where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{where}.image.source: Field required")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise _bad(
                f"{where}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' "
                "or 'image/webp'"
            )
        payload = source.get("data")
        if not isinstance(payload, str):
            raise _bad(f"{where}.image.source.base64.data: Field required")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}.image.source.base64.data: invalid base64 data") from None
        if not raw:
            raise _bad(f"{where}.image.source.base64.data: Could not process image")
        conv.images.append(Image(i, j, where, media_type=str(media_type)))
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise _bad(f"{where}.image.source.url.url: Input should be a valid URL")
        conv.images.append(Image(i, j, where, url=url))
    elif kind == "file":
        conv.images.append(Image(i, j, where))
    else:
        raise _bad(
            f"{where}.image.source: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
            "'base64', 'url', 'file'"
        )


def _anthropic_result_text(conv: Conversation, block: dict[str, Any], i: int, j: int) -> str:
    content = block.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _bad(f"messages.{i}.content.{j}.tool_result.content: Input should be a valid list")
    texts: list[str] = []
    for k, inner in enumerate(content):
        kind = inner.get("type") if isinstance(inner, dict) else None
        if kind == "text" and isinstance(inner.get("text"), str):  # type: ignore[union-attr]
            texts.append(inner["text"])  # type: ignore[index]
        elif kind == "image":
            _anthropic_image(conv, inner, i, j, f"messages.{i}.content.{j}.tool_result.content.{k}")  # type: ignore[arg-type]
        elif kind not in ("document", "search_result"):
            raise _bad(
                f"messages.{i}.content.{j}.tool_result.content.{k}: Input tag '{kind}' found using 'type' does not "
                "match any of the expected tags: 'text', 'image', 'search_result', 'document'"
            )
    return "".join(texts)


@dataclass
class _Turn:
    role: str
    uses: list[str] = field(default_factory=list)
    results: list[tuple[int, str, str]] = field(default_factory=list)
    text: str = ""
    results_late: bool = False


def _anthropic_turn(conv: Conversation, message: dict[str, Any], i: int, last: bool) -> _Turn:
    role = str(message.get("role"))
    turn = _Turn(role)
    content = message.get("content")
    if isinstance(content, str):
        turn.text = content
        return turn
    if not isinstance(content, list):
        raise _bad(f"messages.{i}.content: Input should be a valid list")
    if not content and not (last and role == "assistant"):
        raise _bad(
            f"messages.{i}: all messages must have non-empty content except for the optional final assistant message"
        )
    other_before = False
    texts: list[str] = []
    for j, block in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if not isinstance(block, dict):
            raise _bad(f"{where}: Input should be a valid dictionary or object to extract fields from")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text.text: Field required")
            if not text:
                raise _bad("messages: text content blocks must be non-empty")
            if not text.strip():
                raise _bad("messages: text content blocks must contain non-whitespace text")
            texts.append(text)
            other_before = True
        elif kind == "image":
            _anthropic_image(conv, block, i, j, where)
            other_before = True
        elif kind == "tool_use":
            if role != "assistant":  # emulator's own wording
                raise _bad(f"{where}: `tool_use` blocks can only be in `assistant` messages")
            use_id = block.get("id")
            if not isinstance(use_id, str) or not TOOL_USE_ID.match(use_id):
                raise _bad(f"{where}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
            name = block.get("name")
            if not isinstance(name, str):
                raise _bad(f"{where}.tool_use.name: Field required")
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise _bad(f"{where}.tool_use.input: Input should be a valid dictionary")
            conv.extra_tokens += wire.text_tokens(name) + wire.text_tokens(compact_json(arguments))
            turn.uses.append(use_id)
        elif kind == "tool_result":
            if role != "user":  # emulator's own wording
                raise _bad(f"{where}: `tool_result` blocks can only be in `user` messages")
            use_id = block.get("tool_use_id")
            if not isinstance(use_id, str):
                raise _bad(f"{where}.tool_result.tool_use_id: Field required")
            if other_before:
                turn.results_late = True
            text = _anthropic_result_text(conv, block, i, j)
            conv.extra_tokens += wire.text_tokens(text)
            turn.results.append((j, use_id, text))
        elif kind in _OTHER_ANTHROPIC_BLOCKS:
            other_before = True
        else:
            raise _bad(
                f"{where}: Input tag '{kind}' found using 'type' does not match any of the expected tags: 'text', "
                "'image', 'document', 'search_result', 'tool_use', 'tool_result', 'thinking', 'redacted_thinking'"
            )
    turn.text = "".join(texts)
    return turn


def _instructed_json(conv: Conversation, data: Mapping[str, Any]) -> None:
    """Answer JSON when the ``system`` prompt holds aipipe's ``JSON_INSTRUCTION`` (Anthropic has no response format).

    The schema that follows ``JSON_SCHEMA_LEAD``, if any, is the one the answer matches.
    """
    system = data.get("system")
    text = system if isinstance(system, str) else _part_text(system) if isinstance(system, list) else ""
    if JSON_INSTRUCTION not in text:
        return
    _, lead, rest = text.partition(JSON_SCHEMA_LEAD)
    schema: Any = None
    if lead:
        try:
            schema, _ = json.JSONDecoder().raw_decode(rest)
        except ValueError:
            schema = None
    if isinstance(schema, dict):
        conv.response_format, conv.schema = "json_schema", schema
    else:
        conv.response_format = "json_object"


def _parse_anthropic(data: Mapping[str, Any]) -> Conversation:
    conv = Conversation(tools=_anthropic_tools(data))
    _anthropic_choice(conv, data)
    messages: list[Any] = data["messages"]
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        if i > 0 and message.get("role") == messages[i - 1].get("role"):
            role = message.get("role")
            raise _bad(
                f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles '
                "in a row"
            )
        turns.append(_anthropic_turn(conv, message, i, i == len(messages) - 1))
    for i, turn in enumerate(turns):
        if turn.uses:
            following = turns[i + 1] if i + 1 < len(turns) else None
            answered = {use_id for _, use_id, _ in following.results} if following is not None else set()
            missing = [u for u in turn.uses if u not in answered]
            if missing:
                raise _bad(
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in "
                    "the next message."
                )
        if turn.results:
            before = turns[i - 1].uses if i > 0 else []
            for j, use_id, _ in turn.results:
                if use_id not in before:
                    raise _bad(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {use_id}. "
                        "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                    )
            if turn.results_late:
                raise _bad(
                    f"messages.{i}: Did not find {len(before)} `tool_result` block(s) at the beginning of this "
                    "message. Messages following `tool_use` blocks must begin with a matching number of "
                    "`tool_result` blocks."
                )
    if turns and turns[-1].role == "user":
        conv.tool_results = [text for _, _, text in turns[-1].results]
    _instructed_json(conv, data)
    conv.prompt_text = next((t.text for t in reversed(turns) if t.role == "user" and (t.text or not t.results)), "")
    return _finish(conv, "anthropic", data)


# --- Workers AI ---------------------------------------------------------------------------------------


def _cf_bad(detail: str) -> wire.Problem:
    return _bad(f"AiError: Bad input: {detail}")


def _cloudflare_tools(data: Mapping[str, Any]) -> list[ToolDef]:
    raw = data.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _cf_bad("Error: Type mismatch of '/tools', 'object' not in 'array'")
    tools: list[ToolDef] = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _cf_bad(f"Error: required properties at '/tools/{i}' are 'name'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or schema_error(params) is not None:
            raise _cf_bad(f"Error: '/tools/{i}/parameters' is not a valid JSON Schema")
        description = fn.get("description")
        tools.append(ToolDef(fn["name"], description if isinstance(description, str) else "", params))
    return tools


def _cloudflare_choice(conv: Conversation, data: Mapping[str, Any]) -> None:
    choice = data.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        conv.choice = choice  # type: ignore[assignment]
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or name not in {t.name for t in conv.tools}:
        raise _cf_bad("Error: '/tool_choice' must be 'auto', 'none', 'required' or name one of the tools")
    conv.choice, conv.choice_name = "named", name


def _cloudflare_format(conv: Conversation, data: Mapping[str, Any]) -> None:
    rf = data.get("response_format")
    if rf is None:
        return
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
        conv.response_format = "json_object"
    elif kind == "json_schema":
        schema = rf.get("json_schema")  # type: ignore[union-attr]
        if not isinstance(schema, dict) or schema_error(schema) is not None:
            raise _cf_bad("Error: '/response_format/json_schema' is not a valid JSON Schema")
        conv.response_format, conv.schema = "json_schema", schema
    elif kind != "text":
        raise _cf_bad("Error: '/response_format/type' must be 'json_object' or 'json_schema'")


def _parse_cloudflare(data: Mapping[str, Any]) -> Conversation:
    conv = Conversation(tools=_cloudflare_tools(data))
    _cloudflare_choice(conv, data)
    _cloudflare_format(conv, data)
    messages = data.get("messages")
    if not isinstance(messages, list):
        conv.prompt_text = data.get("prompt") if isinstance(data.get("prompt"), str) else ""  # type: ignore[assignment]
        return _finish(conv, "cloudflare", data)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _cf_bad(f"Error: Type mismatch of '/messages/{i}', 'array' not in 'object'")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise _cf_bad(f"Error: '/messages/{i}/role' must be one of 'system', 'user', 'assistant', 'tool'")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    spec = part.get("image_url")  # type: ignore[union-attr]
                    url = spec.get("url") if isinstance(spec, dict) else None
                    where = f"/messages/{i}/content/{j}/image_url/url"
                    if not isinstance(url, str) or not url.startswith("data:"):  # emulator's own wording
                        raise _cf_bad(
                            f"Error: '{where}' must be a base64 data URI (data:image/...;base64,...): "
                            "image URLs are not fetched"
                        )
                    decoded = _decode_data_uri(url)
                    if isinstance(decoded, str):
                        raise _cf_bad(f"Error: '{where}' is not a valid base64 image data URI: got {decoded}")
                    conv.images.append(Image(i, j, where, media_type=decoded[0]))
                elif kind != "text":
                    raise _cf_bad(f"Error: '/messages/{i}/content/{j}/type' must be 'text' or 'image_url'")
        elif content is None and not (role == "assistant" and message.get("tool_calls")):
            raise _cf_bad(f"Error: required properties at '/messages/{i}' are 'content'")
        calls = message.get("tool_calls") if role == "assistant" else None
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
            if isinstance(fn, dict):
                arguments = fn.get("arguments")
                text = arguments if isinstance(arguments, str) else compact_json(arguments)
                conv.extra_tokens += wire.text_tokens(str(fn.get("name", ""))) + wire.text_tokens(text)
    tail = len(messages)
    while tail > 0 and messages[tail - 1].get("role") == "tool":
        tail -= 1
    conv.tool_results = [_part_text(m.get("content")) for m in messages[tail:]]
    conv.prompt_text = next((_part_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return _finish(conv, "cloudflare", data)


# --- model checks, request summary, answers -----------------------------------------------------------


def check_model(provider: Wire, model: str, conv: Conversation, info: ModelInfo | None) -> None:
    """Refuse images for a model the catalog marks without vision (an unlisted model takes them).

    Raises:
        wire.Problem: 400 in the provider's wording.
    """
    if not conv.images or info is None or info.vision:
        return
    image = conv.images[0]
    if provider == "openai":
        raise _bad(
            "Invalid content type. image_url is only supported by certain models.",
            param=f"messages.[{image.message}].content.[{image.part}].type",
        )
    if provider == "anthropic":  # emulator's own wording (every Claude model takes images)
        raise _bad(f"{image.where}.image: image input is not supported by the model {model}")
    raise _cf_bad(
        f"Error: oneOf at '/' not met, 0 matches: Type mismatch of '/messages/{image.message}/content', "
        "'array' not in 'string'"
    )


def request_features(provider: Wire, data: Mapping[str, Any]) -> dict[str, Any]:
    """Call log fields read leniently from a request (before validation): tools offered, images, response format."""
    tools = data.get("tools")
    count = len(tools) if isinstance(tools, list) else 0
    rf = data.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else None
    images = 0
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict):
                continue
            if part.get("type") in ("image_url", "image"):
                images += 1
            inner = part.get("content") if part.get("type") == "tool_result" else None
            if isinstance(inner, list):
                images += sum(1 for b in inner if isinstance(b, dict) and b.get("type") == "image")
    return {
        "tools_offered": count > 0,
        "tool_count": count,
        "images": images,
        "response_format": kind if kind in ("json_object", "json_schema") else None,
    }


def _named_in(text: str, tools: list[ToolDef]) -> ToolDef | None:
    """The tool whose name occurs first in ``text`` (case-insensitive, as a whole word), if any."""
    best: tuple[int, int] | None = None
    for index, tool in enumerate(tools):
        match = re.search(rf"(?<![A-Za-z0-9_-]){re.escape(tool.name)}(?![A-Za-z0-9_-])", text, re.IGNORECASE)
        if match is not None and (best is None or match.start() < best[0]):
            best = (match.start(), index)
    return tools[best[1]] if best is not None else None


def _named_all(text: str, tools: list[ToolDef]) -> list[ToolDef]:
    """Every tool named in ``text``, in the order of their first mention."""
    found: list[tuple[int, ToolDef]] = []
    for tool in tools:
        match = re.search(rf"(?<![A-Za-z0-9_-]){re.escape(tool.name)}(?![A-Za-z0-9_-])", text, re.IGNORECASE)
        if match is not None:
            found.append((match.start(), tool))
    return [tool for _, tool in sorted(found, key=lambda item: item[0])]


def _chosen_tools(conv: Conversation) -> list[ToolDef]:
    """The tools the answer calls: the chosen one, then every other tool the prompt names.

    Only the chosen one when parallel calls are off or the choice names a function.
    """
    first = _chosen_tool(conv)
    if first is None:
        return []
    if not conv.parallel or conv.choice == "named":
        return [first]
    named = _named_all(conv.prompt_text, conv.tools)
    return [first, *(t for t in named if t is not first)]


def _chosen_tool(conv: Conversation) -> ToolDef | None:
    if not conv.tools or conv.choice == "none":
        return None
    if conv.choice == "named":
        return next(t for t in conv.tools if t.name == conv.choice_name)
    named = _named_in(conv.prompt_text, conv.tools)
    if named is not None or conv.choice == "auto":
        return named
    return conv.tools[0]


def call_id(provider: Wire, seed: str, index: int) -> str:
    """The deterministic id of tool call ``index`` of the answer to the request ``seed``: ``call_``/``toolu_`` + 24."""
    number = int.from_bytes(hashlib.sha256(f"{seed}\x00{index}".encode()).digest(), "big")
    chars = []
    for _ in range(24):
        number, rest = divmod(number, len(_ALPHANUMERIC))
        chars.append(_ALPHANUMERIC[rest])
    body = "".join(chars)
    if provider == "anthropic":
        return "toolu_01" + body[:22]
    return "call_" + body if provider == "openai" else ""


def reply_prefix(conv: Conversation) -> str:
    """What a text answer says before its words: the tool results it is based on, the images it saw."""
    prefix = ""
    if conv.tool_results:
        noun = "result" if len(conv.tool_results) == 1 else "results"
        prefix += f"Based on the tool {noun}: {'; '.join(conv.tool_results)}. "
    if conv.images:
        prefix += f"I see {len(conv.images)} image(s). "
    return prefix


def plan_answer(provider: Wire, conv: Conversation, *, words: int, invalid: bool = False) -> Answer:
    """The answer to ``conv`` (rules in the module docstring).

    ``invalid`` (the ``invalid_json_schema`` fault) makes a JSON answer or tool
    call arguments violate their schema, and a ``json_object`` answer plain text.
    """
    tools = [] if conv.tool_results else _chosen_tools(conv)
    if tools:
        calls = []
        for index, tool in enumerate(tools):
            arguments = (violating if invalid else instance)(tool.schema, conv.prompt_text)
            calls.append(
                ToolCall(
                    call_id(provider, conv.seed, index), tool.name, arguments if isinstance(arguments, dict) else {}
                )
            )
        return Answer(tool_calls=calls)
    if conv.response_format == "json_schema" and conv.schema is not None:
        value = violating(conv.schema, conv.prompt_text) if invalid else instance(conv.schema, conv.prompt_text)
        return Answer(is_json=True, json_value=value)
    if conv.response_format == "json_object" and not invalid:
        body = f"{reply_prefix(conv)}{wire.words(conv.prompt_text, words)}."
        return Answer(is_json=True, json_value={"answer": body})
    return Answer(prefix=reply_prefix(conv))
