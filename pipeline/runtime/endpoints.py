"""Where each provider's calls go: real API, emulator, or nowhere (DESIGN A7 emulator rule).

* ``emulate``: every provider points at the emulator.
* ``development``: a provider with no key points at the emulator (one log line).
* ``production``: a provider with no key is disabled (one log line); the
  emulator is never used implicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.settings import ProviderEndpoint, Secret, Settings

log = logging.getLogger("aipipe.endpoints")

#: The key sent to the emulator, which accepts any non-empty key.
EMULATOR_KEY = "emulator-key"
EMULATOR_ACCOUNT = "emulator-account"


def emulator_endpoints(url: str) -> dict[str, ProviderEndpoint]:
    """Endpoints of the three providers on the emulator at ``url`` (SDK base-URL conventions)."""
    base = url.rstrip("/")
    key = Secret(EMULATOR_KEY)
    return {
        "openai": ProviderEndpoint(f"{base}/v1", key),
        "anthropic": ProviderEndpoint(base, key),
        "cloudflare": ProviderEndpoint(f"{base}/client/v4", key, EMULATOR_ACCOUNT),
    }


@dataclass(frozen=True, slots=True)
class Resolved:
    """The configuration with unusable providers disabled, and each provider's endpoint.

    ``emulated`` names the providers pointed at the emulator.
    """

    config: PipelineConfig
    endpoints: dict[str, ProviderEndpoint]
    emulated: frozenset[str]

    @property
    def needs_emulator(self) -> bool:
        """Whether some enabled provider talks to the emulator."""
        return bool(self.emulated)


def resolve_endpoints(settings: Settings, config: PipelineConfig, emulator_url: str | None) -> Resolved:
    """Apply the emulator rule; ``emulator_url`` may be ``None`` until the emulator is started.

    Providers pointed at an emulator get the placeholder URL ``emulator_url``
    (or ``""`` when not yet known; call again once it is).
    """
    emu = emulator_endpoints(emulator_url or settings.emulator_url or "http://emulator.invalid")
    endpoints: dict[str, ProviderEndpoint] = {}
    emulated: set[str] = set()
    providers = dict(config.providers)
    for name, provider in config.providers.items():
        if not provider.enabled:
            continue
        if settings.emulate:
            endpoints[name] = emu[name]
            emulated.add(name)
        elif settings.has_key(name):
            endpoints[name] = settings.endpoint(name)
        elif settings.env_name == "development":
            log.info("provider %s has no API key: pointing it at the emulator (development)", name)
            endpoints[name] = emu[name]
            emulated.add(name)
        else:
            log.warning("provider %s has no API key: disabled (production never uses the emulator implicitly)", name)
            providers[name] = msgspec.structs.replace(provider, enabled=False)
    return Resolved(config.with_providers(providers), endpoints, frozenset(emulated))
