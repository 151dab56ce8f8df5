"""Budgets, budget status, projections and the cost summary (the seed's "Cost Tracking & Optimization").

    AIPIPE_EMULATE=1 .venv/bin/python examples/budgets.py

Scopes are ``global``, a provider name (``openai``) or ``user:NAME``. The
budget gate reserves each request's worst-case cost, so concurrent requests
cannot overspend; a request that does not fit raises ``BudgetExceededError``.
"""

import asyncio

from pipeline import BudgetExceededError, create_ai_provider_manager


async def main() -> None:
    async with create_ai_provider_manager("development") as manager:
        await manager.set_budget("openai", daily=10.00, weekly=50.00, monthly=200.00)
        response = await manager.generate_content(
            {"model": "gpt-4o-mini", "prompt": "Summarise the benefits of unit tests.", "max_tokens": 120}
        )
        print(f"Spent ${response.cost_usd:.8f} on {response.provider}")

        budget_status = await manager.get_budget_status("openai")
        print(f"Daily usage: {budget_status.daily.percentage:.6f}%")
        projection = await manager.get_cost_projection("openai", 30)
        print(f"Projected monthly cost: ${projection.monthly:.2f}")

        for provider, summary in (await manager.get_cost_summary()).items():
            print(f"{provider}:")
            print(f"  Total cost: ${summary.total_cost_usd:.8f}")
            print(f"  Total tokens: {summary.total_tokens}")
            print(f"  Avg cost per token: ${summary.average_cost_per_token_usd:.10f}")

        # A user with a tiny daily budget is refused before any provider is called.
        await manager.set_budget("user:demo-user", daily=0.000001)
        try:
            await manager.generate_content(
                {"model": "gpt-4o-mini", "prompt": "One more, please.", "max_tokens": 120, "user": "demo-user"}
            )
        except BudgetExceededError as error:
            print("Refused:", error.message)


if __name__ == "__main__":
    asyncio.run(main())
