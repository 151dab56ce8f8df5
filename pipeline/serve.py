"""OpenAI-compatible HTTP endpoint (``aipipe serve``): ``POST /v1/chat/completions``, ``GET /v1/models``.

Each chat completion becomes one ``AIRequest`` published to ``ai.requests``;
the answer is awaited on ``ai.responses`` through the manager's one shared
``PipelineClient`` and returned as an OpenAI ``chat.completion`` body
(https://platform.openai.com/docs/api-reference/chat/object), or as an OpenAI
error body ``{"error": {"message", "type", "param", "code"}}`` with the status
code of ``ERROR_STATUS``. So the official ``openai`` SDK works unchanged with
``base_url="http://HOST:PORT/v1"``.

The server is a client of the pipeline: with a broker (``AIPIPE_KAFKA_BOOTSTRAP``
or a live runtime file) it publishes to the stages running there; without one
its ``AIProviderManager`` runs every stage in-process on the in-process bus.

Client keys: ``AIPIPE_API_KEYS`` names a TOML file mapping client keys to
users (``[keys]`` table, ``"sk-..." = "alice"``). With it, every call needs a
known ``Authorization: Bearer`` key, and that key's user is the request's
``user`` (for budgets and analytics; the body's ``user`` cannot override it and
is kept as ``metadata.openai_user``). Without it the endpoint is open and logs a
warning; in ``production`` it refuses to start.

Request parameters: ``model``, ``messages`` (text content; ``developer`` is
read as ``system``), ``max_tokens``/``max_completion_tokens``, ``temperature``,
``top_p``, ``stop``, ``user``, ``metadata`` map onto the ``AIRequest``; the
aipipe extensions ``providers``, ``cache`` and ``timeout_ms`` (send them with
the SDK's ``extra_body``) pass through. Parameters aipipe cannot honour are
accepted only at their no-op value (``n: 1``, ``stream: false``,
``presence_penalty: 0``, ...), hints that do not change the answer (``seed``,
``store``, ``service_tier``, ...) are ignored, and anything else is a 400
naming the parameter, so a request never silently means something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.asgi import InLoopServer, bind_tcp
from pipeline.broker import read_runtime_broker_async
from pipeline.config import PipelineConfig
from pipeline.errors import ProviderTimeoutError
from pipeline.runtime import BusKind
from pipeline.settings import Settings
from schemas.request import AIRequest
from schemas.response import AIResponse

if TYPE_CHECKING:
    from pipeline.manager import AIProviderManager

log = logging.getLogger("aipipe.serve")

#: Defaults of ``aipipe serve``.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Largest request body accepted (bytes); larger ones get 413.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: How long shutdown waits for in-flight calls before cancelling them (s).
GRACEFUL_SHUTDOWN_S = 10
#: How long ``OpenAIServer.start`` waits for the socket to listen (s).
START_TIMEOUT_S = 10.0
#: Response headers the endpoint adds.
HEADER_REQUEST_ID = "x-aipipe-request-id"
HEADER_PROVIDER = "x-aipipe-provider"
HEADER_COST = "x-aipipe-cost-usd"
HEADER_CACHED = "x-aipipe-cached"

_ENCODER = msgspec.json.Encoder()


class ServeConfigError(ValueError):
    """``aipipe serve`` cannot start: bad ``AIPIPE_API_KEYS`` file, production without keys, port taken."""


# --- client keys -----------------------------------------------------------------------------


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """Client keys and the user each one stands for; only SHA-256 digests are kept in memory.

    Args:
        keys: ``{client key: user}``.

    Raises:
        ServeConfigError: when there is no key, or a key or user is empty.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        if not keys:
            raise ServeConfigError("the client key file defines no key")
        self._users: dict[bytes, str] = {}
        for key, user in keys.items():
            if not isinstance(key, str) or not key.strip():
                raise ServeConfigError("a client key is empty")
            if not isinstance(user, str) or not user.strip() or len(user) > 256:
                raise ServeConfigError("every client key needs a user name of 1 to 256 characters")
            self._users[_digest(key)] = user

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """Read the TOML key file named by ``AIPIPE_API_KEYS``.

        Format: a ``[keys]`` table, each entry ``"<client key>" = "<user>"``.

        Raises:
            ServeConfigError: when the file is missing, not TOML, or has no valid ``[keys]`` table
                (the message never quotes a key).
        """
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path} is not valid TOML ({exc})") from None
        keys = data.get("keys")
        if not isinstance(keys, dict):
            raise ServeConfigError(f'AIPIPE_API_KEYS: {path} needs a [keys] table of "<client key>" = "<user>"')
        try:
            return cls(keys)
        except ServeConfigError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path}: {exc}") from None

    def user_for(self, key: str) -> str | None:
        """The user of client key ``key``, or ``None`` when the key is unknown."""
        digest = _digest(key)
        for known, user in self._users.items():
            if hmac.compare_digest(known, digest):
                return user
        return None


