"""Load-balancing strategies as pure functions, with seeded randomness (issue 5)."""

from __future__ import annotations

import random
from collections import Counter, deque
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.client.manager import LOAD_BALANCING_STRATEGIES
from pipeline.runtime.config import STRATEGY_NAMES, ProviderConfig
from schemas.envelope import Candidate
from schemas.events import Health, SetStrategy
from stages.rules.pricing import PriceTable
from stages.rules.strategies import (
    CostOptimizedStrategy,
    LatencyTracker,
    LeastLatencyStrategy,
    PriorityStrategy,
    RoundRobinStrategy,
    RouteInfo,
    StrategySpec,
    StrategyState,
    WeightedStrategy,
    estimated_cost_usd,
    parse_strategy,
)

PROVIDERS = {
    "cloudflare": ProviderConfig(priority=1, timeout_ms=20_000),
    "openai": ProviderConfig(priority=2),
    "anthropic": ProviderConfig(priority=3),
}
CANDS = [
    Candidate(provider="openai", model="gpt-3.5-turbo"),
    Candidate(provider="anthropic", model="claude-3-5-haiku-20241022"),
    Candidate(provider="cloudflare", model="@cf/meta/llama-3.1-8b-instruct"),
]
INFO = RouteInfo(prompt_tokens=100, max_tokens=200)


def firsts(order_fn: object, n: int) -> Counter[str]:
    return Counter(order_fn.order(CANDS, PROVIDERS, INFO)[0].provider for _ in range(n))  # type: ignore[attr-defined]


# --- priority, round robin --------------------------------------------------------------------


def test_priority_orders_by_lowest_priority_number() -> None:
    order = PriorityStrategy().order(CANDS, PROVIDERS, INFO)
    assert [c.provider for c in order] == ["cloudflare", "openai", "anthropic"]


def test_round_robin_is_exactly_even_and_rotates_the_fallback_chain() -> None:
    rr = RoundRobinStrategy()
    orders = [tuple(c.provider for c in rr.order(CANDS, PROVIDERS, INFO)) for _ in range(9_000)]
    assert Counter(o[0] for o in orders) == {"cloudflare": 3_000, "openai": 3_000, "anthropic": 3_000}
    assert orders[:3] == [
        ("cloudflare", "openai", "anthropic"),
        ("openai", "anthropic", "cloudflare"),
        ("anthropic", "cloudflare", "openai"),
    ]


def test_round_robin_keeps_one_counter_per_candidate_set() -> None:
    rr = RoundRobinStrategy()
    pair = CANDS[:2]
    seen: Counter[str] = Counter()
    for _ in range(300):
        seen[rr.order(CANDS, PROVIDERS, INFO)[0].provider] += 1
        seen["pair:" + rr.order(pair, PROVIDERS, INFO)[0].provider] += 1
    assert seen == {"cloudflare": 100, "openai": 100, "anthropic": 100, "pair:openai": 150, "pair:anthropic": 150}


# --- weighted ---------------------------------------------------------------------------------


def test_weighted_shares_within_two_points_over_ten_thousand_decisions() -> None:
    strat = WeightedStrategy({"openai": 0.6, "anthropic": 0.3, "cloudflare": 0.1}, random.Random(5))
    counts = firsts(strat, 10_000)
    for provider, target in (("openai", 0.6), ("anthropic", 0.3), ("cloudflare", 0.1)):
        assert abs(counts[provider] / 10_000 - target) <= 0.02, counts


def test_weighted_fallback_chain_holds_every_positive_weight_provider() -> None:
    strat = WeightedStrategy({"openai": 0.6, "anthropic": 0.3, "cloudflare": 0.1}, random.Random(1))
    orders = [tuple(c.provider for c in strat.order(CANDS, PROVIDERS, INFO)) for _ in range(2_000)]
    assert all(sorted(o) == ["anthropic", "cloudflare", "openai"] for o in orders)
    # after openai is drawn first, the second place follows the remaining weights 0.3 : 0.1
    seconds = Counter(o[1] for o in orders if o[0] == "openai")
    assert 0.68 <= seconds["anthropic"] / sum(seconds.values()) <= 0.82


def test_weight_zero_is_never_chosen_not_even_as_fallback() -> None:
    strat = WeightedStrategy({"openai": 1.0, "anthropic": 0.0, "cloudflare": 2.0}, random.Random(2))
    for _ in range(2_000):
        assert "anthropic" not in [c.provider for c in strat.order(CANDS, PROVIDERS, INFO)]
    everyone_zero = WeightedStrategy({"openai": 0, "anthropic": 0, "cloudflare": 0}, random.Random(2))
    assert everyone_zero.order(CANDS, PROVIDERS, INFO) == []


