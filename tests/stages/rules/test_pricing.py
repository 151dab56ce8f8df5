"""Unit tests for stages.rules.pricing: the cost formula, lookups, defaults and the packaged price table."""

from __future__ import annotations

import logging
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.response import Usage
from stages.rules.pricing import (
    Costing,
    Price,
    PriceTable,
    normalize_model,
    round_usd,
    worst_case_cost,
)

# $2 input / $0.50 cached input / $8 output per million tokens.
PRICE = Price(
    input=Decimal("2"),
    output=Decimal("8"),
    cached_input=Decimal("0.50"),
    source="https://example.test/pricing",
    as_of=date(2025, 1, 1),
)


def _table(**entries: dict[str, object]) -> PriceTable:
    return PriceTable.from_mapping({"acme": entries}, origin="test")


def _entry(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "usd_per_mtok_input": "2",
        "usd_per_mtok_cached_input": "0.50",
        "usd_per_mtok_output": "8",
        "source": "https://example.test/pricing",
        "as_of": "2025-01-01",
    }
    base.update(fields)
    return base


# -- the formula -------------------------------------------------------------------------------------


def test_openai_style_cached_usage_costs_exactly() -> None:
    usage = Usage(prompt_tokens=1000, cached_prompt_tokens=800, completion_tokens=500, total_tokens=1500)
    # 200 * 2 + 800 * 0.50 + 500 * 8 = 4800 USD per million tokens
    assert PRICE.cost(usage) == Decimal("0.0048")
    assert isinstance(PRICE.cost(usage), Decimal)


def test_anthropic_style_cache_read_costs_the_same() -> None:
    # Anthropic reports input_tokens=200, cache_read_input_tokens=800, output_tokens=500;
    # the adapter folds them into prompt_tokens=1000 (all prompt tokens), cached_prompt_tokens=800.
    input_tokens, cache_read, output_tokens = 200, 800, 500
    usage = Usage(
        prompt_tokens=input_tokens + cache_read,
        cached_prompt_tokens=cache_read,
        completion_tokens=output_tokens,
        total_tokens=input_tokens + cache_read + output_tokens,
    )
    table = _table(model=_entry())
    assert table.cost("acme", "model", usage, default_cost_per_token=None) == Costing(
        Decimal("0.0048"), "table"
    )


def test_cache_write_is_priced_at_the_cache_write_rate() -> None:
    price = Price(
        input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.30"), cache_write=Decimal("3.75")
    )
    # Anthropic: input_tokens=400, cache_creation_input_tokens=600, cache_read_input_tokens=0
    usage = Usage(prompt_tokens=1000, cache_creation_prompt_tokens=600, completion_tokens=100)
    # 400 * 3 + 600 * 3.75 + 100 * 15 = 1200 + 2250 + 1500 = 4950
    assert price.cost(usage) == Decimal("0.00495")


def test_cache_reads_and_writes_fall_back_to_input_price() -> None:
    price = Price(input=Decimal("0.5"), output=Decimal("1.5"))
    usage = Usage(
        prompt_tokens=1000, cached_prompt_tokens=300, cache_creation_prompt_tokens=200, completion_tokens=1000
    )
    assert price.cost(usage) == Decimal("0.002")  # 1000 * 0.5 + 1000 * 1.5 = 2000


def test_uncached_prompt_tokens_never_go_negative() -> None:
    # Inconsistent report: more cached tokens than prompt tokens. Charge what was reported, no credit.
    usage = Usage(prompt_tokens=100, cached_prompt_tokens=800, completion_tokens=0)
    assert PRICE.cost(usage) == Decimal("0.0004")  # 800 * 0.50 only


def test_zero_usage_costs_zero() -> None:
    assert PRICE.cost(Usage()) == 0


# -- unlisted models -----------------------------------------------------------------------------------


def test_missing_model_uses_default_cost_per_token(caplog: pytest.LogCaptureFixture) -> None:
    table = _table(model=_entry())
    usage = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500)
    with caplog.at_level(logging.WARNING, logger="stages.rules.pricing"):
        first = table.cost("acme", "brand-new-model", usage, default_cost_per_token=Decimal("0.000002"))
        second = table.cost("acme", "brand-new-model", usage, default_cost_per_token=Decimal("0.000002"))
    assert first == second == Costing(Decimal("0.003"), "default")
    assert first.price_source == "default"
    assert first.cost_usd > 0
    warnings = [r for r in caplog.records if "brand-new-model" in r.getMessage()]
    assert len(warnings) == 1  # once per (provider, model)


