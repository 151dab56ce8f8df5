"""Server-sent events from a provider's streaming endpoint, shared by the adapters (DESIGN A9).

The SSE framing is parsed by ``httpx-sse`` (the maintained SSE reader for
httpx; the format is https://html.spec.whatwg.org/multipage/server-sent-events.html).
This module only opens the call, classifies a non-2xx answer like a plain
call (``classify_response``), and turns a connection lost mid-stream into a
typed error.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

import httpx
import msgspec
from httpx_sse import EventSource, ServerSentEvent

from pipeline.errors import AIProviderError, ProviderServerError
from stages.providers.classify import classify_response, classify_transport_error


def stream_cut(provider: str, what: str) -> ProviderServerError:
    """The error for a stream that stopped before its provider's end marker (``what`` says where)."""
    return ProviderServerError(f"{provider}: stream ended before the answer was complete ({what})", provider=provider)


async def open_events(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    *,
    headers: Mapping[str, str],
    payload: Mapping[str, Any],
    timeout_s: float,
    secrets: Iterable[str | None] = (),
) -> AsyncGenerator[ServerSentEvent, None]:
    """POST ``payload`` and yield the answer's server-sent events as they arrive.

    Args:
        client: the shared HTTP client.
        provider: deployment name put on errors.
        url: absolute URL of the streaming endpoint.
        headers: request headers (never copied into errors).
        payload: JSON body (with the provider's ``stream: true``).
        timeout_s: the client's per-phase timeout (s): connect, and each read.
        secrets: credentials to scrub from error messages.

    Raises:
        AIProviderError: per ``classify_response`` for a non-2xx answer, per
            ``classify_transport_error`` when the connection fails or drops
            (mid-stream: ``ProviderServerError``).
    """
    secret_list = list(secrets)
    send_headers = {"content-type": "application/json", "accept": "text/event-stream", **headers}
    body = msgspec.json.encode(payload)
    try:
        async with client.stream("POST", url, content=body, headers=send_headers, timeout=timeout_s) as response:
            if not 200 <= response.status_code < 300:
                content = await response.aread()
                raise classify_response(provider, response.status_code, response.headers, content, secrets=secret_list)
            async for event in EventSource(response).aiter_sse():
                yield event
    except AIProviderError:
        raise
    except Exception as exc:
        raise classify_transport_error(provider, exc, timeout_s=timeout_s, secrets=secret_list) from exc
