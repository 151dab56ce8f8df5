"""Model catalog: context window and output limit per provider model (tokens).

Facts read on 2026-11-29 from the providers' model pages:

* OpenAI, https://platform.openai.com/docs/models (one page per model, e.g.
  https://platform.openai.com/docs/models/gpt-4o,
  https://platform.openai.com/docs/models/gpt-4.1,
  https://platform.openai.com/docs/models/gpt-3.5-turbo): "Context window" and
  "Max output tokens".
* Anthropic, https://docs.anthropic.com/en/docs/about-claude/models/overview
  ("Context window" and "Max output" rows; aliases such as ``claude-haiku-4-5``
  point at the dated id listed next to them).
* Cloudflare Workers AI, https://developers.cloudflare.com/workers-ai/models/
  (each model page's "Context Window" row, e.g.
  https://developers.cloudflare.com/workers-ai/models/llama-3.1-8b-instruct/ ,
  .../llama-3.3-70b-instruct-fp8-fast/ , .../mistral-7b-instruct-v0.1/).
  Workers AI documents no output cap separate from the context window (the
  ``max_tokens`` input only defaults to 256), so ``max_output_tokens`` is the
  context window for those models. There is no ``llama-3.1-8b-instruct-fp8-fast``
  model id in the Workers AI catalog; the ``-fp8`` and ``-fast`` variants are
  listed instead.

Capabilities (DESIGN A4), read 2026-12-06: ``tools`` (function calling),
``vision`` (image input), ``json_schema`` (an answer held to a JSON Schema),
``streaming``, and ``image_urls`` (the API takes an https image URL; without
it the image bytes must be sent):

* OpenAI: every model above takes tools and streams
  (https://platform.openai.com/docs/guides/function-calling); image input on
  gpt-4o, gpt-4o-mini, gpt-4.1* and gpt-4-turbo, by URL or base64
  (https://platform.openai.com/docs/guides/images-vision); Structured Outputs
  (``response_format: json_schema``) on gpt-4o-2024-08-06 and later, gpt-4o-mini
  and gpt-4.1*, not on gpt-4-turbo or gpt-3.5-turbo
  (https://platform.openai.com/docs/guides/structured-outputs#supported-models).
* Anthropic: every Claude 3 and later model takes tools, images (base64 and
  URL sources) and streams (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview,
  https://docs.anthropic.com/en/docs/build-with-claude/vision); a JSON Schema
  answer is obtained by forcing a tool whose ``input_schema`` is the schema
  (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use#json-mode).
* Workers AI: no ``tool_choice`` is documented, so a request that forces a
  tool call (``required`` or a named function) skips its models;
  traditional function calling on the models the function-calling
  page names (https://developers.cloudflare.com/workers-ai/features/function-calling/traditional/:
  hermes-2-pro-mistral-7b, llama-3.3-70b-instruct-fp8-fast, llama-4-scout);
  JSON Mode on the models listed at
  https://developers.cloudflare.com/workers-ai/features/json-mode/ ; image input
  on llama-3.2-11b-vision-instruct and llama-4-scout-17b-16e-instruct, as bytes
  only (a base64 ``data:`` URI; no URL fetching), per their model pages.

A model the catalog does not list is assumed able (never skipped for a
capability): an ``openai_compatible`` deployment's server knows its models.

The catalog is consulted by the executor (does a fallback candidate's window fit
the prompt?) and by the emulator (which models exist, and their limits).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from pipeline.runtime.config import PipelineConfig
from schemas.request import AIRequest

OPENAI_MODELS_URL = "https://platform.openai.com/docs/models"
ANTHROPIC_MODELS_URL = "https://docs.anthropic.com/en/docs/about-claude/models/overview"
CLOUDFLARE_MODELS_URL = "https://developers.cloudflare.com/workers-ai/models/"
#: Day the limits below were read from the pages above (ISO 8601).
CATALOG_READ_ON = "2026-11-29"


class ModelInfo(Struct, kw_only=True, frozen=True):
    """Limits of one provider model.

    ``context_window`` is the most tokens prompt plus output may use (tokens);
    ``max_output_tokens`` the most tokens one answer may have (tokens);
    ``source`` the page the numbers come from.
    """

    provider: str
    model: str
    context_window: Annotated[int, Meta(gt=0)]
    max_output_tokens: Annotated[int, Meta(gt=0)]
    source: str
    tools: bool = True
    vision: bool = False
    json_schema: bool = False
    streaming: bool = True
    image_urls: bool = False
    tool_choice: bool = True

    def lacks(self, needs: frozenset[str], *, image_urls: bool = False) -> str | None:
        """The first capability of ``needs`` this model lacks (``None``: it has them all).

        ``image_urls`` is true when the request holds an https image URL, which a
        model taking image bytes only cannot use (aipipe never fetches URLs);
        that lack is reported as ``"image_urls"``.
        """
        for capability in ("tools", "tool_choice", "vision", "json_schema", "streaming"):
            if capability in needs and not getattr(self, capability):
                return capability
        if image_urls and "vision" in needs and not self.image_urls:
            return "image_urls"
        return None


#: The capabilities a model may have (DESIGN A4), in the order they are checked.
CAPABILITIES: tuple[str, ...] = ("tools", "vision", "json_schema", "streaming")

_VISION_URL = {"vision": True, "image_urls": True}
_ALL = {"tools": True, "vision": True, "json_schema": True, "image_urls": True}
#: Per-model capabilities that differ from the defaults (tools, streaming; no vision, no json_schema).
_CAPABILITIES: dict[str, dict[str, dict[str, bool]]] = {
    "openai": {
        **{m: _ALL for m in ("gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "gpt-4o-mini-2024-07-18")},
        **{m: _ALL for m in ("gpt-4.1", "gpt-4.1-2025-04-14", "gpt-4.1-mini", "gpt-4.1-mini-2025-04-14")},
        **{m: _ALL for m in ("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14")},
        "gpt-4-turbo": _VISION_URL,
    },
    "anthropic": {},  # every Claude model: _ALL (set below)
    "cloudflare": {
        "@cf/meta/llama-3.1-8b-instruct": {"tools": False, "json_schema": True},
        "@cf/meta/llama-3.1-8b-instruct-fp8": {"tools": False},
        "@cf/meta/llama-3.1-8b-instruct-fast": {"tools": False, "json_schema": True},
        "@cf/meta/llama-3.2-3b-instruct": {"tools": False},
        "@cf/meta/llama-3.3-70b-instruct-fp8-fast": {"tools": True, "json_schema": True},
        "@cf/mistral/mistral-7b-instruct-v0.1": {"tools": False},
        "@hf/nousresearch/hermes-2-pro-mistral-7b": {"tools": True},
        "@cf/meta/llama-3.2-11b-vision-instruct": {"tools": False, "vision": True},
        "@cf/meta/llama-4-scout-17b-16e-instruct": {"tools": True, "vision": True, "json_schema": True},
    },
}


def _entries(provider: str, source: str, rows: dict[str, tuple[int, int]]) -> dict[str, ModelInfo]:
    caps = _CAPABILITIES.get(provider, {})
    every = _ALL if provider == "anthropic" else {"tool_choice": False} if provider == "cloudflare" else {}
    return {
        model: ModelInfo(
            provider=provider,
            model=model,
            context_window=window,
            max_output_tokens=out,
            source=source,
            **{**every, **caps.get(model, {})},
        )
        for model, (window, out) in rows.items()
    }


_OPENAI: dict[str, tuple[int, int]] = {
    "gpt-4o": (128_000, 16_384),
    "gpt-4o-2024-08-06": (128_000, 16_384),
    "gpt-4o-mini": (128_000, 16_384),
    "gpt-4o-mini-2024-07-18": (128_000, 16_384),
    "gpt-4.1": (1_047_576, 32_768),
    "gpt-4.1-2025-04-14": (1_047_576, 32_768),
    "gpt-4.1-mini": (1_047_576, 32_768),
    "gpt-4.1-mini-2025-04-14": (1_047_576, 32_768),
    "gpt-4.1-nano": (1_047_576, 32_768),
    "gpt-4.1-nano-2025-04-14": (1_047_576, 32_768),
    "gpt-4-turbo": (128_000, 4_096),
    "gpt-3.5-turbo": (16_385, 4_096),
    "gpt-3.5-turbo-0125": (16_385, 4_096),
}

_ANTHROPIC: dict[str, tuple[int, int]] = {
    "claude-3-haiku-20240307": (200_000, 4_096),
    "claude-3-5-haiku-20241022": (200_000, 8_192),
    "claude-3-5-haiku-latest": (200_000, 8_192),
    "claude-3-5-sonnet-20241022": (200_000, 8_192),
    "claude-3-7-sonnet-20250219": (200_000, 64_000),
    "claude-3-7-sonnet-latest": (200_000, 64_000),
    "claude-sonnet-4-20250514": (200_000, 64_000),
    "claude-sonnet-4-0": (200_000, 64_000),
    "claude-sonnet-4-5-20250929": (200_000, 64_000),
    "claude-sonnet-4-5": (200_000, 64_000),
    "claude-haiku-4-5-20251001": (200_000, 64_000),
    "claude-haiku-4-5": (200_000, 64_000),
    "claude-opus-4-20250514": (200_000, 32_000),
    "claude-opus-4-0": (200_000, 32_000),
    "claude-opus-4-1-20250805": (200_000, 32_000),
    "claude-opus-4-1": (200_000, 32_000),
}

_CLOUDFLARE: dict[str, tuple[int, int]] = {
    "@cf/meta/llama-3.1-8b-instruct": (7_968, 7_968),
    "@cf/meta/llama-3.1-8b-instruct-fp8": (32_000, 32_000),
    "@cf/meta/llama-3.1-8b-instruct-fast": (128_000, 128_000),
    "@cf/meta/llama-3.2-3b-instruct": (128_000, 128_000),
    "@cf/meta/llama-3.3-70b-instruct-fp8-fast": (24_000, 24_000),
    "@cf/mistral/mistral-7b-instruct-v0.1": (2_824, 2_824),
    "@hf/nousresearch/hermes-2-pro-mistral-7b": (24_000, 24_000),
    "@cf/meta/llama-3.2-11b-vision-instruct": (128_000, 128_000),
    "@cf/meta/llama-4-scout-17b-16e-instruct": (131_000, 131_000),
}

_CATALOG: dict[str, dict[str, ModelInfo]] = {
    "openai": _entries("openai", OPENAI_MODELS_URL, _OPENAI),
    "anthropic": _entries("anthropic", ANTHROPIC_MODELS_URL, _ANTHROPIC),
    "cloudflare": _entries("cloudflare", CLOUDFLARE_MODELS_URL, _CLOUDFLARE),
}


def catalog_providers() -> list[str]:
    """Names of the providers the catalog knows (``openai``, ``anthropic``, ``cloudflare``)."""
    return list(_CATALOG)


def model_info(provider: str, model: str) -> ModelInfo | None:
    """Limits of ``model`` at ``provider``, or ``None`` when the catalog does not list it.

    Args:
        provider: ``"openai"``, ``"anthropic"`` or ``"cloudflare"``.
        model: the provider's model id, e.g. ``"gpt-4o-mini"``.

    Returns:
        A frozen ``ModelInfo`` (tokens), or ``None`` for an unknown provider or model.
    """
    return _CATALOG.get(provider, {}).get(model)


#: The catalog section each deployment type's models are looked up in (``None``: every section).
_SECTION_OF_TYPE: dict[str, str | None] = {
    "openai": "openai",
    "azure_openai": "openai",
    "anthropic": "anthropic",
    "cloudflare": "cloudflare",
    "openai_compatible": None,
}


def deployment_model_info(config: PipelineConfig, deployment: str, model: str) -> ModelInfo | None:
    """Limits of ``model`` at ``deployment`` (DESIGN A10): the deployment's ``context_window`` wins over the catalog.

    The catalog is searched in the deployment type's section (``azure_openai``
    in OpenAI's), an ``openai_compatible`` deployment's in every section by
    model name. A deployment's ``context_window`` replaces the window and caps
    the output limit (an unknown model's output limit is then the window).

    Returns:
        The limits (tokens), or ``None`` when neither the catalog nor the deployment says.
    """
    cfg = config.providers.get(deployment)
    if cfg is None:
        return model_info(deployment, model)
    section = _SECTION_OF_TYPE.get(config.type_of(deployment), deployment)
    sections = [section] if section is not None else list(_CATALOG)
    info = next((found for s in sections if (found := model_info(s, model)) is not None), None)
    if cfg.context_window is None:
        return info
    window = cfg.context_window
    if info is None:
        return ModelInfo(
            provider=deployment,
            model=model,
            context_window=window,
            max_output_tokens=window,
            source=f"the configuration of deployment {deployment}",
            **_ALL,
        )
    return msgspec.structs.replace(
        info,
        provider=deployment,
        context_window=window,
        max_output_tokens=min(info.max_output_tokens, window),
        source=f"the configuration of deployment {deployment}",
    )


def deployment_lacks(config: PipelineConfig, deployment: str, model: str, request: AIRequest) -> str | None:
    """The capability ``request`` needs that ``model`` at ``deployment`` lacks (``None``: it can serve it).

    A capability is lacking when the catalog marks the model without it
    (``ModelInfo.lacks``; an unlisted model lacks nothing), or when the
    deployment's ``capabilities`` setting (the seed's) names at least one of
    ``CAPABILITIES`` and not this one: a list such as the seed's default
    ``["text-generation", "chat"]`` restricts nothing. Returns ``"tools"``,
    ``"vision"``, ``"json_schema"``, ``"streaming"`` or ``"image_urls"``
    (an https image URL for a model that takes image bytes only).
    """
    needs = request.needs()
    if not needs:
        return None
    cfg = config.providers.get(deployment)
    if cfg is not None:
        named = set(cfg.capabilities) & set(CAPABILITIES)
        if named:
            for capability in CAPABILITIES:
                if capability in needs and capability not in named:
                    return capability
    info = deployment_model_info(config, deployment, model)
    if info is None:
        return None
    urls = any(image.url.startswith("https://") for m in request.messages or () for image in m.images())
    return info.lacks(needs, image_urls=urls)


def known_models(provider: str) -> list[str]:
    """Model ids the catalog lists for ``provider``, sorted; ``[]`` for an unknown provider."""
    return sorted(_CATALOG.get(provider, {}))


#: What each lacking capability means, for a skip's ``reason`` (``deployment_lacks``).
_LACK_TEXT: dict[str, str] = {
    "tools": "does not support tools (function calling)",
    "tool_choice": "cannot be made to call a tool (its API documents no tool_choice)",
    "vision": "does not take images (vision)",
    "json_schema": "does not support a json_schema response format",
    "streaming": "does not stream",
    "image_urls": "takes images as bytes only, and the request holds an https image URL (aipipe never fetches URLs)",
}


def capability_reason(model: str, lacking: str) -> str:
    """The reason of a capability skip, naming the capability: ``"gpt-3.5-turbo does not take images (vision)"``."""
    return f"{model} {_LACK_TEXT.get(lacking, f'lacks {lacking}')}"