def test_tiny_weights_still_get_their_share() -> None:
    strat = WeightedStrategy({"openai": 1.0, "anthropic": 0.001, "cloudflare": 1e-9}, random.Random(11))
    counts = firsts(strat, 100_000)
    assert 60 <= counts["anthropic"] <= 140, counts  # expected ~100 (0.1 %)
    # two tiny weights keep their ratio against each other (no underflow to a tie)
    tiny = WeightedStrategy({"openai": 3e-12, "anthropic": 1e-12, "cloudflare": 0}, random.Random(3))
    shares = firsts(tiny, 10_000)
    assert abs(shares["openai"] / 10_000 - 0.75) <= 0.02, shares


def test_a_provider_without_a_weight_gets_the_mean_of_the_given_ones() -> None:
    strat = WeightedStrategy({"openai": 0.2, "anthropic": 0.6}, random.Random(9))  # cloudflare: mean 0.4
    counts = firsts(strat, 12_000)
    assert abs(counts["cloudflare"] / 12_000 - 0.4 / 1.2) <= 0.02, counts
    equal = WeightedStrategy({}, random.Random(9))  # no weights: equal shares
    counts = firsts(equal, 9_000)
    assert all(abs(v / 9_000 - 1 / 3) <= 0.02 for v in counts.values()), counts


# --- cost optimized ---------------------------------------------------------------------------


def _prices(cf: tuple[str, str], oa: tuple[str, str], an: tuple[str, str]) -> PriceTable:
    def entry(p: tuple[str, str]) -> dict[str, object]:
        return {"usd_per_mtok_input": p[0], "usd_per_mtok_output": p[1], "source": "test", "as_of": "2025-01-01"}

    return PriceTable.from_mapping(
        {
            "cloudflare": {"@cf/meta/llama-3.1-8b-instruct": entry(cf)},
            "openai": {"gpt-3.5-turbo": entry(oa)},
            "anthropic": {"claude-3-5-haiku-20241022": entry(an)},
        }
    )


def test_cost_optimized_picks_the_cheapest_and_follows_price_changes() -> None:
    table = _prices(cf=("0.30", "0.60"), oa=("0.50", "1.50"), an=("0.80", "4.00"))
    order = CostOptimizedStrategy(table).order(CANDS, PROVIDERS, INFO)
    assert [c.provider for c in order] == ["cloudflare", "openai", "anthropic"]
    cheaper_openai = _prices(cf=("0.30", "0.60"), oa=("0.10", "0.20"), an=("0.80", "4.00"))
    order = CostOptimizedStrategy(cheaper_openai).order(CANDS, PROVIDERS, INFO)
    assert [c.provider for c in order] == ["openai", "cloudflare", "anthropic"]


def test_cost_optimized_weighs_prompt_and_max_tokens_of_this_request() -> None:
    # openai: cheap input, dear output; anthropic: dear input, cheap output
    table = _prices(cf=("9", "9"), oa=("0.10", "5.00"), an=("5.00", "0.10"))
    strat = CostOptimizedStrategy(table)
    long_prompt = RouteInfo(prompt_tokens=10_000, max_tokens=10)
    long_answer = RouteInfo(prompt_tokens=10, max_tokens=10_000)
    assert strat.order(CANDS, PROVIDERS, long_prompt)[0].provider == "openai"
    assert strat.order(CANDS, PROVIDERS, long_answer)[0].provider == "anthropic"
    cost = estimated_cost_usd(table, CANDS[0], PROVIDERS["openai"], long_prompt)
    assert str(cost) == str((10_000 * __import__("decimal").Decimal("0.10") + 10 * 5) / 1_000_000)


def test_cost_optimized_uses_cost_per_token_for_unlisted_models() -> None:
    providers = {
        "openai": ProviderConfig(priority=1, cost_per_token=0.00001),
        "cloudflare": ProviderConfig(priority=2, cost_per_token=0.000001),
    }
    cands = [Candidate(provider="openai", model="unlisted-a"), Candidate(provider="cloudflare", model="unlisted-b")]
    assert CostOptimizedStrategy(None).order(cands, providers, INFO)[0].provider == "cloudflare"


# --- least latency ----------------------------------------------------------------------------


def _observe(tracker: LatencyTracker, provider: str, ms: float) -> None:
    tracker.observe(provider, ms, ok=True, error_type=None, timeout_ms=30_000)


