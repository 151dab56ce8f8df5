"""Cloudflare Workers AI adapter: ``POST {base_url}/accounts/{account_id}/ai/run/{model}``.

API reference: https://developers.cloudflare.com/api/resources/ai/methods/run/
(the run endpoint), https://developers.cloudflare.com/workers-ai/get-started/rest-api/
(REST usage), https://developers.cloudflare.com/workers-ai/models/ (each text
generation model's input/output schema) and
https://developers.cloudflare.com/workers-ai/platform/errors/ (error codes).
``base_url`` defaults to ``https://api.cloudflare.com/client/v4``
(``CLOUDFLARE_BASE_URL``). Auth: ``Authorization: Bearer <api token>``.

Request mapping from ``ProviderCall``: ``messages`` as is (the text generation
schema takes ``system``/``user``/``assistant`` roles), ``max_tokens``,
``temperature`` (schema range 0..5, so every pipeline value fits) and
``top_p``. ``stop`` and ``user`` are not sent: the text generation input schema
has no stop sequences or end-user field.

Response: every answer is the Cloudflare API envelope
``{"result", "success", "errors": [{"code", "message"}], "messages"}``.
``success: false`` is an error even with HTTP 200 and is classified from
``errors[].code``/``message`` (see ``stages.providers.classify``). The text is
``result.response``. ``result.usage`` ``{prompt_tokens, completion_tokens,
total_tokens}`` is used when present; when a model omits it, usage is
*estimated* with ``stages.rules.tokens`` (``estimate_messages_tokens`` of
the sent messages and ``estimate_tokens`` of the answer), so costs stay
approximately right. The model name is the one asked for (the envelope does
not echo it); the provider request id is the ``cf-ray`` header.

Streaming (https://developers.cloudflare.com/workers-ai/features/streaming/,
read 2026-12-06): ``stream: true`` answers with server-sent events whose
``data`` is ``{"response": "<text>"}``, the last one carrying ``usage`` on the
models that report it, then ``data: [DONE]``; a stream that ends without
``[DONE]`` was cut. Continuation (resume, DESIGN A9): Workers AI documents no
assistant prefill, so, as for OpenAI, the partial answer is sent as an
``assistant`` turn followed by ``CONTINUE_INSTRUCTION``; the model is asked,
not forced, to continue without repeating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import AuthenticationError
from schemas.response import Usage
from stages.providers.base import (
    CONTINUE_INSTRUCTION,
    ProviderCall,
    ProviderResult,
    StreamDelta,
    StreamEnd,
    StreamEvent,
)
from stages.providers.classify import before_sending, classify_response, malformed_response, parse_guarded, post_json
from stages.providers.sse import open_events, stream_cut
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens

PROVIDER = "cloudflare"
DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"

_Tokens = Annotated[int, Meta(ge=0)]


class _Usage(Struct):
    prompt_tokens: _Tokens | None = None
    completion_tokens: _Tokens | None = None
    total_tokens: _Tokens | None = None


class _Result(Struct):
    response: str | None = None
    usage: _Usage | None = None


class _Envelope(Struct):
    success: bool
    result: _Result | None = None


_DECODER = msgspec.json.Decoder(_Envelope)
_EVENT_DECODER = msgspec.json.Decoder(_Result)


async def read_events(events: AsyncIterator[Any], call: ProviderCall, provider: str) -> AsyncIterator[StreamEvent]:
    """Workers AI stream events as ``StreamDelta``s and a final ``StreamEnd`` (module docstring).

    Raises:
        ProviderServerError: a malformed event, or a stream cut before ``[DONE]``.
    """
    usage: Usage | None = None
    async for event in events:
        if event.data == "[DONE]":
            yield StreamEnd(model=call.model, usage=usage, finish_reason="stop")
            return
        try:
            item = _EVENT_DECODER.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise malformed_response(provider, f"stream event: {exc}") from exc
        raw = item.usage
        if raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None:
            usage = Usage(
                prompt_tokens=raw.prompt_tokens,
                completion_tokens=raw.completion_tokens,
                total_tokens=raw.total_tokens or raw.prompt_tokens + raw.completion_tokens,
            )
        if item.response:
            yield StreamDelta(text=item.response)
    raise stream_cut(provider, "no [DONE]")


def build_payload(call: ProviderCall) -> dict[str, Any]:
    """The JSON body for ``call`` (see the module docstring for the mapping)."""
    messages: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in call.messages]
    if call.continuation:
        messages.append({"role": "assistant", "content": call.continuation})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    payload: dict[str, Any] = {"messages": messages, "max_tokens": call.max_tokens}
    if call.temperature is not None:
        payload["temperature"] = call.temperature
    if call.top_p is not None:
        payload["top_p"] = call.top_p
    return payload


def parse_response(
    body: bytes,
    call: ProviderCall,
    *,
    request_id: str | None = None,
    status_code: int = 200,
    headers: httpx.Headers | None = None,
    secrets: Iterable[str | None] = (),
    provider: str = PROVIDER,
) -> ProviderResult:
    """Parse a Workers AI run envelope into a ``ProviderResult``.

    Args:
        body: raw JSON envelope.
        call: the call it answers (model name, and messages for estimated usage).
        request_id: the ``cf-ray`` header, if any.
        status_code: HTTP status the body came with (2xx).
        headers: response headers, used to read ``Retry-After`` of a ``success: false`` answer.
        secrets: credentials to scrub from error messages.
        provider: the deployment name errors carry.

    Returns:
        Text, model and usage (tokens; estimated when ``result.usage`` is absent).

    Raises:
        AIProviderError: ``success: false``, classified from ``errors[]`` codes and messages.
        ProviderServerError: malformed JSON, missing ``result.response``, or empty text.
    """
    try:
        envelope = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise malformed_response(provider, str(exc), status_code=status_code) from exc
    if not envelope.success:
        raise classify_response(provider, status_code, headers or httpx.Headers(), body, secrets=secrets)
    result = envelope.result
    if result is None or result.response is None:
        raise malformed_response(provider, "missing result.response", status_code=status_code)
    text = result.response
    if not text.strip():
        raise malformed_response(provider, "empty result.response", status_code=status_code)
    raw = result.usage
    if raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None:
        prompt, completion = raw.prompt_tokens, raw.completion_tokens
        total = raw.total_tokens if raw.total_tokens is not None else prompt + completion
    else:
        prompt = estimate_messages_tokens(call.messages)
        completion = estimate_tokens(text)
        total = prompt + completion
    estimated = not (raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None)
    return ProviderResult(
        content=text,
        model=call.model,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total),
        status_code=status_code,
        request_id=request_id,
        finish_reason=None,
        usage_estimated=estimated,
    )


class CloudflareAdapter:
    """Calls Workers AI text generation models through the Cloudflare REST API (or the emulator).

    Args:
        base_url: API root (``CLOUDFLARE_BASE_URL``), default
            ``https://api.cloudflare.com/client/v4``; a trailing ``/`` is ignored.
        api_token: ``CLOUDFLARE_API_TOKEN`` sent as a Bearer token; ``None`` sends none.
        account_id: ``CLOUDFLARE_ACCOUNT_ID``, part of the URL; ``None`` makes
            every call fail with ``AuthenticationError`` without an HTTP call.
        name: the deployment name, carried by every error.
    """

    type = "cloudflare"

    def __init__(self, base_url: str, api_token: str | None, account_id: str | None, *, name: str = PROVIDER) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.account_id = account_id
        self._api_token = api_token

    def __repr__(self) -> str:
        token = "set" if self._api_token else "unset"
        where = f"name={self.name!r}, base_url={self.base_url!r}, account_id={self.account_id!r}"
        return f"CloudflareAdapter({where}, api_token=<{token}>)"

    def url_for(self, model: str) -> str:
        """The endpoint for ``model``: ``{base_url}/accounts/{account_id}/ai/run/{model}``.

        Raises:
            AuthenticationError: when no account id is configured.
        """
        if not self.account_id:
            raise AuthenticationError(f"{self.name}: no Cloudflare account id is set", provider=self.name)
        return f"{self.base_url}/accounts/{quote(self.account_id, safe='')}/ai/run/{quote(model, safe='@/')}"

    def secret_values(self) -> tuple[str, ...]:
        """The token and account id this adapter sends, so messages bound for events can be scrubbed of them."""
        return tuple(v for v in (self._api_token, self.account_id) if v)

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_token}"} if self._api_token else {}

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        """Run ``call.model`` once on ``call.messages`` and return the parsed answer.

        Args:
            client: shared HTTP client (``httpx_aiohttp.HttpxAiohttpClient`` or ``httpx.AsyncClient``).
            call: model, messages and generation parameters.
            timeout_s: limit for the whole HTTP call (s).

        Returns:
            The answer's text, the model asked for, and usage (tokens).

        Raises:
            AuthenticationError: no account id (no HTTP call is made), or HTTP 401/403 / code 10000.
            AIProviderError: a subclass per ``stages.providers.classify`` (HTTP
                status, ``success: false`` codes, transport failure, malformed
                200), with ``provider`` the deployment name; never carries the API token.
        """
        secrets = (self._api_token,)
        url, payload = before_sending(lambda: (self.url_for(call.model), build_payload(call)))
        response = await post_json(
            client,
            self.name,
            url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=secrets,
        )
        return parse_guarded(
            self.name,
            response.status_code,
            lambda: parse_response(
                response.content,
                call,
                request_id=response.headers.get("cf-ray"),
                status_code=response.status_code,
                headers=response.headers,
                secrets=secrets,
                provider=self.name,
            ),
            secrets=secrets,
        )

    async def stream(
        self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float
    ) -> AsyncIterator[StreamEvent]:
        """Run ``call.model`` with ``stream: true``; deltas as they arrive, then the end (module docstring).

        Raises:
            AuthenticationError: no account id (no HTTP call is made).
            AIProviderError: as ``complete``; ``ProviderServerError`` for a cut or malformed stream.
        """

        def prepare() -> tuple[str, dict[str, Any]]:
            payload = build_payload(call)
            payload["stream"] = True
            return self.url_for(call.model), payload

        url, payload = before_sending(prepare)
        events = open_events(
            client,
            self.name,
            url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=(self._api_token,),
        )
        async with aclosing(events):
            async for item in read_events(events, call, self.name):
                yield item
