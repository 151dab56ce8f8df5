"""What the response cache stores for one key: a complete, successful answer."""

from __future__ import annotations

from msgspec import Struct

from schemas.response import Usage


class CachedAnswer(Struct, kw_only=True):
    """A cached answer: its text, who produced it, its usage and what it cost (USD)."""

    content: str
    provider: str
    model: str
    usage: Usage
    cost_usd: float
    stored_at_ms: int
