"""Health status, provider tests and automated monitoring (the seed's "Health Monitoring" and "Testing").

AIPIPE_EMULATE=1 .venv/bin/python examples/health_monitoring.py
"""

import asyncio
import logging

from pipeline import create_ai_provider_manager, monitor_provider_health


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("aipipe.health").setLevel(logging.INFO)  # the monitor's lines

    async with create_ai_provider_manager("development") as manager:
        is_working = await manager.test_provider("openai")
        print(f"OpenAI is {'working' if is_working else 'not working'}")

        for status in await manager.get_health_status():
            print(f"{status.provider}: {'healthy' if status.is_healthy else 'unhealthy'}")
            print(f"  Error rate: {status.error_rate * 100:.1f}%")
            print(f"  Avg response time: {status.response_time_ms or 0:.0f} ms")
            print(f"  Circuit breaker: {status.circuit_breaker_state}")

        stop_monitoring = await monitor_provider_health(manager, interval_s=0.5)
        await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "Hello while monitored", "max_tokens": 20})
        await asyncio.sleep(1.2)  # let the monitor log a couple of rounds
        stop_monitoring()


if __name__ == "__main__":
    asyncio.run(main())
