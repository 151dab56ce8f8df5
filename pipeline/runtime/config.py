"""Configuration: deployments (DESIGN A10), the seed's fields, DESIGN A8's names, presets and TOML files.

A configuration is a frozen ``PipelineConfig``. ``preset("development")`` and
``preset("production")`` give the built-in ones; ``load_config_file(path)``
reads a TOML file (``AIPIPE_CONFIG``) on top of a preset and validates it,
naming the bad key in the error. The seed's camelCase names
(``maxTokensPerRequest``, ``costPerToken``, ``rateLimit.requestsPerMinute``,
``retryAttempts``, ``retryDelay``, ``timeout``...) are accepted as aliases.

Deployments: every provider is a deployment, one named endpoint of one wire
format (``type``). The three built-in deployments ``openai``, ``anthropic`` and
``cloudflare`` are configured under ``[providers.<name>]`` (or
``[deployments.<name>]``) exactly as before; any number more are added under
``[deployments.<name>]`` with ``type``, ``base_url``, ``api_key_env`` and every
setting a provider has. ``PipelineConfig.providers`` holds them all, keyed by
deployment name; that name is the ``provider`` of every event.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

#: The built-in deployments: each is also the name of its type and has its own environment variables (DESIGN A7).
PROVIDER_NAMES: tuple[str, ...] = ("openai", "anthropic", "cloudflare")
BUILTIN_DEPLOYMENTS = PROVIDER_NAMES

#: Wire formats a deployment may speak (DESIGN A10).
DeploymentType = Literal["openai", "azure_openai", "anthropic", "cloudflare", "openai_compatible"]
DEPLOYMENT_TYPES: tuple[str, ...] = DeploymentType.__args__  # type: ignore[attr-defined]
#: Scope names of the budget ledger that no deployment may take (DESIGN A10).
RESERVED_NAMES = frozenset({"global", "*"})
#: A deployment name: it becomes a Kafka key, a Redis key part, a metrics label and a URL path segment.
DEPLOYMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Azure OpenAI data-plane inference API version used when a deployment names none (latest GA,
#: https://learn.microsoft.com/azure/ai-services/openai/reference, read 2026-12-06).
DEFAULT_AZURE_API_VERSION = "2024-10-21"

#: The strategy names (DESIGN A5), in the order the README lists them.
STRATEGY_NAMES: tuple[str, ...] = ("round_robin", "weighted", "least_latency", "cost_optimized", "priority")


def normalize_strategy_name(name: str) -> str:
    """The canonical strategy name for ``name``.

    Accepts the names of ``STRATEGY_NAMES``, the seed's kebab-case type names
    (``"cost-optimized"``, ``"round-robin"``, ``"least-latency"``) and its
    camelCase constant names (``"costOptimized"``).

    Raises:
        ValueError: for any other name, listing the known ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"strategy name must be a string, got {type(name).__name__}")
    camel_split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip()).lower()
    canonical = camel_split.replace("-", "_").replace(" ", "_")
    if canonical not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGY_NAMES)})")
    return canonical


def validate_weights(weights: Mapping[str, Any], known: Iterable[str] | None = None) -> dict[str, float]:
    """Check a ``{provider: weight}`` mapping and return it with float weights.

    Weights are relative (they need not sum to 1) and must be finite numbers
    >= 0 with at least one > 0.

    Args:
        weights: deployment name -> weight.
        known: deployment names allowed (``None``: any name).

    Raises:
        ValueError: naming the bad provider or weight.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of provider to weight, got {type(weights).__name__}")
    allowed = set(known) if known is not None else None
    out: dict[str, float] = {}
    for provider, raw in weights.items():
        if allowed is not None and provider not in allowed:
            known = ", ".join(sorted(allowed))
            raise ValueError(f"weight for unknown provider {provider!r} (known deployments: {known})")
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"weight of {provider} must be a number, got {raw!r}")
        value = float(raw)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of {provider} must be a finite number >= 0, got {raw!r}")
        out[provider] = value
    if out and not any(v > 0 for v in out.values()):
        raise ValueError("at least one weight must be > 0 (weight 0 means never chosen)")
    return out


Pos = Annotated[int, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


class RetryPolicy(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Retries on one provider (DESIGN A8); delays in ms, full jitter.

    ``max_attempts`` counts every call to one provider for one request, the first included.
    ``fallback_reserve_ms``: time kept from each attempt for one attempt of the next untried
    candidate (``None``: that candidate's observed p95 latency, at least 2 s).
    """

    max_attempts: Pos = 3
    base_delay_ms: Annotated[int, Meta(ge=0)] = 1000
    max_delay_ms: Annotated[int, Meta(ge=0)] = 30_000
    backoff_multiplier: Annotated[float, Meta(ge=1)] = 2.0
    retryable_errors: tuple[str, ...] = ("rate_limit", "server_error", "timeout")
    fallback_reserve_ms: Annotated[int, Meta(ge=0)] | None = None


