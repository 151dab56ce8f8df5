"""The ASGI app of ``aipipe serve``: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``.

Each chat completion becomes one ``AIRequest`` (``openai_format``), is
answered through ``ServeState.ask`` (the manager's one shared
``PipelineClient``: published to ``ai.requests``, awaited on
``ai.responses``) and returned as a ``chat.completion`` body with the
``x-aipipe-*`` headers, or as an OpenAI error body. Callers authenticate with
the client keys of ``keys``.

``stream: true`` (DESIGN A9) goes through ``ServeState.stream``: a failure
before the first chunk is an ordinary HTTP error; from the first chunk on the
answer is ``text/event-stream`` of ``chat.completion.chunk`` events (each
naming the model that produced it), the usage chunk when
``stream_options.include_usage`` asks for it, and ``data: [DONE]``; an
interruption after text ends the stream with an in-band ``{"error": ...}``
event and no ``[DONE]``. A client that disconnects cancels the request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from pipeline.client.stream_handle import StreamHandle
from pipeline.errors import AIProviderError, ProviderTimeoutError
from pipeline.runtime.config import PipelineConfig
from pipeline.serve.keys import ApiKeys
from pipeline.serve.openai_format import (
    OpenAIHTTPError,
    chunk_body,
    completion_body,
    finish_reason,
    include_usage,
    model_list,
    new_completion_id,
    to_ai_request,
    usage_chunk_body,
)
from schemas.request import MAX_REQUEST_BYTES, AIRequest
from schemas.response import AIResponse
from schemas.stream import StreamChunk

log = logging.getLogger("aipipe.serve")

#: Largest request body accepted (bytes): the pipeline's request limit (``schemas.request.MAX_REQUEST_BYTES``)
#: for the request without its images, plus room for images as base64 ``data:`` URIs (64 MiB: three images
#: at the 20 MiB default of ``[images] max_bytes``); larger bodies get 413 before anything is published.
IMAGE_BODY_BYTES = 64 * 1024 * 1024
MAX_BODY_BYTES = MAX_REQUEST_BYTES + IMAGE_BODY_BYTES
#: Response headers the endpoint adds.
HEADER_REQUEST_ID = "x-aipipe-request-id"
HEADER_PROVIDER = "x-aipipe-provider"
HEADER_COST = "x-aipipe-cost-usd"
HEADER_CACHED = "x-aipipe-cached"

_ENCODER = msgspec.json.Encoder()


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        _ENCODER.encode(data), status_code=status, headers=dict(headers or {}), media_type="application/json"
    )


def _error_response(error: OpenAIHTTPError, headers: Mapping[str, str] | None = None) -> Response:
    return _json(error.body(), error.status, headers)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def _pipeline_headers(response: AIResponse) -> dict[str, str]:
    headers = {HEADER_REQUEST_ID: response.id, HEADER_COST: f"{response.cost_usd:.10f}"}
    headers[HEADER_CACHED] = "true" if response.cached else "false"
    provider = response.provider or (response.error.provider if response.error else None)
    if provider:
        headers[HEADER_PROVIDER] = provider
    return headers


def _too_large() -> OpenAIHTTPError:
    return OpenAIHTTPError(
        413,
        f"request body over {MAX_BODY_BYTES} bytes (the largest request aipipe takes)",
        type_="invalid_request_error",
        code="request_too_large",
    )


_DATA_URI = re.compile(rb'"data:image/[^"]*"')


def _data_uri_bytes(raw: bytes) -> int:
    """Bytes of the body that are image ``data:`` URIs (not counted toward the request limit, DESIGN A4)."""
    return sum(len(m) for m in _DATA_URI.findall(raw))


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes ``MAX_BODY_BYTES`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class ServeState:
    """What the endpoint needs: how to ask the pipeline, which models to list, the client keys."""

    ask: Callable[[AIRequest], Awaitable[AIResponse]]
    config: PipelineConfig
    api_keys: ApiKeys | None
    stream: Callable[[AIRequest], Awaitable[StreamHandle]] | None = None
    dashboard: ASGIApp | None = None


def _sse(data: Any) -> bytes:
    return b"data: " + _ENCODER.encode(data) + b"\n\n"


async def _first_chunk(handle: StreamHandle) -> StreamChunk | None:
    """The stream's first chunk, or ``None`` when it ended without text; errors before it propagate."""
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None


