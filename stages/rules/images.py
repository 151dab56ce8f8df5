"""Images by claim check (DESIGN A4): a ``data:`` URI becomes a reference to its bytes in the blob store.

A reference is ``aipipe-blob:<media type>;sha256:<64 hex>``, the SHA-256 of
the image's decoded bytes, so the same image always has the same reference
(the cache key covers an image by this hash) and is stored once. The
functions here are pure: parsing and naming; the blob store
(``pipeline.stores.blob_store``) keeps the bytes, and the executor resolves a
reference back to a ``data:`` URI just before the provider call.

The ``data:`` URI syntax is RFC 2397 (https://www.rfc-editor.org/rfc/rfc2397);
the media types accepted are the four every vision API above documents:
PNG, JPEG, GIF and WebP (https://platform.openai.com/docs/guides/images-vision,
https://docs.anthropic.com/en/docs/build-with-claude/vision, read 2026-12-06).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from schemas.request import BLOB_URL_PATTERN, BLOB_URL_PREFIX

#: Image media types accepted in a ``data:`` URI.
IMAGE_MEDIA_TYPES: frozenset[str] = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
#: Default largest image (decoded bytes), the ``images.max_bytes`` setting's default: 20 MiB.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


#: The first bytes of each image type (PNG: RFC 2083 section 3.1; JPEG: SOI marker FF D8 FF; GIF87a/89a;
#: WebP: a RIFF container whose form type at offset 8 is ``WEBP``).
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


class ImageError(ValueError):
    """An image the request cannot use: a bad ``data:`` URI, an unknown media type, too many bytes."""


def decode_data_uri(url: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[str, bytes]:
    """``(media type, bytes)`` of a ``data:image/<type>;base64,<data>`` URI.

    Raises:
        ImageError: not a base64 image ``data:`` URI, a media type outside
            ``IMAGE_MEDIA_TYPES``, invalid base64, or more than ``max_bytes`` bytes.
    """
    header, sep, data = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ImageError("an image `data:` URI must be `data:image/<type>;base64,<data>`")
    media_type = header[len("data:") : -len(";base64")].lower()
    if media_type not in IMAGE_MEDIA_TYPES:
        raise ImageError(f"image media type {media_type[:40]!r} is not one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"image of about {len(data) * 3 // 4} bytes is over the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image `data:` URI is not valid base64: {exc}") from exc
    check_image_bytes(media_type, raw, max_bytes=max_bytes)
    return media_type, raw


def check_image_bytes(media_type: str, raw: bytes, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Check that ``raw`` is a non-empty image of ``media_type`` of at most ``max_bytes`` bytes.

    Raises:
        ImageError: empty, over the limit, a media type outside ``IMAGE_MEDIA_TYPES``, or first
            bytes that are not that type's signature.
    """
    if media_type not in IMAGE_MEDIA_TYPES:
        raise ImageError(f"image media type {media_type[:40]!r} is not one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}")
    if len(raw) > max_bytes:
        raise ImageError(f"image of {len(raw)} bytes is over the limit of {max_bytes} bytes")
    if not raw:
        raise ImageError("the image holds no bytes")
    if not any(raw.startswith(magic) for magic in _MAGIC[media_type]) or (
        media_type == "image/webp" and raw[8:12] != b"WEBP"
    ):
        raise ImageError(f"the image's bytes are not {media_type} (its first bytes do not match)")


def reference_for(media_type: str, raw: bytes) -> str:
    """The blob reference of an image: ``aipipe-blob:<media type>;sha256:<hex of sha256(raw)>``."""
    return f"{BLOB_URL_PREFIX}{media_type};sha256:{hashlib.sha256(raw).hexdigest()}"


def parse_reference(url: str) -> tuple[str, str] | None:
    """``(media type, sha256 hex)`` of a blob reference, or ``None`` when ``url`` is not one."""
    found = BLOB_URL_PATTERN.match(url)
    return (found.group(1), found.group(2)) if found else None


def canonical_image_url(url: str) -> str:
    """The URL an image is known by in a cache key: a ``data:`` URI as its reference, anything else as is.

    An undecodable ``data:`` URI stays as is (the request fails later with the reason).
    """
    if not url.startswith("data:"):
        return url
    try:
        media_type, raw = decode_data_uri(url, max_bytes=1 << 62)
    except ImageError:
        return url
    return reference_for(media_type, raw)


def data_uri(media_type: str, raw: bytes) -> str:
    """``raw`` as a ``data:<media type>;base64,...`` URI (what adapters send)."""
    return f"data:{media_type};base64,{base64.b64encode(raw).decode('ascii')}"
