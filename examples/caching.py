"""Response caching: a repeated request is answered from the cache at no cost (the seed's "Caching System").

AIPIPE_EMULATE=1 .venv/bin/python examples/caching.py
"""

import asyncio

from pipeline import create_ai_provider_manager


async def main() -> None:
    async with create_ai_provider_manager("development") as manager:
        request = {"model": "gpt-3.5-turbo", "prompt": "What is a circuit breaker?", "max_tokens": 60}
        first = await manager.generate_content(request)
        second = await manager.generate_content(request)
        print(f"first call: cached={first.cached} cost=${first.cost_usd:.8f}")
        print(f"second call: cached={second.cached} cost=${second.cost_usd:.8f}")

        cache_stats = await manager.get_cache_stats()
        print(f"Cache hit rate: {cache_stats['hit_rate'] * 100:.1f}%")

        await manager.clear_cache()
        third = await manager.generate_content(request)
        print(f"after clear_cache: cached={third.cached}")


if __name__ == "__main__":
    asyncio.run(main())
