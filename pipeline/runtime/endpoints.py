"""Where each deployment's calls go: real API, emulator, or nowhere (DESIGN A7 emulator rule, A10).

* ``emulate`` (``--emulate``, ``AIPIPE_EMULATE=1``): every deployment points at
  the emulator; the built-in three at its root paths, every other one under
  ``/d/<name>`` in its type's wire format.
* A deployment whose credentials are set is called at its ``base_url``.
* A deployment that needs no key (``openai_compatible`` without
  ``api_key_env``: a local vLLM, Ollama or LM Studio server) is called as
  configured, never replaced by the emulator.
* A built-in deployment (``openai``, ``anthropic``, ``cloudflare``) with no key:
  in ``development`` it points at the emulator (one log line); in
  ``production`` it is disabled (one log line).
* Any other deployment whose key variable is unset: in ``production`` aipipe
  refuses to start, naming the variable; in ``development`` it is disabled
  with one log line.

Keys come from the variable each deployment names in ``api_key_env``, else
its type's usual variable (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``,
``CLOUDFLARE_API_TOKEN``, ``AZURE_OPENAI_API_KEY``, the official SDKs'
names); ``openai_compatible`` has none by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from pipeline.runtime.config import (
    BUILTIN_DEPLOYMENTS,
    DEFAULT_AZURE_API_VERSION,
    PipelineConfig,
    ProviderConfig,
)
from pipeline.runtime.settings import (
    DEFAULT_ANTHROPIC_BASE_URL,
    DEFAULT_CLOUDFLARE_BASE_URL,
    DEFAULT_OPENAI_BASE_URL,
    ProviderEndpoint,
    Secret,
    Settings,
)

log = logging.getLogger("aipipe.endpoints")

#: The key sent to the emulator, which accepts any non-empty key.
EMULATOR_KEY = "emulator-key"
EMULATOR_ACCOUNT = "emulator-account"

#: The variable a deployment's key is read from when it names none (the official SDKs' variables).
DEFAULT_KEY_ENV: dict[str, str | None] = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "cloudflare": "CLOUDFLARE_API_TOKEN",
    "azure_openai": "AZURE_OPENAI_API_KEY",
    "openai_compatible": None,
}
#: The official API root of each type that has one (``base_url`` is required for the others).
DEFAULT_BASE_URL: dict[str, str] = {
    "openai": DEFAULT_OPENAI_BASE_URL,
    "anthropic": DEFAULT_ANTHROPIC_BASE_URL,
    "cloudflare": DEFAULT_CLOUDFLARE_BASE_URL,
}


class MissingCredentials(ValueError):
    """A deployment's key variable is unset in ``production`` (the message names the variable, never a value)."""


def emulator_endpoints(url: str) -> dict[str, ProviderEndpoint]:
    """Endpoints of the three built-in deployments on the emulator at ``url`` (SDK base-URL conventions)."""
    return {name: emulator_endpoint(url, name, name) for name in BUILTIN_DEPLOYMENTS}