def test_least_latency_moves_most_traffic_away_within_fifty_requests_of_a_tenfold_slowdown() -> None:
    rng = random.Random(7)
    tracker = LatencyTracker()
    strat = LeastLatencyStrategy(tracker, rng)
    latency = {"cloudflare": 100.0, "openai": 250.0, "anthropic": 400.0}
    in_flight: deque[tuple[str, float]] = deque()  # samples arrive 3 requests late, as through ai.control

    def run(n: int) -> list[str]:
        chosen = []
        for _ in range(n):
            first = strat.order(CANDS, PROVIDERS, INFO)[0].provider
            chosen.append(first)
            in_flight.append((first, latency[first] * rng.uniform(0.9, 1.1)))
            if len(in_flight) > 3:
                _observe(tracker, *in_flight.popleft())
        return chosen

    warm = run(200)
    assert warm[-100:].count("cloudflare") >= 85  # the fastest takes the traffic
    latency["cloudflare"] = 1_000.0  # tenfold
    after = run(50)
    assert after.count("cloudflare") <= 10, after
    assert after[10:].count("cloudflare") <= 4, after  # only exploration after the first few
    assert Counter(after).most_common(1)[0][0] == "openai"


def test_least_latency_tries_unsampled_providers_then_ranks_them() -> None:
    tracker = LatencyTracker()
    strat = LeastLatencyStrategy(tracker, random.Random(0), explore=0.0)
    _observe(tracker, "cloudflare", 100)
    _observe(tracker, "openai", 200)
    # anthropic has no sample: it goes first for up to 3 requests so it gets measured
    assert [strat.order(CANDS, PROVIDERS, INFO)[0].provider for _ in range(4)] == ["anthropic"] * 3 + ["cloudflare"]
    assert [c.provider for c in strat.order(CANDS, PROVIDERS, INFO)] == ["cloudflare", "openai", "anthropic"]
    _observe(tracker, "anthropic", 50)
    assert strat.order(CANDS, PROVIDERS, INFO)[0].provider == "anthropic"


def test_timeouts_count_as_slow_and_other_failures_are_not_samples() -> None:
    tracker = LatencyTracker()
    strat = LeastLatencyStrategy(tracker, random.Random(0), explore=0.0)
    _observe(tracker, "openai", 2_000)
    _observe(tracker, "anthropic", 3_000)
    # cloudflare's deadline cut its call at 40 ms: still counts as its full timeout (20 s)
    tracker.observe("cloudflare", 40, ok=False, error_type="timeout", timeout_ms=20_000)
    assert tracker.latency_ms("cloudflare") == 20_000
    # a fast 500 says nothing about latency
    tracker.observe("openai", 5, ok=False, error_type="server_error", timeout_ms=30_000)
    assert tracker.latency_ms("openai") == 2_000
    assert [c.provider for c in strat.order(CANDS, PROVIDERS, INFO)] == ["openai", "anthropic", "cloudflare"]


def test_least_latency_explores_so_a_recovered_provider_wins_back() -> None:
    rng = random.Random(3)
    tracker = LatencyTracker()
    strat = LeastLatencyStrategy(tracker, rng)
    latency = {"cloudflare": 1_000.0, "openai": 300.0, "anthropic": 400.0}
    chosen = []
    for i in range(400):
        if i == 100:
            latency["cloudflare"] = 100.0  # recovers
        first = strat.order(CANDS, PROVIDERS, INFO)[0].provider
        chosen.append(first)
        _observe(tracker, first, latency[first])
    assert chosen[-100:].count("cloudflare") >= 85


# --- names, the seed's shapes, run-time switching ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("cost_optimized", "cost_optimized"),
        ("cost-optimized", "cost_optimized"),
        ("costOptimized", "cost_optimized"),
        ("round-robin", "round_robin"),
        ("least-latency", "least_latency"),
        ({"type": "cost-optimized"}, "cost_optimized"),
        ({"type": "least-latency"}, "least_latency"),
        ({"name": "priority"}, "priority"),
    ],
)
def test_parse_strategy_accepts_names_and_the_seeds_shapes(value: object, name: str) -> None:
    assert parse_strategy(value).name == name  # type: ignore[arg-type]


def test_parse_strategy_accepts_every_load_balancing_strategies_value() -> None:
    assert {parse_strategy(v).name for v in LOAD_BALANCING_STRATEGIES.values()} == set(STRATEGY_NAMES)


def test_parse_strategy_takes_the_seeds_weighted_shape() -> None:
    spec = parse_strategy({"type": "weighted", "weights": {"cloudflare": 0.6, "openai": 0.3, "anthropic": 0.1}})
    assert spec == StrategySpec("weighted", {"cloudflare": 0.6, "openai": 0.3, "anthropic": 0.1})
    assert spec.describe() == "weighted (cloudflare=0.6, openai=0.3, anthropic=0.1)"


