"""Configuration: presets, the seed's camelCase aliases, errors that name the bad key."""

from __future__ import annotations

import pytest

from pipeline.runtime.config import config_from_mapping, preset

# --- configuration ----------------------------------------------------------------------------

def test_presets_and_seed_camel_case_aliases() -> None:
    dev = preset("development")
    assert set(dev.enabled_providers()) == {"cloudflare", "openai"}
    assert set(preset("production").enabled_providers()) == {"cloudflare", "openai", "anthropic"}
    cfg = config_from_mapping(
        {"providers": {"openai": {"retryAttempts": 5, "retryDelay": 200, "timeout": 1000,
                                  "rateLimit": {"requestsPerMinute": 60}, "costPerToken": 0.00001}}},
        base=dev,
    )
    openai = cfg.providers["openai"]
    assert (openai.retry.max_attempts, openai.retry.base_delay_ms, openai.timeout_ms) == (5, 200, 1000)
    assert openai.rate_limit.requests_per_minute == 60 and openai.cost_per_token == 0.00001
    with pytest.raises(ValueError, match=r"providers\.openai\.priority"):
        config_from_mapping({"providers": {"openai": {"priority": "high"}}}, base=dev)
    with pytest.raises(ValueError, match="unknown field `bogus`"):
        config_from_mapping({"providers": {"anthropic": {"bogus": 1}}}, base=dev)
    with pytest.raises(ValueError, match="unknown provider"):
        config_from_mapping({"providers": {"mistral": {}}}, base=dev)
    with pytest.raises(ValueError, match="unknown environment"):
        preset("staging")
