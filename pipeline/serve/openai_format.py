"""The OpenAI chat-completions wire format of ``aipipe serve`` (pure: no I/O).

Requests: an OpenAI chat-completions body becomes one ``AIRequest``
(``to_ai_request``): ``model``, ``messages`` (text and ``image_url`` parts,
assistant ``tool_calls``, ``tool`` turns; ``developer`` is read as
``system``), ``max_tokens``/``max_completion_tokens``, ``temperature``,
``top_p``, ``stop``, ``user``, ``metadata``, ``tools``, ``tool_choice``,
``parallel_tool_calls`` and ``response_format`` (DESIGN A4) map onto it; the aipipe extensions
``providers``, ``cache`` and ``timeout_ms`` (the SDK's ``extra_body``) pass
through. Parameters aipipe cannot honour are accepted only at their no-op
value (``n: 1``, ``presence_penalty: 0``, ...), hints that do
not change the answer (``seed``, ``store``, ``service_tier``, ...) are ignored,
and anything else is a 400 naming the parameter, so a request never silently
means something else.

Answers: an ``AIResponse`` becomes a ``chat.completion`` body
(https://platform.openai.com/docs/api-reference/chat/object), an error the
OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with the
status code of ``ERROR_STATUS``. ``stream: true`` (with
``stream_options.include_usage``) is answered with server-sent
``chat.completion.chunk`` events (``chunk_body``, ``usage_chunk_body``,
https://platform.openai.com/docs/api-reference/chat-streaming); the aipipe
extension ``stream_resume`` passes through.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

from pipeline.runtime.config import PipelineConfig
from schemas.request import BLOB_URL_PREFIX, AIRequest
from schemas.response import AIResponse

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
    "stream_interrupted": (502, "server_error"),
    # 499: nginx's "client closed request"; the client that would read it has gone
    "cancelled": (499, "invalid_request_error"),
    "invalid_response": (502, "server_error"),
}
_PARAM_OF: dict[str, str] = {"model_not_found": "model", "context_length_exceeded": "messages"}
#: The request field an ``invalid_request`` message from the pipeline is about (the first one it names).
_FIELD_NAMED = re.compile(
    r"\b(max_tokens|messages|temperature|top_p|stop|providers|timeout_ms|user|metadata|prompt|model|stream_resume"
    r"|tool_choice|tools|parallel_tool_calls|response_format)\b"
)


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
        """The error for an aipipe ``error.type`` (``ERROR_STATUS``; unknown types: 500 ``server_error``).

        An ``invalid_request`` whose message names a request field (``max_tokens``,
        ``providers``, ...) gets the first one it names as ``param``.
        """
        if param is None and error_type == "invalid_request":
            found = _FIELD_NAMED.search(message)
            param = found.group(1) if found else None
        status, type_ = ERROR_STATUS.get(error_type, (500, "server_error"))
        return cls(status, message, type_=type_, code=error_type, param=param or _PARAM_OF.get(error_type))

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> OpenAIHTTPError:
        """A 400 ``invalid_request_error`` about ``param``."""
        return cls.for_type("invalid_request", message, param=param)

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: OpenAI parameters aipipe cannot honour, accepted only at these no-op values (``None`` is always accepted).
NOOP_PARAMS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
}
#: OpenAI parameters that do not change the answer's content or shape; accepted and ignored.
IGNORED_PARAMS: frozenset[str] = frozenset({"seed", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
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
        "stream",
        "stream_options",
        "stream_resume",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    }
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_MESSAGE_KEYS_IGNORED = frozenset({"name", "refusal", "audio", "annotations"})
_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})
_PART_TYPES = frozenset({"text", "image_url"})


def _content(content: Any, role: str, where: str) -> Any:
    """A message's content for the ``AIRequest``: text and image parts kept, other part types refused.

    Content of text parts only is joined into one string (the same answer, and the same cache key, as
    the string); images stay parts (``user`` turns only, as OpenAI has it).
    """
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIHTTPError.invalid(f"{where}.content must be a string or a list of parts", f"{where}.content")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in _PART_TYPES:
            raise OpenAIHTTPError.invalid(
                f"{where}.content[{i}] of type {kind!r} is not supported; use 'text' or 'image_url' parts",
                f"{where}.content",
            )
        image = part.get("image_url") if kind == "image_url" else None
        if isinstance(image, dict) and str(image.get("url", "")).startswith(BLOB_URL_PREFIX):
            raise OpenAIHTTPError.invalid(
                f"{where}.content[{i}].image_url.url must be an https URL or a data: URI",
                f"{where}.content[{i}].image_url.url",
            )
    if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content  # parts as sent: the request's own validation names a bad one


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise OpenAIHTTPError.invalid("'messages' must be a non-empty array", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIHTTPError.invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            raise OpenAIHTTPError.invalid(
                f"{where}.role {role!r} is not supported; use system, developer, user, assistant or tool",
                f"{where}.role",
            )
        kept: dict[str, Any] = {"role": _ROLES[role]}
        for key, value in message.items():
            if key == "role" or key in _MESSAGE_KEYS_IGNORED or (key not in _MESSAGE_KEYS and value in (None, [])):
                continue
            if key not in _MESSAGE_KEYS:
                raise OpenAIHTTPError.invalid(f"{where}.{key} is not supported", f"{where}.{key}")
            if key == "tool_calls" and value in (None, []):
                continue
            kept[key] = _content(value, _ROLES[role], where) if key == "content" else value
        out.append(kept)
    return out


def to_ai_request(body: Any, *, request_id: str, key_user: str | None = None) -> AIRequest:
    """Map an OpenAI chat-completions body onto an ``AIRequest`` with id ``request_id``.

    Args:
        body: the decoded JSON body.
        request_id: the pipeline request id (also the completion's ``id``).
        key_user: the user of the caller's client key; when set it is the request's ``user``
            and a body ``user`` is kept as ``metadata["openai_user"]``.

    Raises:
        OpenAIHTTPError: 400 for an unknown or unsupported parameter, ``stream_options`` without
            ``stream: true``, or a value the ``AIRequest`` rejects (the message names the field).
    """
    if not isinstance(body, dict):
        raise OpenAIHTTPError.invalid("the request body must be a JSON object")
    include_usage(body)  # checks stream / stream_options
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
    if body.get("stream") is True:
        data["stream"] = True
    for name in (
        "temperature",
        "top_p",
        "stop",
        "metadata",
        "providers",
        "cache",
        "timeout_ms",
        "stream_resume",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    ):
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
            param = message.split("`$.", 1)[1].split("`", 1)[0]
        raise OpenAIHTTPError.invalid(f"invalid request: {message}", param) from None


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``).

    Raises:
        OpenAIHTTPError: 400 for a ``stream`` that is not a boolean, ``stream_options``
            without ``stream: true`` (OpenAI's rule), or ``stream_options`` that is not an object.
    """
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIHTTPError.invalid("'stream' must be a boolean", "stream")
    if options is None:
        return False
    if stream is not True:
        raise OpenAIHTTPError.invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
    if not isinstance(options, dict) or any(k != "include_usage" for k in options):
        raise OpenAIHTTPError.invalid("'stream_options' supports only {\"include_usage\": bool}", "stream_options")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise OpenAIHTTPError.invalid("'stream_options.include_usage' must be a boolean", "stream_options")
    return value is True


def chunk_body(
    completion_id: str,
    *,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` object; with ``with_usage_field`` it carries ``usage: null`` (include_usage)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk_body(response: AIResponse, *, created: int, model: str) -> dict[str, Any]:
    """The last chunk of ``include_usage``: empty ``choices`` and the whole answer's ``usage`` (tokens)."""
    usage = response.usage
    return {
        "id": response.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        },
    }


def finish_reason(response: AIResponse, request: AIRequest) -> str:
    """The answer's ``finish_reason``: the response's own, else inferred from the token counts.

    ``tool_calls`` when the answer has tool calls; without a reported reason,
    ``length`` when the answer used the whole ``max_tokens`` budget, else ``stop``.
    """
    if response.tool_calls:
        return "tool_calls"
    if response.finish_reason is not None:
        return response.finish_reason
    return "length" if response.usage.completion_tokens >= request.max_tokens else "stop"


def tool_calls_json(response: AIResponse) -> list[dict[str, Any]] | None:
    """The response's tool calls in OpenAI's ``message.tool_calls`` shape (``None`` when it has none)."""
    if not response.tool_calls:
        return None
    return [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in response.tool_calls
    ]


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
                "message": _message(response),
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


def _message(response: AIResponse) -> dict[str, Any]:
    calls = tool_calls_json(response)
    if calls is None:
        return {"role": "assistant", "content": response.content or "", "refusal": None}
    return {"role": "assistant", "content": response.content or None, "refusal": None, "tool_calls": calls}


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


def new_completion_id() -> str:
    """A fresh id for a chat completion and its pipeline request (``chatcmpl-`` + 24 hex characters)."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
