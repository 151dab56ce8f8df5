"""Deployments: a second OpenAI account and a local OpenAI-compatible server in one model group.

    AIPIPE_EMULATE=1 .venv/bin/python examples/deployments.py

Without AIPIPE_EMULATE, set OPENAI_API_KEY and OPENAI_EU_API_KEY and run an
Ollama server on 127.0.0.1:11434 with llama3.1:8b pulled.
"""

import asyncio

from pipeline import AIProviderManager

CONFIG = {
    "deployments": {
        "openai-eu": {
            "type": "openai",
            "base_url": "https://eu.api.openai.com/v1",
            "api_key_env": "OPENAI_EU_API_KEY",
            "models": ["gpt-4o-mini"],
            "priority": 3,
        },
        "local-llama": {
            "type": "openai_compatible",
            "base_url": "http://127.0.0.1:11434/v1",
            "models": ["llama3.1:8b"],
            "priority": 9,
            "prices": {"input_per_mtok": 0.0, "output_per_mtok": 0.0},
        },
    },
    "model_groups": {
        "support-bot": {"openai": "gpt-4o-mini", "openai-eu": "gpt-4o-mini", "local-llama": "llama3.1:8b"},
    },
}


async def main() -> None:
    async with AIProviderManager(CONFIG) as manager:
        first = await manager.generate_content({"model": "support-bot", "prompt": "Say hello.", "max_tokens": 40})
        print(f"support-bot answered by {first.provider} ({first.model}) for ${first.cost:.8f}")
        for name in ("openai-eu", "local-llama"):  # an allow-list names deployments
            answer = await manager.generate_content(
                {"model": "support-bot", "prompt": f"Hello from {name}", "max_tokens": 40, "providers": [name]}
            )
            print(f"{name}: answered by {answer.provider} ({answer.model}) for ${answer.cost:.8f}")
        for name, summary in sorted((await manager.get_cost_summary()).items()):
            print(f"{name}: {summary.request_count} request(s), ${summary.total_cost_usd:.8f}")


if __name__ == "__main__":
    asyncio.run(main())
