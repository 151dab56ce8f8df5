"""Load-balancing strategies: switch at run time and see who answers (the seed's "Load Balancing Strategies").

    AIPIPE_EMULATE=1 .venv/bin/python examples/strategy_switch.py

``set_load_balancing_strategy`` takes a name, a ``LOAD_BALANCING_STRATEGIES``
value or the seed's ``{"type": ...}`` shape (kebab-case names too); the switch
is published on ``ai.control`` and every router replica follows it.
"""

import asyncio
from collections import Counter

from pipeline import LOAD_BALANCING_STRATEGIES, create_ai_provider_manager

STRATEGIES = [
    ("cost_optimized", LOAD_BALANCING_STRATEGIES["cost_optimized"]),
    ("least-latency", {"type": "least-latency"}),
    ("weighted", {"type": "weighted", "weights": {"cloudflare": 0.6, "openai": 0.4}}),
    ("round-robin", {"type": "round-robin"}),
]
REQUESTS_PER_STRATEGY = 6


async def main() -> None:
    async with create_ai_provider_manager("development") as manager:
        for name, strategy in STRATEGIES:
            await manager.set_load_balancing_strategy(strategy)
            usage: Counter[str] = Counter()
            for i in range(REQUESTS_PER_STRATEGY):
                response = await manager.generate_content(
                    {
                        "model": "gpt-3.5-turbo",
                        "prompt": f"[{name} #{i + 1}] Suggest a name for a coffee shop.",
                        "max_tokens": 50,
                        "cache": {"bypass": True},
                    }
                )
                usage[response.provider or "?"] += 1
            print(f"{name}: {dict(sorted(usage.items()))}")


if __name__ == "__main__":
    asyncio.run(main())