def test_missing_model_without_default_costs_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    table = _table(model=_entry())
    with caplog.at_level(logging.WARNING, logger="stages.rules.pricing"):
        costing = table.cost("other", "x", Usage(prompt_tokens=10, completion_tokens=10))
    assert costing == Costing(Decimal(0), "none")
    assert any("no default_cost_per_token" in r.getMessage() for r in caplog.records)


def test_negative_default_is_rejected() -> None:
    with pytest.raises(ValueError, match="default_cost_per_token"):
        _table().cost("acme", "x", Usage(prompt_tokens=1), default_cost_per_token=Decimal("-1"))


# -- model names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("gpt-4o", "gpt-4o"),
        ("@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.1-8b-instruct"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo-0125"),  # 4-digit suffixes are not dates here
    ],
)
def test_normalize_model(given: str, expected: str) -> None:
    assert normalize_model(given) == expected


def test_dated_suffix_falls_back_to_the_undated_entry() -> None:
    table = _table(**{"gpt-4o-mini": _entry(usd_per_mtok_input="0.15")})
    price = table.lookup("acme", "gpt-4o-mini-2024-07-18")
    assert price is not None and price.input == Decimal("0.15")
    assert table.resolve("acme", "gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert table.lookup("acme", "gpt-4o") is None


def test_exact_entry_wins_over_the_normalized_one() -> None:
    table = _table(
        **{
            "m": _entry(usd_per_mtok_input="1"),
            "m-2025-01-01": _entry(usd_per_mtok_input="9"),
        }
    )
    exact = table.lookup("acme", "m-2025-01-01")
    assert exact is not None and exact.input == Decimal("9")


def test_aliases_resolve_to_their_model() -> None:
    table = _table(m=_entry(aliases=["m-latest"]))
    assert table.resolve("acme", "m-latest") == "m"


# -- publishing and reservations ------------------------------------------------------------------------


def test_round_usd_ten_places_half_even() -> None:
    assert round_usd(Decimal("0.0048")) == 0.0048
    assert round_usd(Decimal("0.00000000005")) == 0.0  # tie rounds to even (0)
    assert round_usd(Decimal("0.00000000015")) == 0.0000000002  # tie rounds to even (2)
    assert round_usd(Decimal("0.000000000151")) == 0.0000000002
    assert round_usd(Decimal("1.23456789012345")) == 1.2345678901
    assert isinstance(round_usd(Decimal("1")), float)


def test_worst_case_cost() -> None:
    # 1000 prompt tokens at $2 + 500 completion tokens at $8
    assert worst_case_cost(PRICE, 1000, 500) == Decimal("0.006")
    anthropic = Price(input=Decimal("3"), output=Decimal("15"), cache_write=Decimal("3.75"))
    assert worst_case_cost(anthropic, 1000, 0) == Decimal("0.00375")  # a prompt may be a cache write
    with pytest.raises(ValueError, match="max_tokens"):
        worst_case_cost(PRICE, 1, -1)


# -- the packaged table ---------------------------------------------------------------------------------


def test_packaged_table_loads_with_sources_and_dates() -> None:
    table = PriceTable.load()
    assert len(table) >= 17
    for provider, model, price in table.items():
        assert price.source.startswith("https://"), (provider, model)
        assert isinstance(price.as_of, date), (provider, model)
        assert price.input >= 0 and price.output > 0, (provider, model)


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2024-07-18"),
        ("openai", "gpt-4.1"),
        ("openai", "gpt-4.1-mini"),
        ("openai", "gpt-4.1-nano"),
        ("openai", "gpt-3.5-turbo"),
        ("anthropic", "claude-3-5-haiku-20241022"),
        ("anthropic", "claude-3-haiku-20240307"),
        ("anthropic", "claude-3-5-sonnet-20241022"),
        ("anthropic", "claude-sonnet-4-20250514"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-haiku-4-5-20251001"),
        ("anthropic", "claude-opus-4-1"),
        ("cloudflare", "@cf/meta/llama-3.1-8b-instruct"),
        ("cloudflare", "@cf/meta/llama-3.2-3b-instruct"),
        ("cloudflare", "@cf/meta/llama-3.3-70b-instruct-fp8-fast"),
        ("cloudflare", "@cf/mistral/mistral-7b-instruct-v0.1"),
    ],
)
def test_packaged_table_covers_the_models_the_pipeline_uses(provider: str, model: str) -> None:
    assert PriceTable.load().lookup(provider, model) is not None