async def _events(
    handle: StreamHandle, first: StreamChunk, request: AIRequest, *, usage: bool, created: int
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer whose first chunk has come (module docstring)."""
    done = False
    model = first.model or request.model
    try:
        chunk: StreamChunk | None = first
        role_sent = False
        while chunk is not None:
            model = chunk.model or model
            delta: dict[str, Any] = {"content": chunk.delta} if chunk.delta or not chunk.tool_call_deltas else {}
            if chunk.tool_call_deltas:
                delta["tool_calls"] = msgspec.to_builtins(chunk.tool_call_deltas)
            if not role_sent:
                delta = {"role": "assistant", "content": chunk.delta or None, **delta}
                role_sent = True
            yield _sse(chunk_body(request.id, created=created, model=model, delta=delta, with_usage_field=usage))
            try:
                chunk = await handle.__anext__()
            except StopAsyncIteration:
                chunk = None
        done = True
        response = handle.response
        assert response is not None
        model = response.model or model
        reason = finish_reason(response, request)
        yield _sse(
            chunk_body(request.id, created=created, model=model, delta={}, finish_reason=reason, with_usage_field=usage)
        )
        if usage:
            yield _sse(usage_chunk_body(response, created=created, model=model))
        yield b"data: [DONE]\n\n"
        log.info("request %s: ok (streamed %d chunks) provider=%s", request.id, handle.chunks, response.provider)
    except AIProviderError as exc:
        done = True
        error = OpenAIHTTPError.for_type(exc.error_type, str(exc))
        log.info("request %s: stream ended with %s: %s", request.id, exc.error_type, exc)
        yield _sse(error.body())
    finally:
        if not done:  # the client went away (or the server is stopping): cancel the request
            with anyio.CancelScope(shield=True):
                await handle.aclose()


def create_app(state: ServeState) -> Starlette:
    """The Starlette app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``/dashboard``.

    Errors (also 404/405 for unknown routes and methods) are OpenAI error bodies.
    """

    def authenticate(request: Request) -> str | None:
        """The caller's user from its key (``None`` on an open endpoint).

        Raises:
            OpenAIHTTPError: 401 for a missing or unknown key.
        """
        if state.api_keys is None:
            return None
        token = _bearer(request)
        if token is None:
            raise OpenAIHTTPError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                type_="authentication_error",
                code="invalid_api_key",
            )
        user = state.api_keys.user_for(token)
        if user is None:
            raise OpenAIHTTPError(
                401, "Incorrect API key provided.", type_="authentication_error", code="invalid_api_key"
            )
        return user

    async def chat_completions(request: Request) -> Response:
        request_id = new_completion_id()
        id_header = {HEADER_REQUEST_ID: request_id}
        try:
            return await completion(request, request_id, id_header)
        except Exception:  # the client gets the request id, the log the traceback
            log.exception("request %s: internal error", request_id)
            error = OpenAIHTTPError(
                500,
                f"internal error while handling request {request_id}; the server log has the details",
                type_="server_error",
                code="internal_error",
            )
            return _error_response(error, id_header)

    async def completion(request: Request, request_id: str, id_header: Mapping[str, str]) -> Response:
        try:
            user = authenticate(request)
            raw = await _read_body(request)
            if len(raw) > MAX_REQUEST_BYTES and len(raw) - _data_uri_bytes(raw) > MAX_REQUEST_BYTES:
                raise _too_large()
            try:
                body = msgspec.json.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                raise OpenAIHTTPError.invalid("We could not parse the JSON body of your request.") from None
            ai_request = to_ai_request(body, request_id=request_id, key_user=user)
            images = sum(len(i.url) for m in ai_request.messages or () for i in m.images() if i.url.startswith("data:"))
            size = len(_ENCODER.encode(ai_request)) - images  # the request without its images (DESIGN A4)
            if size > MAX_REQUEST_BYTES:
                raise OpenAIHTTPError(
                    413,
                    f"the request is {size} bytes; the largest aipipe takes is {MAX_REQUEST_BYTES} bytes",
                    type_="invalid_request_error",
                    code="request_too_large",
                )
        except OpenAIHTTPError as exc:
            return _error_response(exc, id_header)
        if ai_request.stream and state.stream is not None:
            return await streamed(ai_request, include_usage(body), id_header)
        try:
            response = await state.ask(ai_request)
        except ProviderTimeoutError as exc:
            log.warning("request %s: %s", request_id, exc)
            return _error_response(OpenAIHTTPError.for_type("timeout", str(exc)), id_header)
        except AIProviderError as exc:  # e.g. service_unavailable: the broker does not take requests
            log.warning("request %s: %s: %s", request_id, exc.error_type, exc)
            return _error_response(OpenAIHTTPError.for_type(exc.error_type, str(exc)), id_header)
        headers = _pipeline_headers(response)
        if response.status == "error" or response.error is not None:
            err = response.error
            error_type = err.type if err else "server_error"
            message = err.message if err else "the pipeline answered with an error"
            log.info("request %s: %s: %s", request_id, error_type, message)
            return _error_response(OpenAIHTTPError.for_type(error_type, message), headers)
        log.info(
            "request %s: ok provider=%s cost_usd=%.10f cached=%s",
            request_id,
            response.provider,
            response.cost_usd,
            response.cached,
        )
        return _json(completion_body(response, ai_request, created=int(time.time())), 200, headers)

    async def streamed(ai_request: AIRequest, usage: bool, id_header: Mapping[str, str]) -> Response:
        assert state.stream is not None
        try:
            handle = await state.stream(ai_request)
            first = await _first_chunk(handle)
        except ProviderTimeoutError as exc:
            log.warning("request %s: %s", ai_request.id, exc)
            return _error_response(OpenAIHTTPError.for_type("timeout", str(exc)), id_header)
        except AIProviderError as exc:  # failed before any text: an ordinary HTTP error
            log.info("request %s: %s: %s", ai_request.id, exc.error_type, exc)
            return _error_response(OpenAIHTTPError.for_type(exc.error_type, str(exc)), id_header)
        if first is None:
            response = handle.response
            message = "the stream ended without any text"
            return _error_response(
                OpenAIHTTPError.for_type("server_error", message),
                _pipeline_headers(response) if response else id_header,
            )
        # the provider, cost and cache flag are known only when the stream ends: not headers here
        headers = {**id_header, "cache-control": "no-cache", "x-accel-buffering": "no"}
        events = _events(handle, first, ai_request, usage=usage, created=int(time.time()))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def list_models(request: Request) -> Response:
        try:
            authenticate(request)
        except OpenAIHTTPError as exc:
            return _error_response(exc)
        return _json({"object": "list", "data": model_list(state.config)})

    async def get_model(request: Request) -> Response:
        try:
            authenticate(request)
        except OpenAIHTTPError as exc:
            return _error_response(exc)
        wanted = request.path_params["model"]
        for entry in model_list(state.config):
            if entry["id"] == wanted:
                return _json(entry)
        return _error_response(
            OpenAIHTTPError.for_type("model_not_found", f"The model `{wanted}` is not served by this aipipe.")
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        type_ = "invalid_request_error" if status < 500 else "server_error"
        message = f"{detail}: {request.method} {request.url.path}"
        return _error_response(OpenAIHTTPError(status, message, type_=type_, code=None))

    routes: list[BaseRoute] = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
    if state.dashboard is not None:  # the operator dashboard (DESIGN A12), its own auth and session
        routes.append(Mount("/dashboard", app=state.dashboard))
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: http_error},
    )
