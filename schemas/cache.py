"""Response cache values: what one key stores, and the statistics of every replica summed up."""

from __future__ import annotations

from msgspec import Struct

from schemas.events import CacheStats
from schemas.request import ToolCall
from schemas.response import FinishReason, Usage


class CachedAnswer(Struct, kw_only=True):
    """A cached answer: its text, who produced it, its usage (tokens), what it cost (USD), when (Unix ms).

    ``tool_calls`` and ``finish_reason`` are the answer's (DESIGN A4): an answer
    of tool calls with empty ``content`` is cached like any other.
    """

    content: str
    provider: str
    model: str
    usage: Usage
    cost_usd: float
    stored_at_ms: int
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None


class CacheStatsSummary(Struct, kw_only=True):
    """The response cache across replicas (``aipipe cache stats``, ``get_cache_stats``).

    ``hits`` and ``misses`` are summed over ``replicas`` (each replica counts
    its own lookups since it started); ``hit_rate`` is ``hits / (hits +
    misses)`` (0.0 before any lookup). ``entries``, ``bytes`` (stored, after
    compression) and ``evictions`` are summed over in-process stores and taken
    once for the shared Redis store. ``replicas`` are the latest
    ``cache_stats`` of each replica that answered.
    """

    hits: int
    misses: int
    hit_rate: float
    entries: int
    evictions: int
    bytes: int
    replicas: list[CacheStats] = []
