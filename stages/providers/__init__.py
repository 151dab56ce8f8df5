"""Provider adapters (OpenAI, Anthropic, Cloudflare Workers AI), failure classification, model catalog.

Each adapter implements ``ProviderAdapter``: a ``name`` and
``async complete(client, call, timeout_s) -> ProviderResult`` making exactly one
HTTP call and raising only ``pipeline.errors.AIProviderError`` subclasses.
"""

from __future__ import annotations

from stages.providers.anthropic import AnthropicAdapter
from stages.providers.base import ProviderAdapter, ProviderCall, ProviderResult
from stages.providers.classify import classify_response, classify_transport_error, parse_retry_after, redact
from stages.providers.cloudflare import CloudflareAdapter
from stages.providers.openai import OpenAIAdapter
from stages.rules.catalog import ModelInfo, catalog_providers, known_models, model_info
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens

#: Provider names ``build_adapter`` accepts.
PROVIDER_NAMES: tuple[str, ...] = ("openai", "anthropic", "cloudflare")


def build_adapter(name: str, *, base_url: str, api_key: str | None, account_id: str | None = None) -> ProviderAdapter:
    """Build the adapter for provider ``name``.

    Args:
        name: ``"openai"``, ``"anthropic"`` or ``"cloudflare"``.
        base_url: the provider's API root, per the SDK conventions of DESIGN A7
            (OpenAI with ``/v1``, Anthropic without, Cloudflare ``.../client/v4``).
        api_key: the API key or token (``None``: calls go out unauthenticated and get a 401).
        account_id: Cloudflare account id (ignored by the others).

    Returns:
        An object implementing ``ProviderAdapter``.

    Raises:
        ValueError: for an unknown provider name.
    """
    match name:
        case "openai":
            return OpenAIAdapter(base_url, api_key)
        case "anthropic":
            return AnthropicAdapter(base_url, api_key)
        case "cloudflare":
            return CloudflareAdapter(base_url, api_key, account_id)
        case _:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDER_NAMES)}")


__all__ = [
    "PROVIDER_NAMES",
    "AnthropicAdapter",
    "CloudflareAdapter",
    "ModelInfo",
    "OpenAIAdapter",
    "ProviderAdapter",
    "ProviderCall",
    "ProviderResult",
    "build_adapter",
    "catalog_providers",
    "classify_response",
    "classify_transport_error",
    "estimate_messages_tokens",
    "estimate_tokens",
    "known_models",
    "model_info",
    "parse_retry_after",
    "redact",
]