def emulator_endpoint(url: str, name: str, kind: str, cfg: ProviderConfig | None = None) -> ProviderEndpoint:
    """Deployment ``name`` of type ``kind`` on the emulator at ``url``.

    The built-in deployments use the emulator's root paths (``/v1``,
    ``/client/v4``); every other deployment gets its own path prefix
    ``/d/<name>`` so its calls, faults and counts are its own.
    """
    base = url.rstrip("/")
    root = base if name in BUILTIN_DEPLOYMENTS and kind == name else f"{base}/d/{name}"
    key = Secret(EMULATOR_KEY)
    if kind in ("openai", "openai_compatible"):
        return ProviderEndpoint(f"{root}/v1", key)
    if kind == "azure_openai":
        version = (cfg.api_version if cfg is not None else None) or DEFAULT_AZURE_API_VERSION
        return ProviderEndpoint(root, key, api_version=version)
    if kind == "cloudflare":
        return ProviderEndpoint(f"{root}/client/v4", key, EMULATOR_ACCOUNT)
    return ProviderEndpoint(root, key)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The configuration with unusable deployments disabled, and each deployment's endpoint.

    ``emulated`` names the deployments pointed at the emulator.
    """

    config: PipelineConfig
    endpoints: dict[str, ProviderEndpoint]
    emulated: frozenset[str]

    @property
    def needs_emulator(self) -> bool:
        """Whether some enabled deployment talks to the emulator."""
        return bool(self.emulated)


def _configured(settings: Settings, name: str, kind: str, cfg: ProviderConfig) -> tuple[ProviderEndpoint, str | None]:
    """The real endpoint of a deployment, and the variable that is missing for it (``None``: nothing missing)."""
    builtin = name in BUILTIN_DEPLOYMENTS and kind == name
    env_default = settings.endpoint(name) if builtin else None
    base_url = cfg.base_url or (env_default.base_url if env_default else DEFAULT_BASE_URL.get(kind, ""))
    key_var = cfg.api_key_env
    if key_var is not None:
        key = settings.env_vars.secret(key_var)
    elif env_default is not None:
        key, key_var = env_default.api_key, DEFAULT_KEY_ENV[kind]
    else:
        key_var = DEFAULT_KEY_ENV[kind]
        key = settings.env_vars.secret(key_var) if key_var else None
    account = None
    if kind == "cloudflare":
        if cfg.account_id_env is not None:
            account = settings.env_vars.text(cfg.account_id_env)
        elif env_default is not None:
            account = env_default.account_id
        else:
            account = settings.env_vars.text("CLOUDFLARE_ACCOUNT_ID")
    version = (cfg.api_version or DEFAULT_AZURE_API_VERSION) if kind == "azure_openai" else None
    endpoint = ProviderEndpoint(base_url.rstrip("/"), key, account, api_version=version)
    missing = None
    if key_var is not None and key is None:
        missing = key_var
    elif kind == "cloudflare" and not account:
        missing = cfg.account_id_env or "CLOUDFLARE_ACCOUNT_ID"
    return endpoint, missing


def resolve_endpoints(
    settings: Settings, config: PipelineConfig, emulator_url: str | None, *, quiet: bool = False
) -> Resolved:
    """Apply the emulator rule and find each enabled deployment's endpoint (module docstring).

    ``emulator_url`` may be ``None`` until the emulator is started: deployments
    pointed at an emulator get a placeholder URL (call again once it is known;
    ``quiet`` leaves the log lines to that second call).

    Raises:
        MissingCredentials: in ``production``, for a deployment other than the
            built-in three whose key variable is unset.
    """
    emulator = emulator_url or settings.emulator_url or "http://emulator.invalid"
    endpoints: dict[str, ProviderEndpoint] = {}
    emulated: set[str] = set()
    providers = dict(config.providers)
    for name, cfg in config.providers.items():
        if not cfg.enabled:
            continue
        kind = config.type_of(name)
        if settings.emulate:
            endpoints[name] = emulator_endpoint(emulator, name, kind, cfg)
            emulated.add(name)
            continue
        endpoint, missing = _configured(settings, name, kind, cfg)
        if missing is None:
            endpoints[name] = endpoint
        elif name in BUILTIN_DEPLOYMENTS and kind == name and settings.env_name == "development":
            if not quiet:
                log.info("provider %s has no API key (%s): pointing it at the emulator (development)", name, missing)
            endpoints[name] = emulator_endpoint(emulator, name, kind, cfg)
            emulated.add(name)
        elif name in BUILTIN_DEPLOYMENTS and kind == name and cfg.api_key_env is None:
            if not quiet:
                log.warning(
                    "provider %s has no API key: disabled (production never uses the emulator implicitly)", name
                )
            providers[name] = msgspec.structs.replace(cfg, enabled=False)
        elif settings.env_name == "production":
            raise MissingCredentials(
                f"deployment `{name}`: environment variable {missing} is not set "
                "(set it, or disable the deployment with enabled = false)"
            )
        else:
            if not quiet:
                log.warning("deployment %s: environment variable %s is not set: disabled (development)", name, missing)
            providers[name] = msgspec.structs.replace(cfg, enabled=False)
    return Resolved(config.with_providers(providers), endpoints, frozenset(emulated))
