"""The emulator's Starlette app: the three provider APIs plus the ``/_emulator`` admin endpoints.

Provider endpoints (one server speaks all three):

* OpenAI: ``POST /v1/chat/completions``, ``GET /v1/models``
  (``OPENAI_BASE_URL={url}/v1``).
* Anthropic: ``POST /v1/messages``, ``GET /v1/models`` when the request carries
  ``x-api-key`` or ``anthropic-version`` (``ANTHROPIC_BASE_URL={url}``).
* Cloudflare: ``POST /client/v4/accounts/{account_id}/ai/run/{model}``
  (``CLOUDFLARE_BASE_URL={url}/client/v4``).

Deployments (DESIGN A10): any number more, each under its own prefix
``/d/{name}`` with its own calls, counts and faults (the target ``name`` in
``/_emulator/...``): ``/d/{name}/v1/chat/completions`` (the ``openai`` and
``openai_compatible`` types), ``/d/{name}/v1/messages``,
``/d/{name}/client/v4/accounts/{account_id}/ai/run/{model}``, and Azure
OpenAI's ``/d/{name}/openai/deployments/{deployment}/chat/completions?api-version=...``
(key in the ``api-key`` header; the model answered is the body's ``model``, as
Azure reports the deployed model's name, else the deployment id; a
missing ``api-version`` is Azure's 404 ``Resource not found``; a filtered
prompt is Azure's 400 ``content_filter`` body). A deployment target accepts
any model id (its models are the configuration's) and takes the dialect of
its rules: ``omit_usage``, ``error_body`` (``native``, ``vllm``, ``plain``).

Each completion call is handled in this order: log the arrival; wait at the
hold gate if a hold is active; check credentials (any non-empty key; missing
-> 401 in the provider's shape); validate the body like the real API where
cheap (OpenAI: ``model``, non-empty ``messages``, token and temperature ranges;
Anthropic: ``anthropic-version`` header, ``max_tokens`` required, first
message ``user``, non-empty text, temperature 0..1; Workers AI: ``messages`` or
``prompt``), then tools, tool choice, response format, images and the order
of tool turns (``pipeline.emulator.tools``); unknown model -> the provider's
not-found answer (404; Workers AI 400 code 5007); images for a model the
catalog marks without vision -> 400; ``max_tokens`` above the model's output limit -> 400; prompt
(and ``max_tokens``, except at Anthropic where only the prompt counts) above
the context window -> the provider's context-length error; then the fault rule
picks the response (``pipeline.emulator.spec``), after the configured latency.

Fault actions: ``hang`` waits ``hang_s`` (or until the client leaves or the
server stops; if the client is still there after ``hang_s`` it gets the normal
answer); ``reset`` aborts the TCP connection with ``SO_LINGER`` 0 (an RST, no
HTTP answer); ``malformed_json`` sends half of a valid body with status 200;
``empty_content`` a valid 200 body whose text is empty; ``invalid_json_schema``
a valid 200 body whose JSON answer (or tool call arguments) violates the
request's schema.

Admin endpoints (JSON):

* ``GET /_emulator/faults`` -> the current ``FaultProfile``;
  ``POST /_emulator/faults`` with a ``FaultProfile`` replaces it.
* ``POST /_emulator/schedule`` ``{"provider", "model"?, "steps": [FaultStep...]}``
  appends steps.
* ``GET /_emulator/calls[?provider=openai]`` -> ``{"counts": {provider: n},
  "calls": [CallRecord...]}``.
* ``POST /_emulator/reset`` -> empty log, holds released, start profile.
* ``POST /_emulator/hold`` ``{"n": 3, "provider": "openai" | null}``;
  ``POST /_emulator/release`` -> ``{"released": k}``.

Invalid admin bodies get 400 ``{"error": "<msgspec message with the path>"}``.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, NamedTuple

import msgspec
from msgspec import Meta, Struct
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.emulator import tools, wire
from pipeline.emulator.spec import ErrorKind, FaultStep, Provider, Wire, decode_profile_json
from pipeline.emulator.state import TARGET_NAME, CallRecord, EmulatorState, summarize, wait_first
from pipeline.emulator.streams import StreamCut, StreamPlan, StreamToolCall, split_pieces, stream_body
from stages.rules.catalog import known_models, model_info
from stages.rules.continuation import CONTINUE_INSTRUCTION

#: Scope key under which the server's own ``send`` is kept (to reach the transport for resets).
RAW_SEND_KEY = "aipipe.emulator.raw_send"
#: Limits assumed for models added with ``extra_models`` (tokens).
EXTRA_MODEL_CONTEXT_WINDOW = 128_000
EXTRA_MODEL_MAX_OUTPUT = 16_384
#: ``max_tokens`` Workers AI uses when the request leaves it out (tokens).
CLOUDFLARE_DEFAULT_MAX_TOKENS = 256

_ENCODER = msgspec.json.Encoder()


#: A request the emulator answers with an error (validation, auth, unknown model ...).
_Problem = wire.Problem


class _RawSendCapture:
    """Outermost ASGI middleware: remembers the server's ``send`` in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND_KEY] = send
        await self.app(scope, receive, send)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        _ENCODER.encode(data), status_code=status, headers=dict(headers or {}), media_type="application/json"
    )


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        token = value[7:].strip()
        return token or None
    return None


