"""The request applications publish to ``ai.requests`` (DESIGN A4).

JSON field names are the contract. Constraints live in the types, so a bad
request fails at decode time with a path in the error message
(msgspec constraints: https://jcristharif.com/msgspec/constraints.html).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Role = Literal["system", "user", "assistant", "tool"]

#: Longest request id accepted (characters).
MAX_ID_CHARS = 256
#: Default overall deadline of a request (ms), DESIGN A8.
DEFAULT_TIMEOUT_MS = 60_000
#: The longest deadline a request may ask for (ms): one hour.
MAX_TIMEOUT_MS = 3_600_000
#: ``max_tokens`` used when a request leaves it out (tokens).
DEFAULT_MAX_TOKENS = 1024
#: ``temperature`` used when a request leaves it out (OpenAI's documented default).
DEFAULT_TEMPERATURE = 1.0
#: Largest encoded request accepted on ``ai.requests`` (bytes), images excluded; larger ones get ``invalid_request``.
MAX_REQUEST_BYTES = 1_048_576
#: Most characters in ``prompt`` or in one message's ``content`` (characters).
MAX_TEXT_CHARS = 800_000
#: Most chat turns in ``messages``.
MAX_MESSAGES = 1_000
#: Most tools one request may offer (OpenAI's documented limit is 128 functions).
MAX_TOOLS = 128
#: A tool (function) name, as OpenAI and Anthropic both document it: ``^[a-zA-Z0-9_-]{1,64}$``
#: (https://platform.openai.com/docs/api-reference/chat/create#chat-create-tools,
#: https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use, read 2026-12-06).
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Prefix of an image reference (claim check, DESIGN A4): ``aipipe-blob:<media type>;sha256:<64 hex>``.
BLOB_URL_PREFIX = "aipipe-blob:"
#: The whole shape of an image reference: media type and the SHA-256 (hex) of the image's bytes.
BLOB_URL_PATTERN = re.compile(r"^aipipe-blob:(image/[a-z0-9.+-]+);sha256:([0-9a-f]{64})$")
#: Most characters of an image URL on the topics: an https URL or a blob reference (a ``data:`` URI
#: is replaced by a reference before it is published; a raw producer's is bounded by the request size).
MAX_IMAGE_URL_CHARS = 28_000_000

RequestId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
ToolName = Annotated[str, Meta(pattern=TOOL_NAME_PATTERN)]


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True, frozen=True):
    """A text part of a message's content: ``{"type": "text", "text": str}``."""

    text: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class ImageURL(Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Where an image is: ``url`` is ``https://...``, a ``data:image/...;base64,...`` URI or a blob reference.

    ``detail`` is OpenAI's resolution hint (``auto``, ``low``, ``high``),
    passed to providers that take it.
    """

    url: Annotated[str, Meta(min_length=1, max_length=MAX_IMAGE_URL_CHARS)]
    detail: Literal["auto", "low", "high"] | None = None

    def __post_init__(self) -> None:
        """Raises ValueError when ``url`` is neither https, a ``data:image/`` URI nor a blob reference."""
        url = self.url
        if url.startswith("https://") and len(url) > len("https://"):
            return
        if url.startswith(BLOB_URL_PREFIX):
            if not BLOB_URL_PATTERN.match(url):
                raise ValueError("an image reference must be `aipipe-blob:image/<type>;sha256:<64 hex>`")
            return
        if url.startswith("data:"):
            header, sep, _ = url.partition(",")
            if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
                raise ValueError("a `data:` image URL must be `data:image/<type>;base64,<data>`")
            return
        raise ValueError("an image URL must be an https URL or a `data:image/...;base64,` URI")


class ImagePart(Struct, tag="image_url", tag_field="type", forbid_unknown_fields=True, frozen=True):
    """An image part of a user message: ``{"type": "image_url", "image_url": {"url", "detail"?}}``."""

    image_url: ImageURL


ContentPart = TextPart | ImagePart
MessageText = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class FunctionCall(Struct, forbid_unknown_fields=True, frozen=True):
    """The function a tool call invokes: its ``name`` and ``arguments`` (a JSON object, as a string)."""

    name: ToolName
    arguments: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)] = "{}"


class ToolCall(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One tool call of an assistant turn: ``{"id", "type": "function", "function": {name, arguments}}``.

    ``id`` is what the matching ``tool`` message's ``tool_call_id`` names; in
    answers it is always sanitised to ``^[A-Za-z0-9_-]{1,40}$`` (DESIGN A4,
    ``stages.rules.tool_ids``).
    """

    id: Annotated[str, Meta(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """One chat turn, in OpenAI's chat completions shape (DESIGN A4).

    ``content`` is a string or a list of parts (``TextPart``; ``ImagePart`` in
    ``user`` turns only); an ``assistant`` turn may carry ``tool_calls`` and
    then ``content: null``; a ``tool`` turn answers the call ``tool_call_id``.

    Raises:
        msgspec.ValidationError: on decode, when a rule above does not hold.
    """

    role: Role
    content: MessageText | Annotated[list[ContentPart], Meta(min_length=1)] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None

    def __post_init__(self) -> None:
        """Check the role rules (module docstring of DESIGN A4); raises ValueError naming the rule."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` may be null only in an assistant message with `tool_calls`")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may carry `tool_calls`")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs `tool_call_id`, and only a tool message may carry it")
        if isinstance(self.content, list) and self.role != "user":
            if any(isinstance(p, ImagePart) for p in self.content):
                raise ValueError("image parts are allowed in user messages only")

    def text(self) -> str:
        """The message's text: its ``content`` string, or its text parts joined (images left out)."""
        content = self.content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(p.text for p in content if isinstance(p, TextPart))

    def images(self) -> list[ImageURL]:
        """The message's images, in order (``[]`` for a text message)."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url for p in self.content if isinstance(p, ImagePart)]


def user_message(text: str) -> Message:
    """A ``user`` turn holding ``text``."""
    return Message(role="user", content=text)


class FunctionDef(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """A function the model may call: ``name``, ``description``, ``parameters`` (a JSON Schema object), ``strict``."""

    name: ToolName
    description: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def __post_init__(self) -> None:
        """Raises ValueError when ``parameters`` is not a JSON Schema of ``type: "object"``."""
        if self.parameters is not None and self.parameters.get("type") != "object":
            raise ValueError(
                f'tool {self.name!r}: `parameters` must be a JSON Schema with `type: "object"` '
                f"(got type {self.parameters.get('type')!r})"
            )

    def schema(self) -> dict[str, Any]:
        """``parameters``, or the empty object schema when the function takes none."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A tool offered to the model: ``{"type": "function", "function": FunctionDef}``."""

    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(Struct, forbid_unknown_fields=True, frozen=True):
    """The ``name`` of the function a forced ``tool_choice`` names."""

    name: ToolName


class ToolChoiceNamed(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``tool_choice`` forcing one function: ``{"type": "function", "function": {"name"}}``."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceNamed


class TextFormat(Struct, tag="text", tag_field="type", forbid_unknown_fields=True, frozen=True):
    """``response_format: {"type": "text"}``: plain text (the default)."""


class JsonObjectFormat(Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True, frozen=True):
    """``response_format: {"type": "json_object"}``: any JSON object."""


class JsonSchemaSpec(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """The schema of a ``json_schema`` response format: ``name``, ``schema`` (a JSON Schema object), ``strict``."""

    name: ToolName
    description: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)] | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True, frozen=True):
    """``response_format: {"type": "json_schema", "json_schema": {...}}``: JSON that validates against a schema."""

    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class CacheOptions(Struct, forbid_unknown_fields=True, frozen=True):
    """Per-request cache control: ``ttl_s`` overrides the default TTL (s); ``bypass`` skips the cache."""

    ttl_s: Annotated[int, Meta(ge=0)] | None = None
    bypass: bool = False


class AIRequest(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A generation request (DESIGN A4).

    Exactly one of ``prompt`` or ``messages`` is set. ``max_tokens`` > 0,
    ``temperature`` in [0, 2], ``top_p`` in (0, 1], ``timeout_ms`` > 0 is the
    deadline of the whole request (ms, all providers and waits included).
    ``providers`` is an ordered allow-list (first = preferred). ``stream``
    asks for the answer as ``StreamChunk`` events (DESIGN A9) on ``ai.stream``
    or on ``stream_topic`` (a Kafka topic name); ``stream_resume`` (``None``:
    the ``[stream] resume`` setting) lets the next candidate continue an
    answer interrupted after its first chunk. Unknown fields
    are rejected so that a misspelt parameter is an error, not a silent default.

    Raises:
        msgspec.ValidationError: on decode, when a constraint does not hold.
    """

    id: RequestId
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[Message], Meta(max_length=MAX_MESSAGES)] | None = None
    max_tokens: Annotated[int, Meta(gt=0)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Meta(ge=0, le=2)] = DEFAULT_TEMPERATURE
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    metadata: dict[str, Any] | None = None
    cache: CacheOptions | None = None
    timeout_ms: Annotated[int, Meta(gt=0, le=MAX_TIMEOUT_MS)] = DEFAULT_TIMEOUT_MS
    providers: list[str] | None = None
    stream: bool = False
    stream_resume: bool | None = None
    stream_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] | None = None
    tools: Annotated[list[Tool], Meta(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        """Check the rules a single field cannot express.

        Raises:
            ValueError: when not exactly one of prompt/messages is given, the
                messages hold no user or assistant turn, or a stream field is
                set without ``stream: true`` (msgspec reports it as
                a ``ValidationError``).
        """
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` is required")
        if self.messages is not None and not any(m.role != "system" for m in self.messages):
            raise ValueError("`messages` needs at least one user or assistant message")
        if not self.stream and self.stream_resume:
            raise ValueError("`stream_resume` needs `stream: true`")
        if not self.stream and self.stream_topic is not None:
            raise ValueError("`stream_topic` needs `stream: true`")
        self._check_tools()
        if self.messages is not None:
            self._check_tool_turns(self.messages)

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("`tools` has two functions with the same name")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("`tool_choice` is only allowed when `tools` are given")
        if self.parallel_tool_calls is not None and not self.tools:
            raise ValueError("`parallel_tool_calls` is only allowed when `tools` are given")
        if isinstance(self.tool_choice, ToolChoiceNamed) and self.tool_choice.function.name not in names:
            raise ValueError(f"`tool_choice` names {self.tool_choice.function.name!r}, which is not in `tools`")

    @staticmethod
    def _check_tool_turns(messages: list[Message]) -> None:
        called: set[str] = set()
        for i, m in enumerate(messages):
            if m.tool_calls:
                called.update(c.id for c in m.tool_calls)
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(
                    f"messages[{i}]: `tool_call_id` {m.tool_call_id!r} answers no tool call of an earlier "
                    "assistant message"
                )

    def chat_messages(self) -> list[Message]:
        """The request as chat turns: a ``prompt`` becomes one user message."""
        if self.messages is not None:
            return list(self.messages)
        return [Message(role="user", content=self.prompt or "")]

    def needs(self) -> frozenset[str]:
        """Capabilities a model must have to answer this request: ``tools``, ``vision``, ``json_schema``, ``streaming``.

        ``tools`` when tools are offered or the history holds tool turns;
        ``tool_choice`` when a tool call is forced (``required`` or a named
        function); ``vision`` when a message holds an image; ``json_schema``
        for a ``json_schema`` response format; ``streaming`` for ``stream: true``.
        """
        needs: set[str] = set()
        messages = self.messages or ()
        if self.tools or any(m.tool_calls or m.role == "tool" for m in messages):
            needs.add("tools")
        if self.tool_choice == "required" or isinstance(self.tool_choice, ToolChoiceNamed):
            needs.add("tool_choice")
        if any(m.images() for m in messages):
            needs.add("vision")
        if isinstance(self.response_format, JsonSchemaFormat):
            needs.add("json_schema")
        if self.stream:
            needs.add("streaming")
        return frozenset(needs)


def request_from_dict(data: dict[str, Any]) -> AIRequest:
    """Build an ``AIRequest`` from a dict with its JSON field names, validating it.

    Raises:
        msgspec.ValidationError: when a field is missing, unknown or out of range.
    """
    return msgspec.convert(data, AIRequest)
