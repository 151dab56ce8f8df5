"""The image claim check's blob store (DESIGN A4): files on one machine, Redis across machines."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import msgspec
import pytest

from pipeline.stores.blob_store import (
    BlobStore,
    FileBlobStore,
    MissingBlobError,
    RedisBlobStore,
    offload_images,
    resolve_images,
)
from pipeline.stores.redis_client import redis_from_url
from schemas.request import AIRequest
from stages.rules.images import ImageError

RAW = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
URI = f"data:image/png;base64,{base64.b64encode(RAW).decode()}"


def image_request(*urls: str) -> AIRequest:
    parts = [{"type": "text", "text": "look"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return msgspec.convert({"id": "r", "model": "m", "messages": [{"role": "user", "content": parts}]}, AIRequest)


async def round_trip(store: BlobStore) -> None:
    request = image_request(URI, URI, "https://example.com/cat.png")
    offloaded = await offload_images(request, store)
    urls = [i.url for i in (offloaded.messages or [])[0].images()]
    digest = hashlib.sha256(RAW).hexdigest()
    assert urls == [f"aipipe-blob:image/png;sha256:{digest}"] * 2 + ["https://example.com/cat.png"]
    assert URI not in msgspec.json.encode(offloaded).decode()  # no image bytes on the topics
    assert await store.get(digest) == RAW
    resolved = await resolve_images(list(offloaded.messages or []), store)
    assert [i.url for i in resolved[0].images()] == [URI, URI, "https://example.com/cat.png"]
    assert await offload_images(image_request("https://example.com/x.png"), store) == image_request(
        "https://example.com/x.png"
    )


async def test_the_file_store_keeps_each_image_once_by_hash(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    await round_trip(store)
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [hashlib.sha256(RAW).hexdigest()]


async def test_the_redis_store_round_trips(redis_url: str) -> None:
    store = RedisBlobStore(redis_from_url(redis_url), namespace=f"test:{uuid.uuid4().hex[:8]}:blob")
    try:
        await round_trip(store)
        assert await store.client.ttl(f"{store.namespace}:{hashlib.sha256(RAW).hexdigest()}") > 0
    finally:
        await store.aclose()


async def test_a_missing_blob_and_a_bad_image_are_clear_errors(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    missing = image_request(f"aipipe-blob:image/png;sha256:{'0' * 64}")
    with pytest.raises(MissingBlobError, match="not in the blob store"):
        await resolve_images(list(missing.messages or []), store)
    with pytest.raises(ImageError, match="over the limit"):
        await offload_images(image_request(URI), store, max_bytes=8)
    with pytest.raises(ImageError, match="media type"):
        await offload_images(image_request(URI.replace("image/png", "image/tiff")), store)


async def test_stored_bytes_are_checked_when_read_back(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    junk = b"not an image at all"
    digest = hashlib.sha256(junk).hexdigest()
    await store.put(digest, junk)  # as a direct producer might
    with pytest.raises(ImageError, match="are not image/png"):
        await resolve_images(list(image_request(f"aipipe-blob:image/png;sha256:{digest}").messages or []), store)
    png_digest = hashlib.sha256(RAW).hexdigest()
    (tmp_path / png_digest).write_bytes(RAW + b"tampered")
    with pytest.raises(MissingBlobError, match="does not match its SHA-256"):
        await resolve_images(list(image_request(f"aipipe-blob:image/png;sha256:{png_digest}").messages or []), store)
