"""The provider adapter interface the executor calls (one HTTP call per ``complete``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import httpx
from msgspec import Struct

from schemas.request import Message
from schemas.response import Usage
from stages.rules.continuation import CONTINUE_INSTRUCTION

__all__ = ["CONTINUE_INSTRUCTION", "ProviderAdapter", "ProviderCall", "ProviderResult", "StreamDelta", "StreamEnd"]


class ProviderCall(Struct, kw_only=True, frozen=True):
    """What to ask one provider: the concrete ``model``, chat ``messages`` and generation parameters.

    ``max_tokens`` in tokens, ``temperature`` 0..2, ``top_p`` 0..1, ``stop`` up to 4 strings.
    ``continuation`` is a partial answer (from an interrupted stream) the call
    must continue rather than repeat; each adapter documents its method.
    """

    model: str
    messages: list[Message]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    user: str | None = None
    continuation: str | None = None


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


StreamEvent = StreamDelta | StreamEnd


class ProviderResult(Struct, kw_only=True, frozen=True):
    """A successful answer: text ``content``, the ``model`` the provider reports, token ``usage``.

    ``status_code`` is the HTTP status (200); ``request_id`` the provider's own id header, if any;
    ``usage_estimated`` is true when the provider reported no usage and the tokens were counted.
    """

    content: str
    model: str
    usage: Usage
    status_code: int = 200
    request_id: str | None = None
    finish_reason: str | None = None
    usage_estimated: bool = False


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
