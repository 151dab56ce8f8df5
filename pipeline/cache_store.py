"""Stores behind the response cache: in-process LRU+TTL (cachetools) with zlib compression.

``MemoryCacheStore`` bounds the number of entries (least recently used go
first) and gives each entry its own TTL (s). Values above
``compression_threshold_bytes`` are zlib-compressed. Counters: hits, misses,
evictions, entries, bytes.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import msgspec
from cachetools import TLRUCache

from schemas.cache import CachedAnswer

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(CachedAnswer)


@dataclass
class CacheCounters:
    """Response cache counters since start (or the last clear)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class CacheStore(Protocol):
    """Where cached answers live (in-process or Redis)."""

    counters: CacheCounters

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, or ``None`` (counts a hit or a miss)."""
        ...

    async def set(self, key: str, answer: CachedAnswer, ttl_s: int) -> None:
        """Store ``answer`` under ``key`` for ``ttl_s`` seconds."""
        ...

    async def clear(self) -> None:
        """Remove every entry."""
        ...


class _Entry:
    __slots__ = ("compressed", "data", "ttl_s")

    def __init__(self, data: bytes, compressed: bool, ttl_s: float) -> None:
        self.data = data
        self.compressed = compressed
        self.ttl_s = ttl_s


class _BoundedTLRU(TLRUCache[str, _Entry]):
    def __init__(self, store: MemoryCacheStore, maxsize: int) -> None:
        super().__init__(maxsize=maxsize, ttu=lambda _k, v, now: now + v.ttl_s, timer=time.monotonic)
        self._store = store

    def popitem(self) -> tuple[str, _Entry]:
        key, value = super().popitem()
        self._store.counters.evictions += 1
        self._store.counters.bytes -= len(value.data)
        return key, value


class MemoryCacheStore:
    """In-process cache: at most ``max_size`` entries, per-entry TTL, compression above a size.

    Args:
        max_size: entries kept; the least recently used is evicted first.
        compression_threshold_bytes: values longer than this (bytes of JSON) are zlib-compressed.
        enable_compression: turn compression off entirely.
    """

    def __init__(
        self, max_size: int = 1000, compression_threshold_bytes: int = 1024, enable_compression: bool = True
    ) -> None:
        self.counters = CacheCounters()
        self.threshold = compression_threshold_bytes
        self.compress = enable_compression
        self._cache = _BoundedTLRU(self, max_size)

    def _sync_size(self) -> None:
        self._cache.expire()
        self.counters.entries = len(self._cache)
        self.counters.bytes = sum(len(e.data) for e in self._cache.values())

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer under ``key`` if present and not expired; counts a hit or a miss."""
        entry = self._cache.get(key)
        if entry is None:
            self.counters.misses += 1
            self._sync_size()
            return None
        raw = zlib.decompress(entry.data) if entry.compressed else entry.data
        self.counters.hits += 1
        return _DEC.decode(raw)

    async def set(self, key: str, answer: CachedAnswer, ttl_s: int) -> None:
        """Store ``answer`` for ``ttl_s`` seconds (0: not stored)."""
        if ttl_s <= 0:
            return
        raw = _ENC.encode(answer)
        compressed = self.compress and len(raw) > self.threshold
        data = zlib.compress(raw) if compressed else raw
        self._cache[key] = _Entry(data, compressed, float(ttl_s))
        self._sync_size()

    async def clear(self) -> None:
        """Remove every entry (counters of hits and misses are kept)."""
        self._cache.clear()
        self._sync_size()
