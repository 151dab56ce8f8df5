"""The provider adapter interface the executor calls (one HTTP call per ``complete``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import httpx
from msgspec import Struct

from pipeline.errors import InvalidRequestError
from schemas.request import BLOB_URL_PREFIX, Message, ResponseFormat, Tool, ToolCall, ToolChoice
from schemas.response import Usage
from stages.rules.continuation import CONTINUE_INSTRUCTION

__all__ = [
    "CONTINUE_INSTRUCTION",
    "ProviderAdapter",
    "ProviderCall",
    "ProviderResult",
    "StreamDelta",
    "StreamEnd",
    "StreamToolDelta",
]


def refuse_blob_reference(url: str, provider: str) -> None:
    """Refuse an image still given as a blob reference: the executor resolves those before any call.

    Raises:
        InvalidRequestError: when ``url`` is an ``aipipe-blob:`` reference.
    """
    if url.startswith(BLOB_URL_PREFIX):
        raise InvalidRequestError(
            f"{provider}: an image is an unresolved blob reference; the executor resolves it before the call",
            provider=provider,
        )


class ProviderCall(Struct, kw_only=True, frozen=True):
    """What to ask one provider: the concrete ``model``, chat ``messages`` and generation parameters.

    ``max_tokens`` in tokens, ``temperature`` 0..2, ``top_p`` 0..1, ``stop`` up to 4 strings.
    ``continuation`` is a partial answer (from an interrupted stream) the call
    must continue rather than repeat; each adapter documents its method.
    ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``
    are the request's (DESIGN A4, OpenAI's shapes), translated by each adapter.
    Image parts of ``messages`` hold an https URL or a ``data:`` URI (a blob
    reference is resolved by the executor before the call).
    """

    model: str
    messages: list[Message]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    user: str | None = None
    continuation: str | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class StreamDelta(Struct, kw_only=True, frozen=True):
    """New answer text from a provider's stream (a content delta; never a keep-alive)."""

    text: str


class StreamEnd(Struct, kw_only=True, frozen=True):
    """The provider's stream ended completely: the model it reports, its ``usage`` (``None``: it sent none).

    ``finish_reason`` is the provider's, mapped to OpenAI's words (``stop``, ``length``, ...).
    """

    model: str
    usage: Usage | None = None
    finish_reason: str | None = None


class StreamToolDelta(Struct, kw_only=True, frozen=True):
    """A piece of a tool call from a provider's stream.

    ``index`` is the call's 0-based position among the answer's tool calls;
    the first piece of a call carries its ``id`` (sanitised,
    ``stages.rules.tool_ids``) and function ``name``; ``arguments`` is the
    next fragment of the JSON arguments string (may be empty).
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


StreamEvent = StreamDelta | StreamToolDelta | StreamEnd


class ProviderResult(Struct, kw_only=True, frozen=True):
    """A successful answer: text ``content``, the ``model`` the provider reports, token ``usage``.

    ``status_code`` is the HTTP status (200); ``request_id`` the provider's own id header, if any;
    ``usage_estimated`` is true when the provider reported no usage and the tokens were counted.
    ``tool_calls`` are the calls the model asked for (ids sanitised); with them
    ``content`` may be empty.
    """

    content: str
    model: str
    usage: Usage
    status_code: int = 200
    request_id: str | None = None
    finish_reason: str | None = None
    usage_estimated: bool = False
    tool_calls: list[ToolCall] | None = None


class ProviderAdapter(Protocol):
    """One deployment of a provider API. ``complete`` makes exactly one HTTP call.

    ``name`` is the deployment's name (the ``provider`` of every event),
    ``type`` its wire format (``openai``, ``azure_openai``, ``anthropic``,
    ``cloudflare``, ``openai_compatible``).

    Raises (from ``complete``): a subclass of ``pipeline.errors.AIProviderError``
    classified from the status code, error body and message (see each adapter),
    with ``provider`` set; connection failures and read timeouts become
    ``ProviderTimeoutError``/``ProviderServerError``. Never leaks the API key.
    """

    name: str
    type: str

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        """Send ``call`` and return the parsed answer; ``timeout_s`` bounds the whole HTTP call (s)."""
        ...

    def stream(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> AsyncIterator[StreamEvent]:
        """Send ``call`` to the provider's streaming API: ``StreamDelta``s as they arrive, then one ``StreamEnd``.

        ``timeout_s`` is the HTTP client's per-phase limit (s); the caller
        bounds the first delta and the gaps between deltas itself. A stream
        that stops without its provider's end marker raises (a cut is never a
        clean end). Raises the same errors as ``complete``.
        """
        ...