@pytest.mark.parametrize(
    ("value", "weights", "message"),
    [
        ("fastest", None, "unknown strategy 'fastest'"),
        ("weighted", {"opneai": 1}, "unknown provider 'opneai'"),
        ("weighted", {"openai": -1}, "weight of openai must be a finite number >= 0"),
        ("weighted", {"openai": "lots"}, "weight of openai must be a number"),
        ("weighted", {"openai": 0}, "at least one weight must be > 0"),
        ("priority", {"openai": 1}, "weights apply only to the weighted strategy"),
        ({"type": "weighted", "weigths": {}}, None, "unknown strategy field(s) weigths"),
        ({"weights": {}}, None, 'needs "type"'),
    ],
)
def test_parse_strategy_rejects_bad_input_clearly(value: object, weights: object, message: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        parse_strategy(value, weights)  # type: ignore[arg-type]


def test_state_applies_set_strategy_and_feeds_latency_from_health() -> None:
    state = StrategyState(StrategySpec("priority"), providers=PROVIDERS, rng=random.Random(1))
    at = datetime(2025, 1, 1, tzinfo=UTC)
    assert state.order(CANDS, PROVIDERS, INFO)[0].provider == "cloudflare"
    state.apply(SetStrategy(name="round-robin", at=at))
    assert state.name == "round_robin"
    assert [state.order(CANDS, PROVIDERS, INFO)[0].provider for _ in range(3)] == [
        "cloudflare",
        "openai",
        "anthropic",
    ]
    state.apply(SetStrategy(name="weighted", weights={"openai": 1.0, "cloudflare": 0.0}, at=at + timedelta(seconds=1)))
    assert state.describe() == "weighted (openai=1, cloudflare=0)"
    assert {state.order(CANDS, PROVIDERS, INFO)[0].provider for _ in range(50)} <= {"openai", "anthropic"}
    # an invalid or older command changes nothing
    state.apply(SetStrategy(name="fastest", at=at + timedelta(seconds=2)))
    state.apply(SetStrategy(name="priority", at=at))
    assert state.name == "weighted"
    # health events feed least_latency whatever the current strategy; timeouts use the provider's timeout_ms
    state.apply(Health(provider="openai", model="m", ok=True, latency_ms=120.0, at=at))
    state.apply(Health(provider="cloudflare", model="m", ok=False, error_type="timeout", latency_ms=9.0, at=at))
    assert state.tracker.latency_ms("openai") == 120.0
    assert state.tracker.latency_ms("cloudflare") == 20_000


def test_state_from_config_validates_strategy_and_weights() -> None:
    from pipeline.runtime.config import config_from_mapping, preset

    cfg = config_from_mapping({"strategy": "least-latency"}, base=preset("production"))
    assert StrategyState.from_config(cfg).name == "least_latency"
    cfg = config_from_mapping({"strategy": "weighted", "weights": {"openai": 3}}, base=preset("production"))
    state = StrategyState.from_config(cfg)
    assert state.weights == {"openai": 3.0} and state.describe() == "weighted (openai=3)"
    # an unknown strategy fails when the configuration is loaded, naming the key
    with pytest.raises(ValueError, match="invalid configuration: `strategy`/`weights`: unknown strategy 'fastest'"):
        config_from_mapping({"strategy": "fastest"}, base=preset("production"))


# --- `aipipe strategy set`: usage errors exit 2 before touching the broker ------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["strategy", "set", "fastest"], "unknown strategy 'fastest'"),
        (["strategy", "set", "weighted", "--weights", "openai=lots"], "weight of openai must be a number"),
        (["strategy", "set", "weighted", "--weights", "openai0.5"], "expected PROVIDER=WEIGHT pairs"),
        (["strategy", "set", "weighted", "--weights", "opneai=1"], "unknown provider 'opneai'"),
        (["strategy", "set", "weighted", "--weights", "openai=-1"], "finite number >= 0"),
        (["strategy", "set", "weighted", "--weights", "openai=0"], "at least one weight must be > 0"),
        (["strategy", "set", "priority", "--weights", "openai=1"], "weights apply only to the weighted strategy"),
        (["strategy"], "required"),
    ],
)
def test_cli_usage_errors_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli.main import main

    monkeypatch.setenv("AIPIPE_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_weights_parse_to_the_seeds_shares() -> None:
    from pipeline.cli.strategy_commands import weights_arg

    shares = {"openai": 0.6, "anthropic": 0.3, "cloudflare": 0.1}
    assert weights_arg("openai=0.6, anthropic=0.3,cloudflare=0.1") == shares