class BreakerPolicy(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Circuit breaker thresholds (DESIGN A8); times in s, rates as fractions 0..1."""

    failure_threshold: Pos = 5
    error_rate_threshold: Annotated[float, Meta(gt=0, le=1)] = 0.5
    window_s: Annotated[float, Meta(gt=0)] = 60.0
    min_requests: Pos = 10
    cool_off_s: Annotated[float, Meta(gt=0)] = 30.0
    max_cool_off_s: Annotated[float, Meta(gt=0)] = 300.0
    success_threshold: Pos = 2


class RateLimit(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Per-provider limits: requests and tokens per minute (``None``: unlimited)."""

    requests_per_minute: Pos | None = None
    tokens_per_minute: Pos | None = None


class DeploymentPrices(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A deployment's own prices, USD per million tokens; they win over the price table for all its models.

    ``cached_input_per_mtok`` and ``cache_write_per_mtok`` default to ``input_per_mtok``.
    """

    input_per_mtok: NonNegFloat
    output_per_mtok: NonNegFloat
    cached_input_per_mtok: NonNegFloat | None = None
    cache_write_per_mtok: NonNegFloat | None = None


class ProviderConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One deployment's settings (the seed's ``ProviderConfig`` with DESIGN A8's and A10's names).

    ``priority``: lower is preferred. ``cost_per_token``: USD per token, used
    only for models missing from the price table. ``timeout_ms``: limit of one
    attempt (one HTTP call, ms). ``models``: concrete models this deployment
    serves. ``max_tokens_per_request``: largest ``max_tokens`` it accepts.

    Where and how to call it (DESIGN A10): ``type`` (the wire format; a
    built-in deployment's type is its name), ``base_url`` (the API root in
    its SDK's convention; built-ins default to their ``*_BASE_URL`` variable,
    the other types of the official API's root), ``api_key_env`` (the name of
    the environment variable holding the key, never the key),
    ``account_id_env`` (Cloudflare's account id variable), ``api_version`` and
    ``azure_deployments`` (Azure: the ``api-version`` query parameter, and
    model -> Azure deployment id, default the model name),
    ``max_tokens_field`` (the body field that carries ``max_tokens``; default
    per type). Facts that win over the shared tables: ``context_window``
    (tokens, every model of the deployment), ``prices``.
    ``first_chunk_timeout_ms``: for a streamed request, how long (ms) to wait
    for the first content delta; it replaces ``timeout_ms`` until then (DESIGN A9).
    """

    enabled: bool = True
    priority: int = 1
    max_tokens_per_request: Pos = 4096
    cost_per_token: NonNegFloat = 0.000002
    rate_limit: RateLimit = RateLimit()
    timeout_ms: Pos = 30_000
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    models: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ("text-generation", "chat")
    type: DeploymentType | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    account_id_env: str | None = None
    api_version: str | None = None
    azure_deployments: dict[str, str] = {}
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    context_window: Pos | None = None
    prices: DeploymentPrices | None = None
    first_chunk_timeout_ms: Pos = 10_000


class CacheConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Response cache: ``max_size`` entries (LRU), ``default_ttl_s`` (s), compression above a size (bytes)."""

    enabled: bool = True
    max_size: Pos = 1000
    default_ttl_s: Pos = 3600
    compression_threshold_bytes: Annotated[int, Meta(ge=0)] = 1024
    enable_compression: bool = True


class BudgetConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Budget defaults: the ``global`` daily limit (USD, ``None``: unlimited) and the window time zone.

    ``fail_mode``: what the budget gate does when its shared store (Redis) is
    down and a request counts toward a scope that has a limit: ``closed``
    (default) refuses it with ``service_unavailable`` until the store is back;
    ``open`` admits it unreserved (spend is settled once the store answers
    again). Requests whose scopes have no limit are admitted either way.
    """

    global_daily_usd: NonNegFloat | None = None
    timezone: str = "UTC"
    fail_mode: Literal["closed", "open"] = "closed"


class HealthConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Health monitor and breaker timing (the ``health`` and ``breaker`` stages); times in s and ms.

    ``interval_s``: period of the active probe of every enabled provider (0:
    no periodic probes; the first round comes one interval after start).
    ``half_open_interval_s``: pause between probes of a ``HALF_OPEN`` provider.
    ``probe_timeout_ms``: limit of one probe. ``probe_models``: provider ->
    model to probe (default: the provider's first ``models`` entry, its
    cheapest in the presets). ``status_window_s``: sliding window of
    ``HealthStatus`` (error rate, average response time).
    ``snapshot_interval_s``: period of the breaker's ``circuit_snapshot``.
    """

    interval_s: Annotated[float, Meta(ge=0)] = 60.0
    half_open_interval_s: Annotated[float, Meta(gt=0)] = 2.0
    probe_timeout_ms: Pos = 10_000
    probe_models: dict[str, str] = {}
    status_window_s: Annotated[float, Meta(gt=0)] = 300.0
    snapshot_interval_s: Annotated[float, Meta(gt=0)] = 30.0

    def probe_result_deadline_s(self) -> float:
        """How long (s) the breaker waits in ``HALF_OPEN`` for a decisive probe result before re-opening.

        One probe's timeout plus the pause between probes plus 5 s for the bus.
        """
        return self.probe_timeout_ms / 1000 + self.half_open_interval_s + 5.0


class StreamConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Streaming (DESIGN A9), ``[stream]``; times in ms.

    ``flush_ms``: the first delta is published at once, later ones are
    coalesced into one chunk for at most this long. ``idle_timeout_ms``: the
    longest gap between deltas once the first has come (then the stream is
    interrupted). ``max_duration_ms``: the longest a stream may run (``None``:
    the request's ``timeout_ms``). ``resume``: the default of a request's
    ``stream_resume`` (continue an interrupted answer on the next candidate).
    """

    flush_ms: Annotated[int, Meta(ge=0, le=10_000)] = 20
    idle_timeout_ms: Pos = 30_000
    max_duration_ms: Pos | None = None
    resume: bool = False


class ImagesConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Images (DESIGN A4), ``[images]``: ``max_bytes``, the largest image a request may carry (decoded bytes).

    Default 20 MiB, OpenAI's documented per-image limit
    (https://platform.openai.com/docs/guides/images-vision, read 2026-12-06).
    """

    max_bytes: Pos = 20 * 1024 * 1024


#: The topics the archive stage archives by default (short names, DESIGN A11).
ARCHIVE_TOPICS: tuple[str, ...] = ("requests", "responses", "control", "costs", "deadletter")
#: Topics the archive may be told to archive (``archive.topics``).
ARCHIVABLE_TOPICS: tuple[str, ...] = (*ARCHIVE_TOPICS, "stream")
#: Default archive retention per topic (days): prompts 90, the ledger and control 400 (DESIGN A11).
ARCHIVE_RETENTION_DAYS: dict[str, int] = {
    "requests": 90,
    "responses": 90,
    "deadletter": 90,
    "stream": 90,
    "control": 400,
    "costs": 400,
}


class ArchiveConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The archive (DESIGN A11), ``[archive]``.

    ``enabled``: whether ``aipipe run`` runs the archive stage by default.
    ``flush_ms``: longest time an archived record waits before it is written
    and fsynced (ms); the archive commits its offsets only after that.
    ``topics``: short names of the topics archived. ``retention_days``: days
    kept per topic (merged over the defaults: 90 for requests, responses,
    dead letters and streams, which hold prompts; 400 for costs and control).
    ``restore``: whether ``aipipe run`` restores the compact state into a new
    embedded broker (``--no-restore`` turns it off once).
    """

    enabled: bool = True
    flush_ms: Annotated[int, Meta(ge=1, le=60_000)] = 200
    topics: list[str] = msgspec.field(default_factory=lambda: list(ARCHIVE_TOPICS))
    retention_days: dict[str, Annotated[int, Meta(ge=1)]] = {}
    restore: bool = True

    def __post_init__(self) -> None:
        """Check topic names.

        Raises:
            ValueError: for a topic name the archive does not know.
        """
        for name in (*self.topics, *self.retention_days):
            if name not in ARCHIVABLE_TOPICS:
                raise ValueError(f"`archive`: unknown topic {name!r}; one of: {', '.join(ARCHIVABLE_TOPICS)}")

    def retention(self) -> dict[str, int]:
        """Days kept per short topic name: the defaults with ``retention_days`` on top."""
        return {**ARCHIVE_RETENTION_DAYS, **self.retention_days}


class BrokerConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The embedded broker's rotation (DESIGN A11), ``[broker]``.

    The embedded broker keeps every record in memory and slows down as its
    topics grow (``EMBEDDED-BROKER.md``: fetches crawl at about 100,000
    records), so ``aipipe run`` moves to a fresh one when a topic passes
    ``rotate_records`` records or the broker's resident memory passes
    ``max_memory_mb`` (MiB); 0 turns that trigger off. ``check_interval_s``:
    how often both are checked (s). Default 20,000 records, not 50,000: with
    the archive reading five topics too, ``bench/soak.py`` measured the broker
    at 120 % CPU and throughput down from 345 to 106 requests/s by 45,000
    requests, but still 326 at 20,000.
    """

    rotate_records: Annotated[int, Meta(ge=0)] = 20_000
    max_memory_mb: Annotated[int, Meta(ge=0)] = 2048
    check_interval_s: Annotated[float, Meta(gt=0)] = 5.0


class PipelineConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The whole configuration: deployments, model groups, routing strategy, cache, budgets.

    ``providers`` maps each deployment name to its settings (the built-in
    three and those of ``[deployments.<name>]``). ``model_groups`` maps a
    logical model name to one concrete model per deployment, e.g.
    ``{"gpt-3.5-turbo": {"openai": "gpt-3.5-turbo", "anthropic":
    "claude-3-5-haiku-20241022"}}``.
    """

    environment: Literal["development", "production", "custom"] = "custom"
    providers: dict[str, ProviderConfig] = {}
    model_groups: dict[str, dict[str, str]] = {}
    strategy: str = "priority"
    weights: dict[str, float] = {}
    cache: CacheConfig = CacheConfig()
    budget: BudgetConfig = BudgetConfig()
    allow_content_filter_fallback: bool = False
    health: HealthConfig = HealthConfig()
    stream: StreamConfig = StreamConfig()
    images: ImagesConfig = ImagesConfig()
    archive: ArchiveConfig = ArchiveConfig()
    broker: BrokerConfig = BrokerConfig()

    def __post_init__(self) -> None:
        """Check cross-field rules.

        Raises:
            ValueError: naming the key, for a reserved or malformed deployment
                name, a deployment without a ``type`` (other than the
                built-ins) or without the ``base_url`` its type needs, a
                model group naming an unknown deployment, or an unknown
                strategy or weights for unknown deployments.
        """
        folded: dict[str, str] = {}
        for name, cfg in self.providers.items():
            check_deployment(name, cfg)
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise ValueError(f"deployments `{other}` and `{name}` differ only in case: give one another name")
        for group, members in self.model_groups.items():
            for provider, model in members.items():
                if provider not in self.providers:
                    raise ValueError(
                        f"model group `{group}` names unknown deployment `{provider}`"
                        f" (known: {', '.join(sorted(self.providers))})"
                    )
                served = self.providers[provider].models
                if served and model not in served:
                    raise ValueError(
                        f"`model_groups.{group}.{provider}` is `{model}`, which deployment `{provider}` "
                        f"does not list in its models ({', '.join(served)})"
                    )
        try:
            normalize_strategy_name(self.strategy)
            validate_weights(self.weights, self.providers)
        except ValueError as exc:
            raise ValueError(f"`strategy`/`weights`: {exc}") from exc

    @property
    def deployments(self) -> dict[str, ProviderConfig]:
        """Every deployment by name (the same mapping as ``providers``)."""
        return self.providers

    def type_of(self, name: str) -> str:
        """The wire format of deployment ``name`` (``openai``, ``azure_openai``, ...).

        Raises:
            KeyError: for a name that is not a deployment.
        """
        return deployment_type(name, self.providers[name])

    def enabled_providers(self) -> dict[str, ProviderConfig]:
        """The providers with ``enabled = true``."""
        return {n: p for n, p in self.providers.items() if p.enabled}

    def probe_model(self, provider: str) -> str | None:
        """The model the health monitor probes ``provider`` with (``health.probe_models``, else its first model)."""
        configured = self.health.probe_models.get(provider)
        if configured:
            return configured
        cfg = self.providers.get(provider)
        return cfg.models[0] if cfg is not None and cfg.models else None

    def with_providers(self, providers: dict[str, ProviderConfig]) -> PipelineConfig:
        """A copy with ``providers`` replaced."""
        return msgspec.structs.replace(self, providers=providers)


def deployment_type(name: str, cfg: ProviderConfig) -> str:
    """The wire format of deployment ``name``: its ``type``, else its name for a built-in one.

    Raises:
        ValueError: for a deployment that is not built in and has no ``type``.
    """
    if cfg.type is not None:
        return cfg.type
    if name in BUILTIN_DEPLOYMENTS:
        return name
    raise ValueError(
        f"unknown provider `{name}`: a deployment other than {', '.join(BUILTIN_DEPLOYMENTS)} "
        f"needs a `type` (one of {', '.join(DEPLOYMENT_TYPES)})"
    )


def check_name(name: str) -> str:
    """Return ``name`` when it can name a deployment.

    Raises:
        ValueError: for ``global``, ``*``, a ``user:`` name (budget scopes, DESIGN A10) or a name
            outside ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.
    """
    if name in RESERVED_NAMES or name.startswith("user:"):
        raise ValueError(f"deployment name `{name}` is reserved (`global`, `*` and `user:...` are budget scopes)")
    if not DEPLOYMENT_NAME.match(name):
        raise ValueError(
            f"deployment name `{name}` must be 1-64 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        )
    return name


def check_deployment(name: str, cfg: ProviderConfig) -> None:
    """Check one deployment's own rules (DESIGN A10).

    Raises:
        ValueError: naming the key, for a bad name, a missing ``type`` or ``base_url``, a
            ``base_url`` that is not http(s), or a setting its type does not take.
    """
    check_name(name)
    kind = deployment_type(name, cfg)
    where = f"deployments.{name}"
    if name in BUILTIN_DEPLOYMENTS and kind != name:
        raise ValueError(
            f"`{where}.type` must be `{name}`: the built-in deployment `{name}` speaks its own wire format "
            f"(name another deployment to use type `{kind}`)"
        )
    if kind in ("azure_openai", "openai_compatible") and not cfg.base_url:
        raise ValueError(f"`{where}.base_url` is required for type `{kind}`")
    if cfg.base_url is not None and not re.match(r"^https?://[^/\s]+", cfg.base_url):
        raise ValueError(f"`{where}.base_url` must be an http:// or https:// URL, got {cfg.base_url!r}")
    if kind != "azure_openai" and (cfg.api_version is not None or cfg.azure_deployments):
        raise ValueError(f"`{where}`: `api_version` and `azure_deployments` apply to type `azure_openai` only")
    if kind != "cloudflare" and cfg.account_id_env is not None:
        raise ValueError(f"`{where}.account_id_env` applies to type `cloudflare` only")
    for field in ("api_key_env", "account_id_env"):
        var = getattr(cfg, field)
        if var is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", var):
            # never echo the value: a key pasted here by mistake must not reach a log
            raise ValueError(f"`{where}.{field}` must be the name of an environment variable (A-Z, 0-9, _), not a key")


_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-3.5-turbo")
_ANTHROPIC_MODELS = (
    "claude-3-5-haiku-20241022",
    "claude-3-haiku-20240307",
    "claude-3-5-sonnet-20241022",
    "claude-sonnet-4-20250514",
)
_CLOUDFLARE_MODELS = (
    "@cf/meta/llama-3.1-8b-instruct",
    "@cf/meta/llama-3.2-3b-instruct",
    "@cf/meta/llama-3.3-70b-instruct-fp8-fast",
    "@cf/mistral/mistral-7b-instruct-v0.1",
)

DEFAULT_MODEL_GROUPS: dict[str, dict[str, str]] = {
    # The seed's example model: served by each provider's small, cheap model.
    "gpt-3.5-turbo": {
        "openai": "gpt-3.5-turbo",
        "anthropic": "claude-3-5-haiku-20241022",
        "cloudflare": "@cf/meta/llama-3.1-8b-instruct",
    },
    "chat-small": {
        "openai": "gpt-4o-mini",
        "anthropic": "claude-3-5-haiku-20241022",
        "cloudflare": "@cf/meta/llama-3.1-8b-instruct",
    },
    "chat-large": {
        "openai": "gpt-4o",
        "anthropic": "claude-sonnet-4-20250514",
        "cloudflare": "@cf/meta/llama-3.3-70b-instruct-fp8-fast",
    },
}


def preset(env_name: str) -> PipelineConfig:
    """The built-in configuration for ``development`` or ``production``.

    development: conservative limits (60 RPM, 40,000 TPM, 1,024 max tokens per
    request), two providers (Cloudflare, OpenAI), a $5 global daily budget.
    production: higher limits, all three providers, no global budget by default.

    Raises:
        ValueError: for any other name.
    """
    if env_name == "development":
        limits = RateLimit(requests_per_minute=60, tokens_per_minute=40_000)
        return PipelineConfig(
            environment="development",
            providers={
                "cloudflare": ProviderConfig(
                    priority=1,
                    max_tokens_per_request=1024,
                    cost_per_token=0.0000003,
                    rate_limit=limits,
                    timeout_ms=20_000,
                    models=_CLOUDFLARE_MODELS,
                ),
                "openai": ProviderConfig(
                    priority=2,
                    max_tokens_per_request=1024,
                    cost_per_token=0.000002,
                    rate_limit=limits,
                    timeout_ms=20_000,
                    models=_OPENAI_MODELS,
                ),
                "anthropic": ProviderConfig(
                    enabled=False,
                    priority=3,
                    max_tokens_per_request=1024,
                    cost_per_token=0.000004,
                    rate_limit=limits,
                    timeout_ms=20_000,
                    models=_ANTHROPIC_MODELS,
                ),
            },
            model_groups=DEFAULT_MODEL_GROUPS,
            budget=BudgetConfig(global_daily_usd=5.0),
        )
    if env_name == "production":
        return PipelineConfig(
            environment="production",
            providers={
                "cloudflare": ProviderConfig(
                    priority=1,
                    max_tokens_per_request=4096,
                    cost_per_token=0.0000003,
                    rate_limit=RateLimit(requests_per_minute=300, tokens_per_minute=300_000),
                    models=_CLOUDFLARE_MODELS,
                ),
                "openai": ProviderConfig(
                    priority=2,
                    max_tokens_per_request=4096,
                    cost_per_token=0.000002,
                    rate_limit=RateLimit(requests_per_minute=3500, tokens_per_minute=2_000_000),
                    models=_OPENAI_MODELS,
                ),
                "anthropic": ProviderConfig(
                    priority=3,
                    max_tokens_per_request=4096,
                    cost_per_token=0.000004,
                    rate_limit=RateLimit(requests_per_minute=1000, tokens_per_minute=400_000),
                    models=_ANTHROPIC_MODELS,
                ),
            },
            model_groups=DEFAULT_MODEL_GROUPS,
        )
    raise ValueError(f"unknown environment {env_name!r}: use 'development' or 'production'")


# The seed's camelCase names and their DESIGN A8 paths (relative to a provider).
_PROVIDER_ALIASES: dict[str, tuple[str, ...]] = {
    "retryAttempts": ("retry", "max_attempts"),
    "maxAttempts": ("retry", "max_attempts"),
    "retryDelay": ("retry", "base_delay_ms"),
    "timeout": ("timeout_ms",),
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _normalize_keys(value: Any, *, provider_level: bool = False) -> Any:
    """CamelCase keys -> snake_case, recursively; the seed's provider aliases -> DESIGN A8 paths."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if provider_level and key in _PROVIDER_ALIASES:
            path = _PROVIDER_ALIASES[key]
            target = out
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = item
            continue
        snake = _snake(key) if key.isidentifier() else key
        # tables keyed by names (deployments, models, groups) keep their keys as written
        child = dict(item) if snake in _NAME_KEYED and isinstance(item, dict) else _normalize_keys(item)
        if isinstance(child, dict) and snake in out and isinstance(out[snake], dict):
            out[snake].update(child)
        else:
            out[snake] = child
    return out


#: Tables whose keys are names (of deployments, models or groups), never camelCase field names.
_NAME_KEYED = frozenset({"model_groups", "weights", "probe_models", "azure_deployments"})


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


def config_from_mapping(data: Mapping[str, Any], *, base: PipelineConfig | None = None) -> PipelineConfig:
    """Validate a configuration mapping (TOML-shaped), layered on ``base`` when given.

    Raises:
        ValueError: naming the bad key, e.g. ``Expected `int`, got `str` - at
            `$.providers.openai.priority```.
    """
    raw = dict(data)
    providers = raw.pop("providers", None)
    deployments = raw.pop("deployments", None)
    normalized = dict(_normalize_keys(raw))
    section: dict[str, str] = {}  # deployment name -> the table it was given in, for error paths
    for table, entries in (("providers", providers), ("deployments", deployments)):
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"invalid configuration: `{table}` must be a table of deployments")
        merged = normalized.setdefault("providers", {})
        for name, cfg in entries.items():
            if name in section:
                raise ValueError(
                    f"invalid configuration: deployment `{name}` is defined twice "
                    f"([{section[name]}.{name}] and [{table}.{name}])"
                )
            section[name] = table
            merged[name] = _normalize_keys(dict(cfg), provider_level=True) if isinstance(cfg, dict) else cfg
    if base is not None:
        normalized = _merge(msgspec.to_builtins(base), normalized)
        normalized["environment"] = "custom" if data else base.environment
    for name, cfg in (normalized.get("providers") or {}).items():
        table = section.get(name, "providers")
        try:
            checked = msgspec.convert(cfg, ProviderConfig)
            check_deployment(name, checked)
        except msgspec.ValidationError as exc:
            where = str(exc).replace("`$", f"`$.{table}.{name}")
            if "- at" not in where:
                where = f"{where} - at `$.{table}.{name}`"
            if where.endswith(".type`"):
                where = f"{where} (one of {', '.join(DEPLOYMENT_TYPES)})"
            raise ValueError(f"invalid configuration: {where}") from exc
        except ValueError as exc:
            raise ValueError(f"invalid configuration: {exc}".replace("`deployments.", f"`{table}.")) from exc
    try:
        return msgspec.convert(normalized, PipelineConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid configuration: {exc}") from exc


def load_config_file(path: Path, *, base: PipelineConfig | None = None) -> PipelineConfig:
    """Read and validate a TOML configuration file (``AIPIPE_CONFIG``).

    Raises:
        ValueError: when the file is missing or unreadable, not TOML, or a key is unknown
            or invalid; the message names the file.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"configuration file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read the configuration file {path}: {reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"configuration file {path} is not valid TOML: {exc}") from exc
    try:
        return config_from_mapping(data, base=base)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
