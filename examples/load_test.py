"""Load test: 10 concurrent requests and the providers that answered them (the seed's "Load Testing").

    AIPIPE_EMULATE=1 .venv/bin/python examples/load_test.py [STRATEGY]

With a STRATEGY (``round_robin``, ``weighted``, ``least_latency``,
``cost_optimized``, ``priority``) it is set first; otherwise the configured
one (``priority``) decides.
"""

import asyncio
import sys
from collections import Counter

from pipeline import create_ai_provider_manager


async def main(strategy: str | None) -> None:
    async with create_ai_provider_manager("development") as manager:
        if strategy:
            await manager.set_load_balancing_strategy(strategy)
        requests = [
            {"model": "gpt-3.5-turbo", "prompt": f"Test request {i + 1}", "max_tokens": 50, "temperature": 0.5}
            for i in range(10)
        ]
        results = await asyncio.gather(*(manager.generate_content(r) for r in requests), return_exceptions=True)

        answered = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        provider_usage = Counter(r.provider for r in answered)
        print("Provider usage:", dict(sorted(provider_usage.items())))
        print(f"Succeeded: {len(answered)}/{len(requests)}")
        print(f"Total cost: ${sum(r.cost_usd for r in answered):.8f}")
        for error in failed:
            print("Failed:", type(error).__name__, error)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
