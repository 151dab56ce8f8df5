"""Per-deployment facts over the shared tables (DESIGN A10): prices, context windows, candidates."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from pipeline.runtime.config import config_from_mapping, preset
from schemas.envelope import Candidate
from schemas.request import AIRequest
from schemas.response import Usage
from stages.rules.catalog import deployment_model_info, model_info
from stages.rules.pricing import PriceTable
from stages.rules.routing import resolve

CONFIG = config_from_mapping(
    {
        "deployments": {
            "openai-b": {"type": "openai", "models": ["gpt-4o-mini"]},
            "azure-eu": {"type": "azure_openai", "base_url": "https://x.openai.azure.com", "models": ["gpt-4o-mini"]},
            "router": {"type": "openai_compatible", "base_url": "http://h/v1", "models": ["gpt-4o-mini", "mystery"]},
            "local": {
                "type": "openai_compatible",
                "base_url": "http://127.0.0.1:11434/v1",
                "models": ["llama3.1:8b"],
                "context_window": 8192,
                "prices": {"input_per_mtok": 0, "output_per_mtok": 0},
            },
            "tiny": {"type": "openai_compatible", "base_url": "http://h/v1", "models": ["m"], "context_window": 2048},
            "openai-priced": {
                "type": "openai",
                "models": ["gpt-4o-mini"],
                "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "cached_input_per_mtok": 0.5},
            },
        },
        "model_groups": {
            "mini": {"openai": "gpt-4o-mini", "local": "llama3.1:8b"},
            "tinyg": {"openai": "gpt-4o-mini", "tiny": "m"},
        },
    },
    base=preset("production"),
)
USAGE = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, total_tokens=2_000_000)


def test_a_deployment_of_a_type_is_priced_from_its_types_section() -> None:
    table = PriceTable.load()
    prices = table.with_deployments(CONFIG)
    openai = table.cost("openai", "gpt-4o-mini", USAGE)
    for name in ("openai-b", "azure-eu", "router"):  # azure: OpenAI's section; a router: any section by model name
        assert prices.cost(name, "gpt-4o-mini-2024-07-18", USAGE) == openai
    assert prices.cost("openai", "gpt-4o-mini", USAGE) == openai  # the built-in deployment is unchanged


def test_a_deployments_own_prices_win_over_the_table_and_a_local_one_can_be_free() -> None:
    prices = PriceTable.load().with_deployments(CONFIG)
    own = prices.cost("openai-priced", "gpt-4o-mini", Usage(prompt_tokens=1_000_000, cached_prompt_tokens=500_000))
    assert own.price_source == "deployment" and own.cost_usd == Decimal("0.75")  # 0.5 M x $1 + 0.5 M x $0.5
    free = prices.cost("local", "llama3.1:8b", USAGE, default_cost_per_token=Decimal("0.001"))
    assert (free.cost_usd, free.price_source) == (Decimal(0), "deployment")
    assert prices.lookup("local", "anything") is not None


def test_an_unlisted_model_falls_back_to_cost_per_token_flagged_default() -> None:
    prices = PriceTable.load().with_deployments(CONFIG)
    costing = prices.cost("router", "mystery", USAGE, default_cost_per_token=Decimal("0.000002"))
    assert costing.price_source == "default" and costing.cost_usd == Decimal("4.000000")


def test_context_window_of_a_deployment_wins_over_the_catalog() -> None:
    local = deployment_model_info(CONFIG, "local", "llama3.1:8b")
    assert local is not None and (local.context_window, local.max_output_tokens) == (8192, 8192)
    azure = deployment_model_info(CONFIG, "azure-eu", "gpt-4o-mini")
    assert azure == model_info("openai", "gpt-4o-mini")
    assert deployment_model_info(CONFIG, "router", "mystery") is None


def req(**kw: Any) -> AIRequest:
    return msgspec.convert({"id": "r", "prompt": "hi", **kw}, AIRequest)


def test_model_groups_and_allow_lists_name_deployments() -> None:
    res = resolve(CONFIG, req(model="mini", max_tokens=100))
    assert [c.provider for c in res.candidates] == ["openai", "local"]
    only = resolve(CONFIG, req(model="gpt-4o-mini", providers=["azure-eu", "openai-b"]))
    assert only.candidates == [
        Candidate(provider="azure-eu", model="gpt-4o-mini"),
        Candidate(provider="openai-b", model="gpt-4o-mini"),
    ]
    unknown = resolve(CONFIG, req(model="gpt-4o-mini", providers=["nowhere"]))
    assert unknown.error_type == "invalid_request" and "known deployments" in (unknown.message or "")
    # a deployment's window caps its output: 3,000 tokens fit the cloud model only
    big = resolve(CONFIG, req(model="tinyg", max_tokens=3000))
    assert [c.provider for c in big.candidates] == ["openai"]
    assert [c.provider for c in resolve(CONFIG, req(model="tinyg", max_tokens=1000)).candidates] == ["openai", "tiny"]
