"""Load-balancing strategies: pure orderings of a request's candidate providers (no I/O).

A strategy takes the candidates the router kept (enabled, serving the model,
circuit ``CLOSED``, ...) and returns them in the order the executor tries
them: the chosen provider first, the rest as the fallback chain in the
strategy's order. Randomness comes from an injected ``random.Random``, so
every decision is reproducible under a seed.

* ``priority``: lowest ``priority`` first (ties keep configuration order).
* ``round_robin``: rotates the start through the candidates, one step per
  request, with a separate counter per candidate set, so N requests over n
  providers give each exactly N/n (when n divides N).
* ``weighted``: the first provider is drawn with probability weight / sum of
  weights; the fallback chain continues the same draw without replacement
  (Efraimidis-Spirakis keys ``log(u) / w``, which stay exact for tiny
  weights: a weight of 0.001 next to 1.0 still gets its 0.1 %). Weight 0
  means never chosen, not even as a fallback. A provider without a weight
  gets ``missing_weight``: the mean of the positive weights given (1.0 when
  none are given), so forgetting a provider neither starves nor floods it.
* ``least_latency``: lowest exponentially weighted moving average (EWMA) of
  successful latency first (``LatencyTracker``, fed by ``health`` events). A
  provider with no sample yet is put first for up to ``unsampled_trials``
  requests so it gets measured; a timeout counts as a sample of at least the
  provider's ``timeout_ms`` (slow, never fast); other failures are not
  latency samples. With probability ``explore`` (5 %) the first place goes to
  a random other measured provider, so a provider that recovered is noticed.
  With ``alpha`` 0.3, a provider whose latency rises tenfold above the next
  one loses first place after one or two samples.
* ``cost_optimized``: cheapest estimated cost for this request first: the
  estimated prompt tokens at the model's input price plus ``max_tokens`` at
  its output price (``stages.rules.pricing.PriceTable``; a model missing from the
  table is priced at the provider's ``cost_per_token``). Ties go by priority.

``StrategyState`` is what one router replica holds: the current strategy and
weights, switched by ``set_strategy`` events on ``ai.control`` (``apply``),
plus the latency tracker fed by ``health`` events.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from pipeline.runtime.config import (
    PROVIDER_NAMES,
    PipelineConfig,
    ProviderConfig,
    normalize_strategy_name,
    validate_weights,
)
from schemas.envelope import Candidate
from schemas.events import ControlEvent, Health, SetStrategy
from schemas.response import Usage
from stages.rules.pricing import PriceTable

__all__ = [
    "CostOptimizedStrategy",
    "LatencyTracker",
    "LeastLatencyStrategy",
    "PriorityStrategy",
    "RoundRobinStrategy",
    "RouteInfo",
    "Strategy",
    "StrategySpec",
    "StrategyState",
    "WeightedStrategy",
    "by_priority",
    "effective_weights",
    "estimated_cost_usd",
    "parse_strategy",
]

log = logging.getLogger("aipipe.strategy")


#: EWMA smoothing factor of ``least_latency``: weight of the newest sample (0..1].
DEFAULT_EWMA_ALPHA = 0.3
#: Probability that ``least_latency`` puts a random other measured provider first.
DEFAULT_EXPLORE = 0.05
#: Requests an unmeasured provider is put first for while no latency sample has arrived.
DEFAULT_UNSAMPLED_TRIALS = 3
#: Latency (ms) a timeout counts as when the provider's ``timeout_ms`` is unknown (DESIGN A8 default).
DEFAULT_TIMEOUT_SAMPLE_MS = 30_000.0


@dataclass(frozen=True, slots=True)
class StrategySpec:
    """A strategy choice: its canonical ``name`` and, for ``weighted``, ``weights`` (provider -> weight).

    ``weights`` ``None`` means the configuration's ``weights`` (equal shares when none are configured).
    """

    name: str
    weights: Mapping[str, float] | None = None

    def describe(self) -> str:
        """One line for people, e.g. ``weighted (openai=0.6, anthropic=0.3, cloudflare=0.1)``."""
        if self.name == "weighted" and self.weights:
            return f"weighted ({', '.join(f'{p}={w:g}' for p, w in self.weights.items())})"
        return self.name


def parse_strategy(
    value: str | Mapping[str, Any] | StrategySpec,
    weights: Mapping[str, Any] | None = None,
    *,
    known_providers: Iterable[str] | None = PROVIDER_NAMES,
) -> StrategySpec:
    """A ``StrategySpec`` from what users write.

    ``value`` is a name (``"cost_optimized"``, ``"cost-optimized"``,
    ``"costOptimized"``), a ``LOAD_BALANCING_STRATEGIES`` value, the seed's
    shape ``{"type": "weighted", "weights": {"openai": 0.6, ...}}`` (or
    ``{"name": ...}``, the ``set_strategy`` event's field), or a
    ``StrategySpec``. ``weights`` may be passed separately with a name.

    Raises:
        ValueError: for an unknown name, an unknown key in the mapping,
            invalid weights, or weights given to a strategy other than ``weighted``.
    """
    if isinstance(value, StrategySpec):
        name, given = value.name, value.weights if weights is None else weights
    elif isinstance(value, Mapping):
        extra = set(value) - {"type", "name", "weights"}
        if extra:
            raise ValueError(f"unknown strategy field(s) {', '.join(sorted(extra))} (use type/name and weights)")
        raw_name = value.get("type", value.get("name"))
        if raw_name is None:
            raise ValueError('a strategy mapping needs "type" (the seed\'s shape) or "name"')
        name = raw_name
        given = value.get("weights") if weights is None else weights
    else:
        name, given = value, weights
    canonical = normalize_strategy_name(name)
    checked = validate_weights(given, known_providers) if given else None
    if checked and canonical != "weighted":
        raise ValueError(f"weights apply only to the weighted strategy, not {canonical}")
    return StrategySpec(canonical, checked or None)


# --- the strategies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What a strategy may know of the request: estimated ``prompt_tokens`` and ``max_tokens`` (tokens)."""

    prompt_tokens: int = 0
    max_tokens: int = 0


class Strategy(Protocol):
    """Orders the candidates of one request: chosen provider first, then the fallback chain."""

    name: str

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The candidates in the order to try them (a strategy may leave some out, e.g. weight 0)."""
        ...


def _priority(providers: Mapping[str, ProviderConfig], name: str) -> int:
    cfg = providers.get(name)
    return cfg.priority if cfg is not None else 1_000_000


def by_priority(candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig]) -> list[Candidate]:
    """Lowest ``priority`` first; ties keep their order (stable); unknown providers last."""
    return sorted(candidates, key=lambda c: _priority(providers, c.provider))


class PriorityStrategy:
    """``priority``: lowest ``priority`` number first."""

    name = "priority"

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The candidates by ascending ``priority``."""
        return by_priority(candidates, providers)


class RoundRobinStrategy:
    """``round_robin``: each request starts one step further round the candidate set.

    One counter per candidate set (the providers, in priority order), so a
    set that changes (a circuit opens) does not skew the others.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self.counters: dict[tuple[str, ...], int] = {}

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The candidates rotated by this set's counter; the counter advances by one."""
        base = by_priority(candidates, providers)
        if len(base) <= 1:
            return base
        key = tuple(c.provider for c in base)
        turn = self.counters.get(key, 0)
        self.counters[key] = turn + 1
        start = turn % len(base)
        return base[start:] + base[:start]


def effective_weights(candidates: Sequence[Candidate], weights: Mapping[str, float]) -> dict[str, float]:
    """Each candidate's weight: its configured one, or the mean of the positive ones given (1.0 if none)."""
    positive = [w for w in weights.values() if w > 0]
    missing = sum(positive) / len(positive) if positive else 1.0
    return {c.provider: weights.get(c.provider, missing) for c in candidates}


class WeightedStrategy:
    """``weighted``: a weighted random draw without replacement (see the module docstring).

    Args:
        weights: provider -> relative weight (>= 0); missing providers get
            the mean of the positive weights (1.0 when none are given).
        rng: random source (seed it for reproducible decisions).
    """

    name = "weighted"

    def __init__(self, weights: Mapping[str, float], rng: random.Random) -> None:
        self.weights = dict(weights)
        self.rng = rng

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The positive-weight candidates in draw order; weight-0 candidates are left out."""
        weights = effective_weights(candidates, self.weights)
        keyed: list[tuple[float, int, Candidate]] = []
        for index, cand in enumerate(by_priority(candidates, providers)):
            weight = weights[cand.provider]
            if weight <= 0:
                continue
            u = 1.0 - self.rng.random()  # (0, 1]
            keyed.append((math.log(u) / weight, -index, cand))
        keyed.sort(key=lambda k: (k[0], k[1]), reverse=True)
        return [cand for _, _, cand in keyed]


@dataclass
class LatencyTracker:
    """Per-provider EWMA of successful latency (ms), fed by ``health`` events.

    Args:
        alpha: weight of the newest sample, in (0, 1].
    """

    alpha: float = DEFAULT_EWMA_ALPHA
    ewma_ms: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check ``alpha``.

        Raises:
            ValueError: when ``alpha`` is not in (0, 1].
        """
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")

    def observe(self, provider: str, latency_ms: float, *, ok: bool, error_type: str | None, timeout_ms: float) -> None:
        """Fold one call's outcome.

        A success is a sample of ``latency_ms``; a ``timeout`` is a sample of
        at least ``timeout_ms`` (the provider's per-attempt limit, ms), so it
        reads as slow however early the deadline cut it; any other failure is
        not a latency sample (a fast 500 must not make a provider look fast).
        """
        if ok:
            sample = max(0.0, latency_ms)
        elif error_type == "timeout":
            sample = max(latency_ms, timeout_ms)
        else:
            return
        previous = self.ewma_ms.get(provider)
        self.ewma_ms[provider] = sample if previous is None else self.alpha * sample + (1 - self.alpha) * previous
        self.samples[provider] = self.samples.get(provider, 0) + 1
        self.trials.pop(provider, None)

    def latency_ms(self, provider: str) -> float | None:
        """The provider's EWMA latency (ms), or ``None`` before its first sample."""
        return self.ewma_ms.get(provider)


class LeastLatencyStrategy:
    """``least_latency``: lowest EWMA latency first (see the module docstring for unmeasured providers).

    Args:
        tracker: the latency EWMAs.
        rng: random source for exploration.
        explore: probability of putting a random other measured provider first.
        unsampled_trials: requests an unmeasured provider goes first for, while no sample arrives.
    """

    name = "least_latency"

    def __init__(
        self,
        tracker: LatencyTracker,
        rng: random.Random,
        *,
        explore: float = DEFAULT_EXPLORE,
        unsampled_trials: int = DEFAULT_UNSAMPLED_TRIALS,
    ) -> None:
        if not 0 <= explore < 1:
            raise ValueError(f"explore must be in [0, 1), got {explore!r}")
        self.tracker = tracker
        self.rng = rng
        self.explore = explore
        self.unsampled_trials = unsampled_trials

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """Unmeasured (still on trial) first, then measured by EWMA, then unmeasured whose trials ran out."""
        base = by_priority(candidates, providers)
        measured = [c for c in base if self.tracker.latency_ms(c.provider) is not None]
        measured.sort(key=lambda c: self.tracker.ewma_ms[c.provider])  # stable: ties keep priority order
        on_trial = [
            c
            for c in base
            if c.provider not in self.tracker.ewma_ms and self.tracker.trials.get(c.provider, 0) < self.unsampled_trials
        ]
        untried = [c for c in base if c.provider not in self.tracker.ewma_ms and c not in on_trial]
        if on_trial:
            first = on_trial[0]
            self.tracker.trials[first.provider] = self.tracker.trials.get(first.provider, 0) + 1
            return [first, *measured, *on_trial[1:], *untried]
        if len(measured) > 1 and self.explore > 0 and self.rng.random() < self.explore:
            pick = self.rng.choice(measured[1:])
            return [pick, *(c for c in measured if c is not pick), *untried]
        return [*measured, *untried]


def estimated_cost_usd(
    prices: PriceTable | None, candidate: Candidate, provider: ProviderConfig | None, info: RouteInfo
) -> Decimal:
    """Estimated cost (USD) of the request at ``candidate``: prompt estimate at input price, ``max_tokens`` at output.

    A model missing from ``prices`` (or no table) is priced at the provider's
    ``cost_per_token`` (USD per token) for every token.
    """
    usage = Usage(
        prompt_tokens=info.prompt_tokens,
        completion_tokens=info.max_tokens,
        total_tokens=info.prompt_tokens + info.max_tokens,
    )
    per_token = Decimal(str(provider.cost_per_token)) if provider is not None else None
    if prices is None:
        return (per_token or Decimal(0)) * usage.total_tokens
    return prices.cost(candidate.provider, candidate.model, usage, default_cost_per_token=per_token).cost_usd


class CostOptimizedStrategy:
    """``cost_optimized``: cheapest estimated cost for this request first; ties by priority.

    Args:
        prices: the price table (``None``: every provider's ``cost_per_token``).
    """

    name = "cost_optimized"

    def __init__(self, prices: PriceTable | None) -> None:
        self.prices = prices

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The candidates by ascending estimated cost (USD)."""
        base = by_priority(candidates, providers)
        return sorted(base, key=lambda c: estimated_cost_usd(self.prices, c, providers.get(c.provider), info))


# --- the state one router replica keeps -----------------------------------------------------------


class StrategyState:
    """The current strategy of one router replica, switched at run time by ``set_strategy`` events.

    Args:
        spec: the strategy to start with (usually the configuration's).
        providers: provider configurations (for ``timeout_ms`` of timeout samples).
        config_weights: the configuration's ``weights``, used by ``weighted``
            when a ``set_strategy`` gives none.
        prices: price table for ``cost_optimized``.
        rng: random source of ``weighted`` and ``least_latency``.
        tracker: latency EWMAs (fed by ``health`` events whatever the current strategy).
    """

    def __init__(
        self,
        spec: StrategySpec,
        *,
        providers: Mapping[str, ProviderConfig] | None = None,
        config_weights: Mapping[str, float] | None = None,
        prices: PriceTable | None = None,
        rng: random.Random | None = None,
        tracker: LatencyTracker | None = None,
    ) -> None:
        self.providers = dict(providers or {})
        self.config_weights = validate_weights(config_weights or {}, None)
        self.prices = prices
        self.rng = rng or random.Random()
        self.tracker = tracker or LatencyTracker()
        self.round_robin = RoundRobinStrategy()
        self.last_command_at: datetime | None = None
        self.spec = spec
        self.current: Strategy = self._build(spec)

    @classmethod
    def from_config(
        cls, config: PipelineConfig, *, prices: PriceTable | None = None, rng: random.Random | None = None
    ) -> StrategyState:
        """The state for ``config``'s ``strategy`` and ``weights``.

        Raises:
            ValueError: ``invalid configuration: strategy: ...`` for an unknown
                strategy or invalid weights.
        """
        try:
            spec = parse_strategy(config.strategy)
            validate_weights(config.weights)
        except ValueError as exc:
            raise ValueError(f"invalid configuration: strategy/weights: {exc}") from exc
        return cls(spec, providers=config.providers, config_weights=config.weights, prices=prices, rng=rng)

    @property
    def name(self) -> str:
        """The current strategy's name."""
        return self.spec.name

    @property
    def weights(self) -> dict[str, float]:
        """The weights ``weighted`` uses now (the command's, else the configuration's)."""
        return dict(self.spec.weights) if self.spec.weights else dict(self.config_weights)

    def describe(self) -> str:
        """One line for ``aipipe status``, e.g. ``weighted (openai=0.6, cloudflare=0.4)``."""
        if self.spec.name == "weighted":
            return StrategySpec("weighted", self.weights or None).describe()
        return self.spec.describe()

    def _build(self, spec: StrategySpec) -> Strategy:
        if spec.name == "round_robin":
            return self.round_robin
        if spec.name == "weighted":
            return WeightedStrategy(dict(spec.weights) if spec.weights else self.config_weights, self.rng)
        if spec.name == "least_latency":
            return LeastLatencyStrategy(self.tracker, self.rng)
        if spec.name == "cost_optimized":
            return CostOptimizedStrategy(self.prices)
        return PriorityStrategy()

    def set(self, spec: StrategySpec) -> None:
        """Switch to ``spec`` (takes effect for the next ``order`` call)."""
        self.spec = spec
        self.current = self._build(spec)

    def apply(self, event: ControlEvent) -> None:
        """Fold one ``ai.control`` event: ``set_strategy`` switches, ``health`` feeds the latency EWMAs.

        An invalid ``set_strategy`` (unknown name, bad weights) is logged and
        ignored; the current strategy stays. Other events are ignored.
        """
        if isinstance(event, Health):
            cfg = self.providers.get(event.provider)
            timeout_ms = float(cfg.timeout_ms) if cfg is not None else DEFAULT_TIMEOUT_SAMPLE_MS
            self.tracker.observe(
                event.provider, event.latency_ms, ok=event.ok, error_type=event.error_type, timeout_ms=timeout_ms
            )
        elif isinstance(event, SetStrategy):
            try:
                spec = parse_strategy(event.name, event.weights, known_providers=None)
            except ValueError as exc:
                log.warning("ignoring set_strategy %r: %s", event.name, exc)
                return
            if event.at is not None and self.last_command_at is not None and event.at < self.last_command_at:
                return
            self.set(spec)
            self.last_command_at = event.at or self.last_command_at
            log.info("load-balancing strategy set to %s", self.describe())

    def order(
        self, candidates: Sequence[Candidate], providers: Mapping[str, ProviderConfig], info: RouteInfo
    ) -> list[Candidate]:
        """The candidates ordered by the current strategy."""
        return self.current.order(candidates, providers, info)