def _api_key(provider: Wire, headers: Mapping[str, str]) -> str | None:
    if provider == "anthropic":
        return (headers.get("x-api-key") or "").strip() or _bearer(headers)
    return _bearer(headers)


def _azure_key(headers: Mapping[str, str]) -> str | None:
    """Azure's key authentication: the ``api-key`` header (a Bearer token would be a Microsoft Entra token)."""
    return (headers.get("api-key") or "").strip() or None


#: Azure OpenAI's answer to a filtered prompt (HTTP 400; the shape of
#: https://learn.microsoft.com/azure/ai-services/openai/concepts/content-filter, read 2026-12-06).
AZURE_FILTERED_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry."
)


#: Azure OpenAI's 401 for a missing or wrong ``api-key`` (its documented error text).
AZURE_ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for "
    "an active subscription and use a correct regional API endpoint for your resource."
)


def _azure_filter_body() -> dict[str, Any]:
    filtered = {"filtered": True, "severity": "high"}
    safe = {"filtered": False, "severity": "safe"}
    return {
        "error": {
            "message": AZURE_FILTERED_MESSAGE,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"hate": safe, "self_harm": safe, "sexual": safe, "violence": filtered},
            },
        }
    }


def _dialect_body(shape: str, native: dict[str, Any], status: int) -> dict[str, Any] | str:
    """An OpenAI-wire error body re-shaped as vLLM's or Ollama's (``error_body`` of a deployment's rules)."""
    err = native.get("error")
    message = err.get("message", "") if isinstance(err, dict) else str(err)
    if shape == "vllm":
        return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
    if shape == "plain":
        return {"error": message}
    return native


def _text_of(content: Any) -> str | None:
    """Text of a message ``content`` (string, or a list of ``{"type": "text", "text"}`` blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return None


def _turns(provider: Wire, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(role, text)`` of every message, the Anthropic ``system`` / Workers AI ``prompt`` included."""
    turns: list[tuple[str, str]] = []
    if provider == "anthropic" and data.get("system") is not None:
        turns.append(("system", _text_of(data.get("system")) or ""))
    messages = data.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                turns.append((str(m.get("role", "")), _text_of(m.get("content")) or ""))
    elif provider == "cloudflare" and isinstance(data.get("prompt"), str):
        turns.append(("user", data["prompt"]))
    return turns


def _continued_partial(provider: Wire, turns: list[tuple[str, str]]) -> tuple[str, str] | None:
    """``(partial answer, its prompt)`` when the request asks to continue a partial answer, else ``None``.

    Anthropic: a last ``assistant`` turn is a prefill the answer continues
    (https://docs.anthropic.com/en/docs/build-with-claude/prompt-engineering/prefill-claudes-response).
    OpenAI and Workers AI have no prefill; aipipe's adapters send the partial
    as an ``assistant`` turn followed by ``CONTINUE_INSTRUCTION``.
    """
    if len(turns) >= 2 and provider == "anthropic" and turns[-1][0] == "assistant":
        partial, before = turns[-1][1], turns[:-1]
    elif len(turns) >= 3 and turns[-1] == ("user", CONTINUE_INSTRUCTION) and turns[-2][0] == "assistant":
        partial, before = turns[-2][1], turns[:-2]
    else:
        return None
    prompt = next((text for role, text in reversed(before) if role == "user"), None)
    return None if prompt is None or not partial else (partial, prompt)


