"""The blob store of the image claim check (DESIGN A4): image bytes by SHA-256, off the Kafka topics.

A client replaces each ``data:`` image URI of a request by a reference
(``stages.rules.images.reference_for``) after storing the bytes here once;
the executor reads them back just before the provider call. Two stores:

* ``FileBlobStore``: one file per image under ``$AIPIPE_HOME/blobs`` (one
  machine: every process of a pipeline on it sees the same files). Written
  to a temporary name and renamed, so a reader never sees half an image.
* ``RedisBlobStore``: one key per image, ``<namespace>:<sha256>``, with a TTL
  (default 7 days), when ``AIPIPE_REDIS_URL`` is set (replicas on several
  machines).

The same bytes always have the same key, so storing an image twice stores it
once. Neither store ever fetches an https URL: those are passed to providers
as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import anyio
import msgspec
import redis.asyncio as aioredis

from pipeline.stores.redis_client import redis_from_url
from schemas.request import AIRequest, ContentPart, ImagePart, ImageURL, Message
from stages.rules.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    ImageError,
    check_image_bytes,
    data_uri,
    decode_data_uri,
    parse_reference,
    reference_for,
)

#: How long (s) an image stays in Redis after it was last stored: 7 days.
DEFAULT_REDIS_TTL_S = 7 * 24 * 3600


class BlobStore(Protocol):
    """Image bytes by SHA-256 hex digest."""

    kind: str

    async def put(self, digest: str, raw: bytes) -> None:
        """Store ``raw`` under ``digest`` (the SHA-256 hex of ``raw``); storing it again is a no-op."""
        ...

    async def get(self, digest: str) -> bytes | None:
        """The bytes stored under ``digest``, or ``None`` when there are none."""
        ...

    async def aclose(self) -> None:
        """Release connections (nothing for files)."""
        ...


class FileBlobStore:
    """Blobs as files ``<root>/<sha256 hex>`` (module docstring). ``root`` is created on first write."""

    kind = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("a blob digest is 64 lowercase hex characters")
        return self.root / digest

    async def put(self, digest: str, raw: bytes) -> None:
        """Write ``raw`` atomically (temporary file, then rename) unless it is there already.

        Raises:
            OSError: when the directory cannot be written.
        """
        path = self._path(digest)
        if await anyio.Path(path).exists():
            return

        def write() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(raw)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

        await anyio.to_thread.run_sync(write)

    async def get(self, digest: str) -> bytes | None:
        """The file's bytes, or ``None`` when it does not exist."""
        try:
            return await anyio.Path(self._path(digest)).read_bytes()
        except FileNotFoundError:
            return None

    async def aclose(self) -> None:
        """Nothing to release."""


class RedisBlobStore:
    """Blobs as Redis strings ``<namespace>:<sha256 hex>`` with a TTL of ``ttl_s`` (s)."""

    kind = "redis"

    def __init__(self, client: aioredis.Redis, *, namespace: str = "aipipe:blob", ttl_s: int = DEFAULT_REDIS_TTL_S):
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s

    async def put(self, digest: str, raw: bytes) -> None:
        """``SET key raw EX ttl`` (refreshes the TTL of an image stored again).

        Raises:
            redis.RedisError: when Redis cannot be reached.
        """
        await self.client.set(f"{self.namespace}:{digest}", raw, ex=self.ttl_s)

    async def get(self, digest: str) -> bytes | None:
        """``GET key``; ``None`` when absent.

        Raises:
            redis.RedisError: when Redis cannot be reached.
        """
        value = await self.client.get(f"{self.namespace}:{digest}")
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else bytes(value)

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def open_blob_store(redis_url: str | None, home: Path, *, prefix: str = "ai.") -> BlobStore:
    """Redis when ``redis_url`` is set (keys ``aipipe:{<prefix>blob}:<sha256>``), else files in ``home/blobs``."""
    if redis_url:
        return RedisBlobStore(redis_from_url(redis_url), namespace=f"aipipe:{{{prefix}blob}}")
    return FileBlobStore(home / "blobs")


async def _replace_urls(messages: list[Message], replace: Callable[[str], Awaitable[str | None]]) -> list[Message]:
    """``messages`` with each image URL for which ``replace`` returns a new URL replaced (others kept)."""
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list) or not message.images():
            out.append(message)
            continue
        parts: list[ContentPart] = []
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                try:
                    url = await replace(part.image_url.url)
                except ImageError as exc:  # say which image
                    raise ImageError(f"messages[{i}].content[{j}].image_url.url: {exc}") from exc
                if url is not None:
                    part = ImagePart(image_url=ImageURL(url=url, detail=part.image_url.detail))
            parts.append(part)
        out.append(msgspec.structs.replace(message, content=parts))
    return out


async def offload_images(
    request: AIRequest, store: BlobStore, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> AIRequest:
    """``request`` with every ``data:`` image URI stored in ``store`` and replaced by its reference.

    A request without ``data:`` images is returned as is.

    Raises:
        ImageError: an undecodable ``data:`` URI or an image over ``max_bytes`` (decoded bytes).
        OSError, redis.RedisError: when the store cannot be written.
    """
    messages = request.messages
    if not messages or not any(i.url.startswith("data:") for m in messages for i in m.images()):
        return request

    async def store_one(url: str) -> str | None:
        if not url.startswith("data:"):
            return None
        media_type, raw = decode_data_uri(url, max_bytes=max_bytes)
        reference = reference_for(media_type, raw)
        await store.put(reference.rsplit(":", 1)[1], raw)
        return reference

    return msgspec.structs.replace(request, messages=await _replace_urls(messages, store_one))


class MissingBlobError(LookupError):
    """An image reference whose bytes are not in the blob store."""


async def resolve_images(
    messages: list[Message], store: BlobStore | None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> list[Message]:
    """``messages`` with every blob reference replaced by the image as a ``data:`` URI (for a provider call).

    Raises:
        MissingBlobError: a reference whose bytes are not in ``store`` (or no store is configured),
            or whose stored bytes do not hash to it (lost or corrupted state, not the caller's fault).
        ImageError: stored bytes that are not an image of the reference's media type, or too large.
        OSError, redis.RedisError: when the store cannot be read.
    """
    if not any(i.url.startswith("aipipe-blob:") for m in messages for i in m.images()):
        return messages

    async def read_one(url: str) -> str | None:
        ref = parse_reference(url)
        if ref is None:
            return None
        media_type, digest = ref
        raw = await store.get(digest) if store is not None else None
        if raw is None:
            raise MissingBlobError(
                f"image {digest[:12]}... is not in the blob store (clients and executors must share "
                "AIPIPE_HOME on one machine, or AIPIPE_REDIS_URL)"
            )
        if hashlib.sha256(raw).hexdigest() != digest:
            raise MissingBlobError(f"image {digest[:12]}... in the blob store does not match its SHA-256")
        check_image_bytes(media_type, raw, max_bytes=max_bytes)  # a direct producer's bytes get the same checks
        return data_uri(media_type, raw)

    return await _replace_urls(messages, read_one)
