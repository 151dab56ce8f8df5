"""The response-cache key: a hash of everything that changes the answer.

The key is the SHA-256 (hex) of the canonical JSON of: the requested model
(the logical model group or concrete model as sent), the chat messages
(``prompt`` is the single user message it stands for, so a prompt and the
equivalent one-message conversation share a key), ``max_tokens``,
``temperature``, ``top_p``, ``stop`` (a single string counts as a one-element
list) and the ``providers`` allow-list (it changes which model answers).
Defaults are filled in before hashing, so leaving out ``temperature`` and
sending its default give the same key. Fields that do not change the answer
(``id``, ``user``, ``metadata``, ``cache``, ``timeout_ms``) are left out.
Canonical JSON: keys sorted, no whitespace (msgspec ``order="sorted"``), so
field order and spacing in the request never matter.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.request import AIRequest

KEY_VERSION = 1
_ENCODER = msgspec.json.Encoder(order="sorted")


def cache_key(request: AIRequest) -> str:
    """The cache key of ``request``: ``"v1:" + sha256 hex`` of its canonical generation fields."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    canonical = {
        "model": request.model,
        "messages": [[m.role, m.content] for m in request.chat_messages()],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": stop,
        "providers": request.providers,
    }
    digest = hashlib.sha256(_ENCODER.encode(canonical)).hexdigest()
    return f"v{KEY_VERSION}:{digest}"