def api_keys_for(settings: Settings) -> ApiKeys | None:
    """The client keys of ``AIPIPE_API_KEYS``; ``None`` (an open endpoint) when unset in development.

    Raises:
        ServeConfigError: when the file is invalid, or in ``production`` without ``AIPIPE_API_KEYS``.
    """
    if settings.api_keys_path is not None:
        return ApiKeys.from_file(settings.api_keys_path)
    if settings.env_name == "production":
        raise ServeConfigError(
            "refusing to serve an open endpoint in production: set AIPIPE_API_KEYS to a TOML file "
            'with a [keys] table ("<client key>" = "<user>")'
        )
    return None


# --- errors ----------------------------------------------------------------------------------

#: aipipe ``error.type`` -> (HTTP status, OpenAI error ``type``). The body's ``code`` is the aipipe type.
ERROR_STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "authentication": (401, "authentication_error"),
    "budget_exceeded": (402, "budget_exceeded_error"),
    "model_not_found": (404, "invalid_request_error"),
    "rate_limit": (429, "rate_limit_error"),
    "content_filter": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "timeout": (504, "timeout_error"),
    "server_error": (502, "server_error"),
    "all_providers_failed": (503, "server_error"),
    "service_unavailable": (503, "server_error"),
}
_PARAM_OF: dict[str, str] = {"model_not_found": "model", "context_length_exceeded": "messages"}


class OpenAIHTTPError(Exception):
    """An answer in OpenAI's error shape: status, ``message``, ``type``, ``param``, ``code``."""

    def __init__(self, status: int, message: str, *, type_: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    @classmethod
    def for_type(cls, error_type: str, message: str, *, param: str | None = None) -> OpenAIHTTPError:
        """The error for an aipipe ``error.type`` (``ERROR_STATUS``; unknown types: 500 ``server_error``)."""
        status, type_ = ERROR_STATUS.get(error_type, (500, "server_error"))
        return cls(status, message, type_=type_, code=error_type, param=param or _PARAM_OF.get(error_type))

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> OpenAIHTTPError:
        """A 400 ``invalid_request_error`` about ``param``."""
        return cls.for_type("invalid_request", message, param=param)

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request mapping (pure) ------------------------------------------------------------------

#: OpenAI parameters aipipe cannot honour, accepted only at these no-op values (``None`` is always accepted).
NOOP_PARAMS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "stream": (False,),
    "stream_options": (),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
}
#: OpenAI parameters that do not change the answer's content or shape; accepted and ignored.
IGNORED_PARAMS: frozenset[str] = frozenset(
    {"seed", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
)
#: Parameters mapped onto the ``AIRequest`` (the aipipe extensions last).
MAPPED_PARAMS: frozenset[str] = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "user",
        "metadata",
        "providers",
        "cache",
        "timeout_ms",
    }
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_KEYS_IGNORED = frozenset({"name", "refusal"})


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OpenAIHTTPError.invalid(
                    f"only text content is supported; {where}.content[{i}] is {kind!r}", f"{where}.content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIHTTPError.invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise OpenAIHTTPError.invalid("'messages' must be a non-empty array", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIHTTPError.invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            raise OpenAIHTTPError.invalid(
                f"{where}.role {role!r} is not supported; use system, developer, user or assistant", f"{where}.role"
            )
        for key, value in message.items():
            if key in ("role", "content") or key in _MESSAGE_KEYS_IGNORED or value in (None, []):
                continue
            raise OpenAIHTTPError.invalid(f"{where}.{key} is not supported (text chat only)", f"{where}.{key}")
        out.append({"role": _ROLES[role], "content": _text(message.get("content"), where)})
    return out


