"""Provider adapters, one per wire format (OpenAI's, Anthropic's, Workers AI's), and failure classification.

Each adapter implements ``ProviderAdapter``: a deployment ``name``, its
``type``, and ``async complete(client, call, timeout_s) -> ProviderResult``
making exactly one HTTP call and raising only ``pipeline.errors.AIProviderError``
subclasses. A deployment is an instance of its type's adapter (``build_adapter``):
``openai``, ``azure_openai`` and ``openai_compatible`` share ``OpenAIAdapter``.
"""

from __future__ import annotations

from collections.abc import Mapping

from stages.providers.anthropic import AnthropicAdapter
from stages.providers.base import ProviderAdapter, ProviderCall, ProviderResult
from stages.providers.classify import classify_response, classify_transport_error, parse_retry_after, redact
from stages.providers.cloudflare import CloudflareAdapter
from stages.providers.openai import OpenAIAdapter
from stages.rules.catalog import ModelInfo, catalog_providers, known_models, model_info
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens

#: Built-in deployment names (each is also the name of its type).
PROVIDER_NAMES: tuple[str, ...] = ("openai", "anthropic", "cloudflare")
#: Deployment types ``build_adapter`` accepts, and the adapter class (wire format) of each.
ADAPTER_TYPES: tuple[str, ...] = ("openai", "azure_openai", "openai_compatible", "anthropic", "cloudflare")


def build_adapter(
    name: str,
    *,
    base_url: str,
    api_key: str | None,
    account_id: str | None = None,
    kind: str | None = None,
    api_version: str | None = None,
    azure_deployments: Mapping[str, str] | None = None,
    max_tokens_field: str | None = None,
) -> ProviderAdapter:
    """Build the adapter of deployment ``name``: an instance of its type's wire format.

    Args:
        name: the deployment name (every event and error carries it).
        base_url: the API root, per the SDK conventions of DESIGN A7 (OpenAI
            types with ``/v1``, Anthropic without, Cloudflare ``.../client/v4``,
            Azure the resource endpoint).
        api_key: the API key or token (``None``: no key is sent; a server that needs one answers 401).
        account_id: Cloudflare account id (ignored by the others).
        kind: the deployment type (default: ``name``, for the built-in deployments).
        api_version: Azure's ``api-version``.
        azure_deployments: Azure model -> deployment id.
        max_tokens_field: OpenAI-format body field for ``max_tokens``.

    Returns:
        An object implementing ``ProviderAdapter``.

    Raises:
        ValueError: for an unknown type, or ``azure_openai`` without ``api_version``.
    """
    match kind or name:
        case "openai" | "azure_openai" | "openai_compatible" as flavor:
            return OpenAIAdapter(
                base_url,
                api_key,
                name=name,
                flavor=flavor,
                api_version=api_version,
                azure_deployments=azure_deployments,
                max_tokens_field=max_tokens_field,
            )
        case "anthropic":
            return AnthropicAdapter(base_url, api_key, name=name)
        case "cloudflare":
            return CloudflareAdapter(base_url, api_key, account_id, name=name)
        case other:
            raise ValueError(f"unknown provider type {other!r}; expected one of {', '.join(ADAPTER_TYPES)}")


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