def _int_field(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _validate_openai(data: Mapping[str, Any]) -> int | None:
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise _Problem("invalid_request", 400, "you must provide a model parameter")
    messages = data.get("messages")
    if messages is None:
        raise _Problem("invalid_request", 400, "Missing required parameter: 'messages'.")
    if not isinstance(messages, list) or not messages:
        raise _Problem(
            "invalid_request",
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        )
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _Problem(
                "invalid_request",
                400,
                f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'tool', and "
                f"'developer'. (messages[{i}].role)",
            )
        if _text_of(m.get("content")) is None and role != "assistant":
            raise _Problem("invalid_request", 400, f"Invalid type for 'messages[{i}].content'.")
    if data.get("stream_options") is not None and not data.get("stream"):
        raise _Problem(
            "invalid_request", 400, "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        )
    temperature = data.get("temperature")
    if temperature is not None and not (_number(temperature) is not None and 0 <= float(temperature) <= 2):
        raise _Problem(
            "invalid_request", 400, f"Invalid 'temperature': expected a number in [0, 2], got {temperature}."
        )
    for name in ("max_completion_tokens", "max_tokens"):
        if name in data and data[name] is not None:
            value = _int_field(data[name])
            if value is None or value < 1:
                raise _Problem(
                    "invalid_request",
                    400,
                    f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {data[name]} "
                    "instead.",
                )
            return value
    return None


def _validate_anthropic(data: Mapping[str, Any], headers: Mapping[str, str]) -> int:
    if not headers.get("anthropic-version"):
        raise _Problem("invalid_request", 400, "anthropic-version: header is required")
    for field in ("model", "max_tokens", "messages"):
        if field not in data:
            raise _Problem("invalid_request", 400, f"{field}: Field required")
    max_tokens = _int_field(data.get("max_tokens"))
    if max_tokens is None or max_tokens < 1:
        raise _Problem("invalid_request", 400, "max_tokens: Input should be greater than or equal to 1")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Problem("invalid_request", 400, "messages: at least one message is required")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise _Problem("invalid_request", 400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = m.get("content")
        if content is None or content == "":
            raise _Problem("invalid_request", 400, "messages: text content blocks must be non-empty")
        if not isinstance(content, str | list):
            raise _Problem("invalid_request", 400, f"messages.{i}.content: Input should be a valid list")
    if messages[0].get("role") != "user":
        raise _Problem("invalid_request", 400, 'messages: first message must use the "user" role')
    last_text = _text_of(messages[-1].get("content")) or ""
    if messages[-1].get("role") == "assistant" and last_text != last_text.rstrip():
        raise _Problem("invalid_request", 400, "messages: final assistant content cannot end with trailing whitespace")
    temperature = data.get("temperature")
    if temperature is not None and not (_number(temperature) is not None and 0 <= float(temperature) <= 1):
        raise _Problem("invalid_request", 400, "temperature: range: 0..1")
    return max_tokens


def _validate_cloudflare(data: Mapping[str, Any]) -> int:
    messages = data.get("messages")
    if not (isinstance(messages, list) and messages) and not isinstance(data.get("prompt"), str):
        raise _Problem(
            "invalid_request",
            400,
            "AiError: Bad input: Error: oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', "
            "required properties at '/' are 'messages'",
        )
    if "max_tokens" in data:
        value = _int_field(data["max_tokens"])
        if value is None or value < 1:
            raise _Problem("invalid_request", 400, "AiError: Bad input: max_tokens must be an integer >= 1")
        return value
    return CLOUDFLARE_DEFAULT_MAX_TOKENS


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _TruncatedResponse(Response):
    """Fallback reset: announce a body, send part of it and stop (the server then closes the socket)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "trunc', "more_body": True})


def _abort(send: Any) -> bool:
    """Abort the TCP connection under uvicorn's ``send`` with an RST; ``False`` when it cannot be reached."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.Transport):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
    return True


class _StreamResponse(Response):
    """A ``text/event-stream`` answer that can be cut mid-body and notices a client that left.

    The outcome (``ok``, ``stream_cut``, ``stream_stall``, ``stream_malformed``,
    ``client_disconnected``) and the content deltas sent are written to the call's record.
    """

    def __init__(
        self, plan: StreamPlan, headers: Mapping[str, str], record: CallRecord, finish: Callable[[str], Awaitable[None]]
    ) -> None:
        super().__init__(status_code=200, headers=dict(headers), media_type="text/event-stream")
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.plan = plan
        self.record = record
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def stalled(seconds: float) -> None:
            await wait_first(asyncio.sleep(seconds), gone.wait())

        def counted() -> None:
            self.record.chunks_sent += 1

        watcher = asyncio.ensure_future(watch())
        outcome = "ok"
        step = self.plan.step
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for piece in stream_body(self.plan, on_chunk=counted, stalled=stalled):
                if gone.is_set():
                    outcome = "client_disconnected"
                    break
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            else:
                if step.stream_malformed_after is not None and self.record.chunks_sent >= step.stream_malformed_after:
                    outcome = "stream_malformed"
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except StreamCut:
            outcome = (
                "client_disconnected"
                if gone.is_set()
                else ("stream_stall" if step.stream_stall_after is not None else "stream_cut")
            )
            _abort(scope.get(RAW_SEND_KEY))
            # let the server see the connection gone before returning, or it logs an unfinished response
            await wait_first(gone.wait(), timeout_s=1.0)
        except OSError:
            outcome = "client_disconnected"
        finally:
            watcher.cancel()
            await self.finish(outcome)


async def _reset_connection(request: Request) -> Response:
    """Drop the client's TCP connection with an RST and no HTTP answer (see module docstring)."""
    if not _abort(request.scope.get(RAW_SEND_KEY)):
        return _TruncatedResponse()
    await wait_first(_wait_disconnect(request.receive), timeout_s=1.0)
    return Response(status_code=204)  # never reaches the client: the connection is gone


class _HoldBody(Struct, forbid_unknown_fields=True):
    n: Annotated[int, Meta(ge=1)]
    provider: Provider | None = None


class _ScheduleBody(Struct, forbid_unknown_fields=True):
    provider: Provider
    steps: list[FaultStep]
    model: str | None = None


class _CallsBody(Struct):
    counts: dict[str, int]
    calls: list[CallRecord]


class _Streamed(NamedTuple):
    """What a streamed answer sends: text (or JSON text) and its cut, or tool calls."""

    text: str
    truncated: bool
    calls: list[tools.ToolCall]
    is_json: bool


class _Handlers:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    # --- provider helpers ---

    def _models(self, provider: Provider) -> list[str]:
        return sorted(set(known_models(provider)) | set(self.state.faults.extra_models(provider)))

    def _limits(self, provider: Wire, model: str) -> tuple[int, int]:
        info = model_info(provider, model)
        if info is None:
            return EXTRA_MODEL_CONTEXT_WINDOW, EXTRA_MODEL_MAX_OUTPUT
        return info.context_window, info.max_output_tokens

    def _error(
        self,
        provider: Wire,
        kind: ErrorKind,
        status: int,
        ctx: wire.ErrorContext,
        request_id: str,
        *,
        message: str | None = None,
        step: FaultStep | None = None,
        target: str | None = None,
        azure: bool = False,
        param: str | None = None,
        code: str | None = None,
    ) -> Response:
        headers = {wire.request_id_header(provider): request_id}
        if step is not None:
            if step.retry_after_s is not None:
                if step.retry_after_http_date:
                    headers["retry-after"] = email.utils.formatdate(time.time() + step.retry_after_s, usegmt=True)
                else:
                    headers["retry-after"] = f"{step.retry_after_s:g}"
            if step.retry_after_ms is not None:
                headers["retry-after-ms"] = str(step.retry_after_ms)
        body: dict[str, Any] | str = wire.error_body(
            provider, kind, ctx, request_id=request_id, message=message, param=param, code=code
        )
        if azure and kind == "content_filter":
            body = _azure_filter_body()
        elif azure and kind == "authentication":
            body = {"error": {"code": "401", "message": AZURE_ACCESS_DENIED}}
        elif target is not None and provider == "openai":
            body = _dialect_body(self.state.faults.dialect(target).error_body, body, status)  # type: ignore[arg-type]
        return _json(body, status, headers)

    @staticmethod
    def _ok_body(
        provider: Wire,
        model: str,
        text: str,
        *,
        prompt: int,
        cached: int,
        truncated: bool,
        calls: list[tools.ToolCall] | None = None,
        json_value: Any = None,
    ) -> dict[str, Any]:
        completion = sum(c.tokens() for c in calls) if calls else wire.text_tokens(text)
        described = [{"id": c.id, "name": c.name, "arguments": c.arguments, "input": c.input} for c in calls or ()]
        if provider == "openai":
            return wire.openai_completion(
                model,
                text,
                prompt=prompt,
                completion=completion,
                cached=cached,
                truncated=truncated,
                tool_calls=described,
            )
        if provider == "anthropic":
            return wire.anthropic_message(
                model,
                text,
                prompt=prompt,
                completion=completion,
                cached=cached,
                truncated=truncated,
                tool_calls=described,
            )
        return wire.cloudflare_result(
            text, prompt=prompt, completion=completion, tool_calls=described, json_value=json_value
        )

    async def _finish(self, record: CallRecord, outcome: Any, status: int | None, kind: str | None = None) -> None:
        record.finish(outcome, status, kind)
        await self.state.notify()

    # --- the completion call, shared by the three wire formats and every target ---

    async def _call(
        self,
        provider: Wire,
        request: Request,
        path_model: str | None = None,
        *,
        target: str | None = None,
        azure: bool = False,
    ) -> Response:
        """One completion call in ``provider``'s wire format to ``target`` (default: the built-in of that name)."""
        name = target or provider
        deployment = target is not None
        if deployment and not TARGET_NAME.match(name):
            return _json({"error": f"invalid deployment name {name!r} in the path"}, 400)
        request_id = wire.new_request_id(provider)
        raw = await request.body()
        try:
            decoded = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            decoded = None
        data: dict[str, Any] = decoded if isinstance(decoded, dict) else {}
        if azure and isinstance(decoded, dict) and not isinstance(data.get("model"), str):
            data["model"] = path_model  # Azure: the deployment id stands for a model the body did not name
        model = data.get("model") if azure else path_model if path_model is not None else data.get("model")
        model = model if isinstance(model, str) else ""
        turns = _turns(provider, data)
        record = await self.state.arrive(
            {
                "provider": name,
                "model": model,
                "path": request.url.path,
                **summarize(turns),
                **tools.request_features(provider, data),
                "max_tokens": _int_field(data.get("max_tokens", data.get("max_completion_tokens"))),
                "temperature": _number(data.get("temperature")),
            }
        )
        conv = tools.Conversation()
        key = _azure_key(request.headers) if azure else _api_key(provider, request.headers)
        ctx = wire.ErrorContext(model=model, api_key=key)
        fail_target = name if deployment else None
        try:
            await self.state.hold_point(record)
            if azure and not request.query_params.get("api-version"):
                raise _Problem("not_found", 404, "Resource not found")
            if not key:
                raise _Problem("authentication", 401, _missing_key_message(provider))
            if not isinstance(decoded, dict):
                raise _Problem("invalid_request", 400, _bad_json_message(provider))
            if provider == "openai":
                max_tokens = _validate_openai(data)
            elif provider == "anthropic":
                max_tokens = _validate_anthropic(data, request.headers)
            else:
                max_tokens = _validate_cloudflare(data)
            conv = tools.parse(provider, data)
            record.tool_results = len(conv.tool_results)
            record.images = len(conv.images)
            if conv.prompt_text or conv.tool_results:
                record.last_user_text = conv.prompt_text[:200]
            if not deployment and model not in self._models(name):
                raise _Problem("not_found", wire.default_status(provider, "not_found"))
            tools.check_model(provider, model, conv, model_info(provider, model))
            window, max_out = self._limits(provider, model)
            max_tokens = max_out if max_tokens is None else max_tokens
            prompt = wire.prompt_tokens([text for _, text in turns]) + conv.extra_tokens
            ctx = wire.ErrorContext(
                model=model,
                prompt_tokens=prompt,
                max_tokens=max_tokens,
                context_window=window,
                max_output_tokens=max_out,
                api_key=key,
            )
            _check_limits(provider, model, prompt, max_tokens, window, max_out)
        except _Problem as problem:
            await self._finish(record, "error", problem.status, problem.kind)
            return self._error(
                provider,
                problem.kind,
                problem.status,
                ctx,
                request_id,
                message=problem.message,
                target=fail_target,
                azure=azure,
                param=problem.param,
                code=problem.code,
            )

        step = self.state.faults.next_step(name, model)
        delay_s = self.state.faults.latency_s(name, model, step)
        if delay_s > 0 and await wait_first(asyncio.sleep(delay_s), self.state.stopping.wait()) != 0:
            await self._finish(record, "reset", None)
            return await _reset_connection(request)

        action = step.resolved_action()
        if action == "hang":
            first = await wait_first(
                asyncio.sleep(step.hang_s), _wait_disconnect(request.receive), self.state.stopping.wait()
            )
            if first != 0:
                await self._finish(record, "hang", None)
                return await _reset_connection(request)
            action = "ok"  # the client outlasted the hang: it gets its answer, late
        if action == "reset":
            await self._finish(record, "reset", None)
            return await _reset_connection(request)
        if action == "error":
            kind = step.kind or wire.default_kind(step.status or 500)
            status = step.status or wire.default_status(provider, kind)
            await self._finish(record, "error", status, kind)
            return self._error(
                provider,
                kind,
                status,
                ctx,
                request_id,
                message=step.message,
                step=step,
                target=fail_target,
                azure=azure,
            )

        words = self.state.faults.reply_words() or wire.DEFAULT_REPLY_WORDS
        last_user = next((text for role, text in reversed(turns) if role == "user"), "")
        if conv.tool_results and provider == "anthropic":
            last_user = conv.prompt_text  # the last user turn holds tool results, not the question
        answer = tools.plan_answer(provider, conv, words=words, invalid=action == "invalid_json_schema")
        calls: list[tools.ToolCall] = []
        json_value: Any = None
        if action == "empty_content":
            text, truncated = "", False
        elif answer.tool_calls:
            text, truncated, calls = "", False, answer.tool_calls
        elif answer.is_json:
            full = tools.compact_json(answer.json_value)
            text, truncated = wire.cut_to_tokens(full, max_tokens)
            partial = _continued_partial(provider, turns)
            if partial is not None and full.startswith(partial[0]) and len(full) > len(partial[0]):
                record.continuation = True
                text, truncated = wire.cut_to_tokens(full[len(partial[0]) :], max_tokens)
            json_value = None if truncated or record.continuation else answer.json_value
        else:
            prefix = answer.prefix
            text, truncated = wire.reply_text(provider, model, last_user, max_tokens, words=words, prefix=prefix)
            partial = _continued_partial(provider, turns)
            if partial is not None:
                rest = wire.continuation_of(provider, model, partial[1], partial[0], words=words, prefix=prefix)
                if rest is not None:
                    record.continuation = True
                    text, truncated = wire.cut_to_tokens(rest, max_tokens)
        record.tool_call = bool(calls)
        record.tool_names = [c.name for c in calls]
        cached = min(step.cached_tokens, prompt)
        body = self._ok_body(
            provider,
            model,
            text,
            prompt=prompt,
            cached=cached,
            truncated=truncated,
            calls=calls,
            json_value=json_value,
        )
        if deployment and self.state.faults.dialect(name).omit_usage:
            body.pop("usage", None)
        headers = wire.success_headers(
            provider, request_id, calls_so_far=self.state.counts().get(name, 0), tokens=prompt + max_tokens
        )
        if data.get("stream") is True:
            streamed = _Streamed(text, truncated, calls, json_value is not None or answer.is_json)
            return self._stream(provider, record, data, model, streamed, prompt, cached, step, headers, target)
        encoded = _ENCODER.encode(body)
        if action == "malformed_json":
            encoded = encoded[: max(1, len(encoded) // 2)]
        outcome = action if action in ("malformed_json", "empty_content", "invalid_json_schema") else "ok"
        await self._finish(record, outcome, 200)
        return Response(encoded, status_code=200, headers=headers, media_type="application/json")

    def _stream(
        self,
        provider: Wire,
        record: CallRecord,
        data: Mapping[str, Any],
        model: str,
        answer: _Streamed,
        prompt: int,
        cached: int,
        step: FaultStep,
        headers: dict[str, str],
        target: str | None,
    ) -> Response:
        """The answer as server-sent events in ``provider``'s format (``pipeline.emulator.streams``)."""
        options = data.get("stream_options")
        record.stream = True
        calls = [StreamToolCall(id=c.id, name=c.name, arguments=c.arguments, input=c.input) for c in answer.calls]
        plan = StreamPlan(
            wire=provider,
            model=model,
            text=answer.text,
            prompt_tokens=prompt,
            completion_tokens=sum(c.tokens() for c in answer.calls) if calls else wire.text_tokens(answer.text),
            cached_tokens=cached,
            truncated=answer.truncated,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            omit_usage=target is not None and self.state.faults.dialect(target).omit_usage,
            step=step,
            tool_calls=calls,
            pieces=split_pieces(answer.text) if answer.is_json else None,
        )
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        headers["cache-control"] = "no-cache"

        async def finish(outcome: str) -> None:
            if outcome == "ok" and step.action == "invalid_json_schema":
                outcome = "invalid_json_schema"
            await self._finish(record, outcome, 200)

        return _StreamResponse(plan, headers, record, finish)

    # --- provider endpoints ---

    async def openai_chat(self, request: Request) -> Response:
        return await self._call("openai", request)

    async def anthropic_messages(self, request: Request) -> Response:
        return await self._call("anthropic", request)

    async def cloudflare_run(self, request: Request) -> Response:
        return await self._call("cloudflare", request, path_model=str(request.path_params["model"]))

    # --- deployment endpoints (``/d/{name}/...``) ---

    async def deployment_chat(self, request: Request) -> Response:
        return await self._call("openai", request, target=str(request.path_params["name"]))

    async def deployment_messages(self, request: Request) -> Response:
        return await self._call("anthropic", request, target=str(request.path_params["name"]))

    async def deployment_run(self, request: Request) -> Response:
        model = str(request.path_params["model"])
        return await self._call("cloudflare", request, path_model=model, target=str(request.path_params["name"]))

    async def azure_chat(self, request: Request) -> Response:
        deployment = str(request.path_params["deployment"])
        name = str(request.path_params["name"])
        return await self._call("openai", request, path_model=deployment, target=name, azure=True)

    async def list_models(self, request: Request) -> Response:
        anthropic = "x-api-key" in request.headers or "anthropic-version" in request.headers
        provider: Wire = "anthropic" if anthropic else "openai"
        request_id = wire.new_request_id(provider)
        if not _api_key(provider, request.headers):
            ctx = wire.ErrorContext(model="")
            return self._error(provider, "authentication", 401, ctx, request_id, message=_missing_key_message(provider))
        models = self._models(provider)
        body = wire.anthropic_models(models) if anthropic else wire.openai_models(models)
        return _json(body, 200, {wire.request_id_header(provider): request_id})

    # --- admin endpoints ---

    async def get_faults(self, request: Request) -> Response:
        return _json(self.state.faults.profile())

    async def post_faults(self, request: Request) -> Response:
        try:
            profile = decode_profile_json(await request.body() or b"{}")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json({"error": str(exc)}, 400)
        self.state.faults.load(profile)
        return _json({"ok": True})

    async def post_schedule(self, request: Request) -> Response:
        def apply(body: _ScheduleBody) -> None:
            self.state.faults.schedule(body.provider, *body.steps, model=body.model)

        return await _admin(request, _ScheduleBody, apply)

    async def get_calls(self, request: Request) -> Response:
        provider = request.query_params.get("provider")
        if provider is not None and not TARGET_NAME.match(provider):
            return _json({"error": f"invalid target name {provider!r}: a provider or a deployment"}, 400)
        calls = self.state.calls(provider)
        return _json(_CallsBody(counts=self.state.counts(), calls=calls))

    async def post_reset(self, request: Request) -> Response:
        self.state.reset()
        return _json({"ok": True})

    async def post_hold(self, request: Request) -> Response:
        return await _admin(request, _HoldBody, lambda b: self.state.hold(b.n, b.provider))

    async def post_release(self, request: Request) -> Response:
        return _json({"ok": True, "released": self.state.release()})


async def _admin(request: Request, body_type: type[Any], apply: Callable[[Any], Any]) -> Response:
    try:
        body = msgspec.json.decode(await request.body() or b"{}", type=body_type)
        result = apply(body)
        if isinstance(result, Awaitable):
            await result
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"ok": True})


def _missing_key_message(provider: Wire) -> str:
    if provider == "openai":
        return (
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from "
            "https://platform.openai.com/account/api-keys."
        )
    if provider == "anthropic":
        return "x-api-key header is required"
    return "Authentication error"


def _bad_json_message(provider: Wire) -> str:
    if provider == "openai":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
    if provider == "anthropic":
        return "There was an issue with the request body: it is not valid JSON"
    return "AiError: Bad input: the request body is not valid JSON"


def _check_limits(provider: Wire, model: str, prompt: int, max_tokens: int, window: int, max_out: int) -> None:
    """Refuse ``max_tokens`` above the output limit and prompts over the context window, as each API does."""
    if provider == "openai":
        if max_tokens > max_out:
            raise _Problem(
                "invalid_request",
                400,
                f"max_tokens is too large: {max_tokens}. This model supports at most {max_out} completion tokens, "
                f"whereas you provided {max_tokens}.",
            )
        if prompt + max_tokens > window:
            raise _Problem("context_length", 400)
    elif provider == "anthropic":
        if max_tokens > max_out:
            raise _Problem(
                "invalid_request",
                400,
                f"max_tokens: {max_tokens} > {max_out}, which is the maximum allowed number of output tokens for "
                f"{model}",
            )
        if prompt > window:
            raise _Problem("context_length", 400)
    elif prompt + max_tokens > window:
        raise _Problem("context_length", 400)


def create_app(state: EmulatorState) -> ASGIApp:
    """The emulator as an ASGI app serving ``state`` (routes in the module docstring)."""
    h = _Handlers(state)
    routes = [
        Route("/v1/chat/completions", h.openai_chat, methods=["POST"]),
        Route("/v1/models", h.list_models, methods=["GET"]),
        Route("/v1/messages", h.anthropic_messages, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}/ai/run/{model:path}", h.cloudflare_run, methods=["POST"]),
        Route("/d/{name}/v1/chat/completions", h.deployment_chat, methods=["POST"]),
        Route("/d/{name}/v1/messages", h.deployment_messages, methods=["POST"]),
        Route("/d/{name}/client/v4/accounts/{account_id}/ai/run/{model:path}", h.deployment_run, methods=["POST"]),
        Route("/d/{name}/openai/deployments/{deployment}/chat/completions", h.azure_chat, methods=["POST"]),
        Route("/_emulator/faults", h.get_faults, methods=["GET"]),
        Route("/_emulator/faults", h.post_faults, methods=["POST"]),
        Route("/_emulator/schedule", h.post_schedule, methods=["POST"]),
        Route("/_emulator/calls", h.get_calls, methods=["GET"]),
        Route("/_emulator/reset", h.post_reset, methods=["POST"]),
        Route("/_emulator/hold", h.post_hold, methods=["POST"]),
        Route("/_emulator/release", h.post_release, methods=["POST"]),
    ]
    return _RawSendCapture(Starlette(routes=routes))