def to_ai_request(body: Any, *, request_id: str, key_user: str | None = None) -> AIRequest:
    """Map an OpenAI chat-completions body onto an ``AIRequest`` with id ``request_id``.

    Args:
        body: the decoded JSON body.
        request_id: the pipeline request id (also the completion's ``id``).
        key_user: the user of the caller's client key; when set it is the request's ``user``
            and a body ``user`` is kept as ``metadata["openai_user"]``.

    Raises:
        OpenAIHTTPError: 400 for ``stream: true``, an unknown or unsupported parameter, or a value the
            ``AIRequest`` rejects (the message names the field).
    """
    if not isinstance(body, dict):
        raise OpenAIHTTPError.invalid("the request body must be a JSON object")
    if body.get("stream") is True:
        raise OpenAIHTTPError.invalid(
            "stream=true is not supported yet: aipipe answers with whole completions; send stream=false", "stream"
        )
    for name, value in body.items():
        if name in MAPPED_PARAMS or name in IGNORED_PARAMS:
            continue
        if name in NOOP_PARAMS:
            if value is None or value in NOOP_PARAMS[name]:
                continue
            raise OpenAIHTTPError.invalid(f"parameter {name!r} is not supported by aipipe (value {value!r})", name)
        raise OpenAIHTTPError.invalid(f"Unrecognized request argument supplied: {name}", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise OpenAIHTTPError.invalid("you must provide a model parameter", "model")
    data: dict[str, Any] = {"id": request_id, "model": body["model"], "messages": _messages(body.get("messages"))}
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise OpenAIHTTPError.invalid(
            "max_tokens and max_completion_tokens differ; send one of them", "max_completion_tokens"
        )
    if max_completion is not None or max_tokens is not None:
        data["max_tokens"] = max_completion if max_completion is not None else max_tokens
    for name in ("temperature", "top_p", "stop", "metadata", "providers", "cache", "timeout_ms"):
        if body.get(name) is not None:
            data[name] = body[name]
    body_user = body.get("user")
    if key_user is not None:
        data["user"] = key_user
        metadata = data.get("metadata", {})
        if body_user is not None and body_user != key_user and isinstance(metadata, dict):
            data["metadata"] = {**metadata, "openai_user": body_user}
    elif body_user is not None:
        data["user"] = body_user
    try:
        return msgspec.convert(data, AIRequest)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = None
        if "`$." in message:
            param = message.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0]
        raise OpenAIHTTPError.invalid(f"invalid request: {message}", param) from None


def finish_reason(response: AIResponse, request: AIRequest) -> str:
    """``length`` when the answer used the whole ``max_tokens`` budget, else ``stop``.

    ``AIResponse`` carries no provider finish reason, so this is inferred from the token counts.
    """
    return "length" if response.usage.completion_tokens >= request.max_tokens else "stop"


def completion_body(response: AIResponse, request: AIRequest, *, created: int) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object for an ``ok`` response.

    Args:
        response: the pipeline's answer.
        request: the request it answers (for ``max_tokens`` and the requested model).
        created: Unix time (s) of the answer.

    Returns:
        ``{id, object: "chat.completion", created, model, choices: [{index, message, logprobs,
        finish_reason}], usage: {prompt_tokens, completion_tokens, total_tokens,
        prompt_tokens_details: {cached_tokens}}, system_fingerprint}``; ``model`` is the provider's
        model that answered.
    """
    usage = response.usage
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": created,
        "model": response.model or request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response.content or "", "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(response, request),
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        },
        "system_fingerprint": None,
    }


def model_list(config: PipelineConfig) -> list[dict[str, Any]]:
    """``GET /v1/models`` entries: model groups served by an enabled provider, then each enabled provider's models.

    Groups are ``owned_by: "aipipe"``, concrete models by their provider; ``created`` is 0 (unknown).
    """
    enabled = config.enabled_providers()
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for group, members in config.model_groups.items():
        if any(p in enabled for p in members) and group not in seen:
            seen.add(group)
            out.append({"id": group, "object": "model", "created": 0, "owned_by": "aipipe"})
    for name, provider in enabled.items():
        for model in provider.models:
            if model not in seen:
                seen.add(model)
                out.append({"id": model, "object": "model", "created": 0, "owned_by": name})
    return out


# --- the ASGI app ----------------------------------------------------------------------------


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


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OpenAIHTTPError(
            413, f"request body over {MAX_BODY_BYTES} bytes", type_="invalid_request_error", code=None
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise OpenAIHTTPError(
                413, f"request body over {MAX_BODY_BYTES} bytes", type_="invalid_request_error", code=None
            )
        chunks.append(chunk)
    return b"".join(chunks)


def new_completion_id() -> str:
    """A fresh id for a chat completion and its pipeline request (``chatcmpl-`` + 24 hex characters)."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


@dataclass
class ServeState:
    """What the endpoint needs: how to ask the pipeline, which models to list, the client keys."""

    ask: Callable[[AIRequest], Awaitable[AIResponse]]
    config: PipelineConfig
    api_keys: ApiKeys | None


