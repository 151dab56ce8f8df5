"""Cost of one routing decision and one rate-limit charge (in-process and Redis).

    .venv/bin/python bench/routing_decisions.py [--redis redis://127.0.0.1:6379/14]

Prints microseconds per ``order`` call of each strategy over three candidates,
and per ``acquire``+``settle`` pair of the in-process and the Redis limiter
(sequential round trips, one client).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import time

from pipeline.runtime.config import RateLimit, preset
from schemas.envelope import Candidate
from stages.rules.pricing import PriceTable
from stages.rules.rate_limits import MemoryRateLimiter, RateLimiter
from stages.rules.strategies import RouteInfo, StrategySpec, StrategyState

CANDS = [
    Candidate(provider="cloudflare", model="@cf/meta/llama-3.1-8b-instruct"),
    Candidate(provider="openai", model="gpt-3.5-turbo"),
    Candidate(provider="anthropic", model="claude-3-5-haiku-20241022"),
]


def bench_strategies(n: int) -> None:
    config = preset("production")
    prices = PriceTable.load()
    info = RouteInfo(prompt_tokens=120, max_tokens=256)
    for name in ("priority", "round_robin", "weighted", "least_latency", "cost_optimized"):
        weights = {"openai": 0.6, "anthropic": 0.3, "cloudflare": 0.1} if name == "weighted" else None
        state = StrategyState(
            StrategySpec(name, weights), providers=config.providers, prices=prices, rng=random.Random(1)
        )
        for c in CANDS:
            state.tracker.observe(c.provider, 100.0, ok=True, error_type=None, timeout_ms=30_000)
        started = time.perf_counter()
        for _ in range(n):
            state.order(CANDS, config.providers, info)
        print(f"{name:15s} {1e6 * (time.perf_counter() - started) / n:8.1f} us/decision")


async def bench_limiter(label: str, limiter: RateLimiter, n: int) -> None:
    limit = RateLimit(requests_per_minute=10_000_000, tokens_per_minute=10_000_000_000)
    started = time.perf_counter()
    for i in range(n):
        await limiter.acquire("openai", limit, 300, f"c{i}")
        await limiter.settle("openai", f"c{i}", 120)
    print(f"{label:15s} {1e6 * (time.perf_counter() - started) / n:8.1f} us/charge (acquire + settle)")
    await limiter.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", help="Redis URL (a database you do not mind a few keys in)")
    parser.add_argument("-n", type=int, default=20_000)
    args = parser.parse_args()
    bench_strategies(args.n)
    await bench_limiter("in-process", MemoryRateLimiter(), args.n)
    if args.redis:
        from pipeline.stores.rate_limit_store import RedisRateLimiter

        await bench_limiter(
            "redis",
            RedisRateLimiter.from_url(args.redis, namespace=f"bench-{secrets.token_hex(3)}:"),
            min(args.n, 2_000),
        )


if __name__ == "__main__":
    asyncio.run(main())
