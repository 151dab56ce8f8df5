"""The response-cache key: a hash of everything that changes the answer.

The key is ``"v1:"`` + the SHA-256 (hex) of the canonical JSON of every
request field except the ones listed in ``NON_GENERATION_FIELDS`` (``id``,
``user``, ``metadata``, ``cache``, ``timeout_ms`` and the stream fields: they change who asks, how
long to wait or how to cache, never the answer). Today that is:

* ``model``: the logical model group or concrete model, as sent;
* ``messages``: roles and contents, in order (``prompt`` is the single user
  message it stands for, so a prompt and the equivalent one-message
  conversation share a key);
* ``max_tokens``, ``temperature``, ``top_p``;
* ``stop`` (a single string counts as a one-element list);
* ``providers``: the allow-list changes which model answers;
* ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``
  (DESIGN A4), each only when set, so keys of requests without them are the
  same as before; a message's ``tool_calls`` and ``tool_call_id`` likewise;
  an image by its SHA-256 reference (``stages.rules.images``), so a ``data:``
  URI and its blob reference share a key and the bytes are hashed once.

Because the key is built from *all but* an exclusion list, a generation
parameter added to ``AIRequest`` later (``seed``, ``presence_penalty``...)
is part of the key without anyone remembering to add it; a test pins the
list. Defaults are filled in before hashing (msgspec fills them at decode),
so leaving out ``temperature`` and sending its default give the same key, and
``1`` and ``1.0`` are the same temperature. Canonical JSON: keys sorted, no
whitespace (msgspec ``order="sorted"``), so field order and spacing in the
request never matter. ``KEY_VERSION`` changes whenever this recipe does, so
old entries are never read with a new meaning.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from schemas.request import AIRequest, ImagePart, Message
from stages.rules.images import canonical_image_url

KEY_VERSION = 1

#: ``AIRequest`` fields that never change the answer and stay out of the key.
NON_GENERATION_FIELDS: frozenset[str] = frozenset(
    {"id", "user", "metadata", "cache", "timeout_ms", "stream", "stream_resume", "stream_topic"}
)

#: Generation fields added after key version 1 (DESIGN A4): in the key only when set.
OPTIONAL_GENERATION_FIELDS: tuple[str, ...] = ("tools", "tool_choice", "parallel_tool_calls", "response_format")

_ENCODER = msgspec.json.Encoder(order="sorted")


def _canonical_message(message: Message) -> list[Any]:
    """``[role, content]``, plus ``tool_calls`` and ``tool_call_id`` when set; images by their hash reference."""
    content: Any = message.content
    if isinstance(content, list):
        content = [
            {"type": "image_url", "url": canonical_image_url(p.image_url.url), "detail": p.image_url.detail}
            if isinstance(p, ImagePart)
            else {"type": "text", "text": p.text}
            for p in content
        ]
    if message.tool_calls is None and message.tool_call_id is None:
        return [message.role, content]
    return [message.role, content, message.tool_calls, message.tool_call_id]


def canonical_fields(request: AIRequest) -> dict[str, Any]:
    """The generation fields of ``request`` in canonical form (what ``cache_key`` hashes).

    Returns:
        ``{"model": str, "messages": [[role, content], ...], "max_tokens": int,
        "temperature": float, "top_p": float | None, "stop": [str] | None,
        "providers": [str] | None}`` plus any generation field added to
        ``AIRequest`` later.
    """
    fields: dict[str, Any] = {}
    for name in request.__struct_fields__:
        if name in NON_GENERATION_FIELDS or name in ("prompt", "messages"):
            continue
        fields[name] = getattr(request, name)
    for name in OPTIONAL_GENERATION_FIELDS:  # absent unless set, so older keys do not drift
        if fields.get(name) is None:
            fields.pop(name, None)
    fields["messages"] = [_canonical_message(m) for m in request.chat_messages()]
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return fields


def cache_key(request: AIRequest) -> str:
    """The cache key of ``request``: ``"v1:" + sha256 hex`` of its canonical generation fields.

    Example: ``"v1:3b0c...e9"`` (3 + 64 characters).
    """
    digest = hashlib.sha256(_ENCODER.encode(canonical_fields(request))).hexdigest()
    return f"v{KEY_VERSION}:{digest}"