def create_app(state: ServeState) -> Starlette:
    """The Starlette app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{model}``.

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
            user = authenticate(request)
            raw = await _read_body(request)
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise OpenAIHTTPError.invalid("We could not parse the JSON body of your request.") from None
            ai_request = to_ai_request(body, request_id=request_id, key_user=user)
        except OpenAIHTTPError as exc:
            return _error_response(exc, id_header)
        try:
            response = await state.ask(ai_request)
        except ProviderTimeoutError as exc:
            log.warning("request %s: %s", request_id, exc)
            return _error_response(OpenAIHTTPError.for_type("timeout", str(exc)), id_header)
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

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
    )


# --- running it ------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise ServeConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


class OpenAIServer:
    """The OpenAI-compatible endpoint over a started ``AIProviderManager``, in the caller's event loop.

    Use as ``async with manager, OpenAIServer(manager) as server:`` and point the
    SDK at ``server.base_url``. Client keys come from ``AIPIPE_API_KEYS`` in the
    manager's environment (``api_keys_for``); an open endpoint logs a warning.

    Args:
        manager: a started manager (its ``client`` answers, its ``config`` lists the models).
        host: interface to listen on.
        port: TCP port; 0 picks a free one (read ``url`` after ``start``).
        graceful_shutdown_s: how long ``stop`` lets in-flight calls finish (s).
    """

    def __init__(
        self,
        manager: AIProviderManager,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        graceful_shutdown_s: int = GRACEFUL_SHUTDOWN_S,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.graceful_shutdown_s = graceful_shutdown_s
        self.api_keys: ApiKeys | None = None
        self._server: InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:8000``.

        Raises:
            RuntimeError: before ``start``.
        """
        if self._url is None:
            raise RuntimeError("OpenAIServer is not started")
        return self._url

    @property
    def base_url(self) -> str:
        """The SDK's ``base_url``: ``url + "/v1"``."""
        return f"{self.url}/v1"

    async def _ask(self, request: AIRequest) -> AIResponse:
        client = self.manager.client
        # The client waits timeout_ms + slack for the answer; this outer limit also bounds the publish.
        limit_s = (request.timeout_ms + client.slack_ms) / 1000 + 1.0
        try:
            with anyio.fail_after(limit_s):
                return await client.request(request)
        except TimeoutError:
            raise ProviderTimeoutError(
                f"no response for request {request.id} within {limit_s:.1f}s", request_id=request.id
            ) from None

    async def start(self) -> None:
        """Check the client keys, bind the port and serve in a background task; returns once listening.

        Raises:
            ServeConfigError: invalid key file, production without keys, or the port cannot be bound.
            RuntimeError: when already started or the server did not start within 10 s.
        """
        if self._task is not None:
            raise RuntimeError("OpenAIServer is already started")
        self.api_keys = api_keys_for(self.manager.settings)
        sock = _bind(self.host, self.port)
        app = create_app(ServeState(ask=self._ask, config=self.manager.config, api_keys=self.api_keys))
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=self.graceful_shutdown_s,
        )
        server = InLoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="aipipe-serve")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception()
                raise RuntimeError(f"aipipe serve failed to start: {exc!r}") from exc
            if loop.time() > deadline:
                server.should_exit = True
                task.cancel()
                sock.close()
                raise RuntimeError(f"aipipe serve did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.005)
        self._server, self._task, self._sock = server, task, sock
        port = sock.getsockname()[1]
        self._url = f"http://[{self.host}]:{port}" if ":" in self.host else f"http://{self.host}:{port}"
        if self.api_keys is None:
            log.warning(
                "AIPIPE_API_KEYS is not set: %s/v1 is open to anyone who can reach it (development only)", self._url
            )
        else:
            log.info("serving %s/v1 for %d client keys", self._url, len(self.api_keys))

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish (up to ``graceful_shutdown_s``), close the port."""
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        self._url = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.graceful_shutdown_s + 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if sock is not None:
                sock.close()

    async def __aenter__(self) -> OpenAIServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_bus_kind(settings: Settings, env: Mapping[str, str]) -> BusKind:
    """``kafka`` when a broker is configured or the runtime file names a live one, else ``memory``."""
    if settings.kafka_bootstrap or await read_runtime_broker_async(env) is not None:
        return "kafka"
    return "memory"


async def run_server(env: Mapping[str, str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """``aipipe serve``: run the endpoint until SIGINT/SIGTERM, then finish in-flight calls and stop.

    With a broker the server is a client of the stages running there; without
    one it runs every stage in-process on the in-process bus.

    Raises:
        ServeConfigError: invalid ``AIPIPE_API_KEYS``, production without it, or the port is taken.
        BusError: when the broker does not answer.
    """
    from pipeline.manager import create_ai_provider_manager

    settings = Settings.from_env(env)
    api_keys_for(settings)  # fail before starting anything
    kind = await serve_bus_kind(settings, env)
    manager = create_ai_provider_manager(settings.env_name, env, bus=kind)
    async with manager, OpenAIServer(manager, host=host, port=port) as server:
        where = f"broker {manager.bootstrap}" if manager.pipeline is None else "in-process stages"
        print(f"aipipe serve: {server.base_url} ({where}; Ctrl-C to stop)", file=sys.stderr, flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                log.info("received %s: finishing in-flight calls", signal.Signals(sig).name)
                break
