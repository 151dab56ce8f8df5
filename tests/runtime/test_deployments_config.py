"""Deployments in the configuration (DESIGN A10): parsing, validation errors that name the key, endpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline.runtime.config import config_from_mapping, load_config_file, preset
from pipeline.runtime.endpoints import MissingCredentials, resolve_endpoints
from pipeline.runtime.settings import Settings

KEYS = {"OPENAI_A_KEY": "sk-a-aaaaaaaaaaaaaaaaaaaa", "OPENAI_B_KEY": "sk-b-bbbbbbbbbbbbbbbbbbbb", "AZ_KEY": "az-key-1"}

DEPLOYMENTS: dict[str, Any] = {
    "openai-a": {"type": "openai", "api_key_env": "OPENAI_A_KEY", "models": ["gpt-4o-mini"]},
    "openai-eu": {
        "type": "openai",
        "base_url": "https://eu.api.openai.com/v1",
        "api_key_env": "OPENAI_B_KEY",
        "models": ["gpt-4o-mini"],
        "priority": 2,
    },
    "azure-eu": {
        "type": "azure_openai",
        "base_url": "https://contoso.openai.azure.com",
        "api_key_env": "AZ_KEY",
        "api_version": "2024-10-21",
        "azure_deployments": {"gpt-4o-mini": "mini-eu"},
        "models": ["gpt-4o-mini"],
    },
    "local-llama": {
        "type": "openai_compatible",
        "base_url": "http://127.0.0.1:11434/v1",
        "models": ["llama3.1:8b"],
        "context_window": 131072,
        "capabilities": ["tools", "streaming"],
        "prices": {"input_per_mtok": 0.0, "output_per_mtok": 0.0},
    },
}


def config(**extra: Any) -> Any:
    return config_from_mapping({"deployments": DEPLOYMENTS, **extra}, base=preset("production"))


def test_deployments_join_the_builtin_three_and_keep_their_settings() -> None:
    cfg = config(model_groups={"chat-small": {"openai-a": "gpt-4o-mini", "local-llama": "llama3.1:8b"}})
    assert set(cfg.providers) == {"openai", "anthropic", "cloudflare", *DEPLOYMENTS}
    assert cfg.deployments is cfg.providers
    assert [cfg.type_of(n) for n in ("openai", "openai-a", "azure-eu", "local-llama")] == [
        "openai",
        "openai",
        "azure_openai",
        "openai_compatible",
    ]
    eu = cfg.providers["openai-eu"]
    assert (eu.priority, eu.base_url, eu.api_key_env) == (2, "https://eu.api.openai.com/v1", "OPENAI_B_KEY")
    local = cfg.providers["local-llama"]
    assert local.context_window == 131072 and local.prices is not None and local.prices.output_per_mtok == 0
    # model groups merge with the preset's groups, and keep deployment names as written
    assert cfg.model_groups["chat-small"]["local-llama"] == "llama3.1:8b"
    assert cfg.model_groups["chat-small"]["openai"] == "gpt-4o-mini"


def test_an_old_style_configuration_is_unchanged() -> None:
    old = config_from_mapping({"providers": {"openai": {"priority": 5, "retryAttempts": 2}}}, base=preset("production"))
    assert set(old.providers) == {"openai", "anthropic", "cloudflare"}
    assert old.providers["openai"].priority == 5 and old.providers["openai"].retry.max_attempts == 2
    assert old.type_of("openai") == "openai" and old.providers["openai"].type is None


def test_weights_and_camel_case_deployment_names_are_kept_as_written() -> None:
    cfg = config_from_mapping(
        {
            "deployments": {"openaiEu": {"type": "openai", "models": ["gpt-4o-mini"]}},
            "model_groups": {"eu": {"openaiEu": "gpt-4o-mini"}},
            "strategy": "weighted",
            "weights": {"openaiEu": 3, "openai": 1},
        },
        base=preset("production"),
    )
    assert cfg.weights == {"openaiEu": 3, "openai": 1}
    assert cfg.model_groups["eu"] == {"openaiEu": "gpt-4o-mini"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"deployments": {"global": {"type": "openai"}}}, "`global` is reserved"),
        ({"deployments": {"*": {"type": "openai"}}}, "`*` is reserved"),
        ({"deployments": {"user:bob": {"type": "openai"}}}, "`user:bob` is reserved"),
        ({"deployments": {"bad name": {"type": "openai"}}}, "must be 1-64 letters"),
        ({"deployments": {"x": {"type": "gemini"}}}, "at `$.deployments.x.type`"),
        ({"deployments": {"x": {"models": ["m"]}}}, "unknown provider `x`"),
        ({"deployments": {"x": {"type": "openai_compatible"}}}, "`deployments.x.base_url` is required"),
        ({"deployments": {"x": {"type": "azure_openai"}}}, "`deployments.x.base_url` is required"),
        ({"deployments": {"x": {"type": "openai", "base_url": "ftp://h"}}}, "http:// or https://"),
        ({"deployments": {"x": {"type": "openai", "api_version": "2024-10-21"}}}, "`azure_openai` only"),
        ({"deployments": {"x": {"type": "openai", "bogus": 1}}}, "unknown field `bogus` - at `$.deployments.x`"),
        ({"deployments": {"x": {"type": "openai", "prices": {"input_per_mtok": -1, "output_per_mtok": 1}}}}, ">= 0"),
        ({"model_groups": {"g": {"nowhere": "m"}}}, "model group `g` names unknown deployment `nowhere`"),
        ({"strategy": "weighted", "weights": {"nowhere": 1}}, "weight for unknown provider 'nowhere'"),
        (
            {"providers": {"dup": {"type": "openai"}}, "deployments": {"dup": {"type": "openai"}}},
            "deployment `dup` is defined twice ([providers.dup] and [deployments.dup])",
        ),
        ({"deployments": {"openai": {"type": "anthropic"}}}, "`deployments.openai.type` must be `openai`"),
        ({"deployments": {"EU": {"type": "openai"}, "eu": {"type": "openai"}}}, "differ only in case"),
        ({"deployments": {"x": {"type": "gemini"}}}, "(one of openai, azure_openai, anthropic"),
        (
            {
                "deployments": {"eu": {"type": "openai", "models": ["gpt-4o-mini"]}},
                "model_groups": {"g": {"eu": "gpt-4o"}},
            },
            "`model_groups.g.eu` is `gpt-4o`, which deployment `eu` does not list in its models",
        ),
    ],
)
def test_each_invalid_deployment_is_a_clear_error_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        config_from_mapping(data, base=preset("production"))


def test_a_key_pasted_into_api_key_env_is_refused_without_being_echoed() -> None:
    secret = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX"
    with pytest.raises(ValueError) as caught:
        config_from_mapping({"deployments": {"x": {"type": "openai", "api_key_env": secret}}})
    assert "must be the name of an environment variable" in str(caught.value)
    assert secret not in str(caught.value)


def test_a_toml_file_with_deployments_and_a_table_given_twice(tmp_path: Path) -> None:
    good = tmp_path / "ok.toml"
    good.write_text(
        '[deployments.local]\ntype = "openai_compatible"\nbase_url = "http://127.0.0.1:8001/v1"\n'
        'models = ["qwen2.5"]\n[deployments.local.prices]\ninput_per_mtok = 0.1\noutput_per_mtok = 0.2\n',
        encoding="utf-8",
    )
    cfg = load_config_file(good, base=preset("development"))
    assert cfg.providers["local"].prices is not None and cfg.providers["local"].prices.output_per_mtok == 0.2
    twice = tmp_path / "twice.toml"
    twice.write_text('[deployments.a]\ntype = "openai"\n[deployments.a]\ntype = "openai"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config_file(twice)


# --- endpoints --------------------------------------------------------------------------------------


def settings(env_name: str, **env: str) -> Settings:
    return Settings.from_env(env, env_name=env_name)


def test_endpoints_come_from_each_deployments_own_variables() -> None:
    resolved = resolve_endpoints(settings("production", **KEYS), config(), None)
    eps = resolved.endpoints
    assert eps["openai-a"].base_url == "https://api.openai.com/v1"
    assert eps["openai-a"].api_key is not None and eps["openai-a"].api_key.reveal() == KEYS["OPENAI_A_KEY"]
    assert eps["openai-eu"].base_url == "https://eu.api.openai.com/v1"
    assert (
        eps["azure-eu"].api_version == "2024-10-21" and eps["azure-eu"].base_url == "https://contoso.openai.azure.com"
    )
    # a local server without api_key_env is called as configured, never the emulator, even in production
    assert eps["local-llama"].base_url == "http://127.0.0.1:11434/v1" and eps["local-llama"].api_key is None
    assert "local-llama" not in resolved.emulated
    # built-in deployments without keys: disabled in production, as before
    assert not resolved.config.providers["openai"].enabled and "openai" not in eps
    assert KEYS["OPENAI_A_KEY"] not in repr(resolved)
    assert KEYS["OPENAI_A_KEY"] not in repr(settings("production", **KEYS))


def test_an_unset_key_variable_stops_production_and_disables_in_development(caplog: pytest.LogCaptureFixture) -> None:
    partial = {k: v for k, v in KEYS.items() if k != "AZ_KEY"}
    with pytest.raises(MissingCredentials, match="deployment `azure-eu`: environment variable AZ_KEY is not set"):
        resolve_endpoints(settings("production", **partial), config(), None)
    with caplog.at_level(logging.WARNING, logger="aipipe.endpoints"):
        resolved = resolve_endpoints(settings("development", **partial), config(), None)
    assert not resolved.config.providers["azure-eu"].enabled and "azure-eu" not in resolved.endpoints
    assert any("azure-eu" in r.getMessage() and "AZ_KEY" in r.getMessage() for r in caplog.records)
    # the development emulator rule still covers the three built-in deployments only
    assert {"openai", "cloudflare"} <= resolved.emulated and "azure-eu" not in resolved.emulated


def test_emulate_points_every_deployment_at_its_own_emulator_path() -> None:
    resolved = resolve_endpoints(settings("production", AIPIPE_EMULATE="1"), config(), "http://127.0.0.1:9")
    eps = resolved.endpoints
    assert eps["openai"].base_url == "http://127.0.0.1:9/v1"
    assert eps["openai-a"].base_url == "http://127.0.0.1:9/d/openai-a/v1"
    assert eps["azure-eu"].base_url == "http://127.0.0.1:9/d/azure-eu"
    assert eps["local-llama"].base_url == "http://127.0.0.1:9/d/local-llama/v1"
    assert resolved.emulated == frozenset(eps)