def test_packaged_prices_match_the_provider_pages() -> None:
    table = PriceTable.load()
    sonnet = table.lookup("anthropic", "claude-sonnet-4-20250514")
    assert sonnet == Price(
        input=Decimal("3"),
        output=Decimal("15"),
        cached_input=Decimal("0.30"),
        cache_write=Decimal("3.75"),
        source=sonnet.source if sonnet else "",
        as_of=sonnet.as_of if sonnet else None,
    )
    # Cloudflare: 25,608 Neurons per M input tokens at $0.011 per 1,000 Neurons
    llama = table.lookup("cloudflare", "@cf/meta/llama-3.1-8b-instruct")
    assert llama is not None
    assert llama.input == Decimal(25608) * Decimal("0.011") / 1000
    assert llama.cached_input is None and llama.cache_write is None


def test_load_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[acme."m"]\nusd_per_mtok_input = 1.5\nusd_per_mtok_output = 2\n'
        'source = "https://example.test"\nas_of = 2025-01-01\n',
        encoding="utf-8",
    )
    price = PriceTable.load(path).lookup("acme", "m")
    assert price is not None and price.input == Decimal("1.5") and price.as_of == date(2025, 1, 1)


# -- malformed tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            '[acme."m"]\nusd_per_mtok_input = "cheap"\nusd_per_mtok_output = 1\n'
            'source = "https://x"\nas_of = 2025-01-01\n',
            "usd_per_mtok_input",
        ),
        (
            '[acme."m"]\nusd_per_mtok_input = -1\nusd_per_mtok_output = 1\n'
            'source = "https://x"\nas_of = 2025-01-01\n',
            "usd_per_mtok_input",
        ),
        (
            '[acme."m"]\nusd_per_mtok_input = 1\nsource = "https://x"\nas_of = 2025-01-01\n',
            "usd_per_mtok_output",
        ),
        (
            '[acme."m"]\nusd_per_mtok_input = 1\nusd_per_mtok_ouptut = 1\n'
            'source = "https://x"\nas_of = 2025-01-01\n',
            "usd_per_mtok_ouptut",
        ),
        ('[acme."m"]\nusd_per_mtok_input = 1\nusd_per_mtok_output = 1\nas_of = 2025-01-01\n', "source"),
        ('[acme."m"]\nusd_per_mtok_input = 1\nusd_per_mtok_output = 1\nsource = "https://x"\n', "as_of"),
        (
            '[acme."m"]\nusd_per_mtok_input = 1\nusd_per_mtok_output = 1\nsource = "https://x"\n'
            'as_of = "last week"\n',
            "as_of",
        ),
        (
            '[acme."m"]\nneurons_per_mtok_input = 1000\nneurons_per_mtok_output = 1000\n'
            "usd_per_1k_neurons = 0.011\nusd_per_mtok_input = 0.02\n"
            'source = "https://x"\nas_of = 2025-01-01\n',
            "usd_per_mtok_input",
        ),
        (
            '[acme."m"]\nneurons_per_mtok_input = 1000\nsource = "https://x"\nas_of = 2025-01-01\n',
            "neurons_per_mtok_output",
        ),
    ],
)
def test_malformed_entry_names_the_key(toml: str, key: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        PriceTable.loads(toml, origin="bad.toml")
    assert "bad.toml" in str(info.value)
    assert 'acme."m"' in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[acme\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.toml"):
        PriceTable.load(path)


def test_provider_must_be_a_table() -> None:
    with pytest.raises(ValueError, match="acme"):
        PriceTable.from_mapping({"acme": 3})


def test_neuron_prices_are_derived_when_usd_is_omitted() -> None:
    table = PriceTable.from_mapping(
        {
            "cloudflare": {
                "@cf/x": {
                    "neurons_per_mtok_input": 10000,
                    "neurons_per_mtok_output": 17300,
                    "usd_per_1k_neurons": "0.011",
                    "source": "https://developers.cloudflare.com/workers-ai/platform/pricing/",
                    "as_of": date(2025, 1, 1),
                }
            }
        }
    )
    price = table.lookup("cloudflare", "@cf/x")
    assert price is not None
    assert (price.input, price.output) == (Decimal("0.11"), Decimal("0.1903"))
