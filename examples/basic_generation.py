"""Basic generation: the seed's "Content Generation" and "Error Handling" flows.

    AIPIPE_EMULATE=1 .venv/bin/python examples/basic_generation.py

Without ``AIPIPE_EMULATE``, providers whose API keys are set are called for real
(in ``development`` the others are served by the built-in emulator). With no
``AIPIPE_KAFKA_BOOTSTRAP`` every stage runs inside this process.
"""

import asyncio

from pipeline import AIProviderError, ModelNotFoundError, create_ai_provider_manager


async def main() -> None:
    async with create_ai_provider_manager("development") as manager:
        request = {
            "model": "gpt-3.5-turbo",
            "prompt": "Write a compelling social media post about AI innovation",
            "max_tokens": 200,
            "temperature": 0.7,
        }
        try:
            response = await manager.generate_content(request)
        except AIProviderError as error:
            raise SystemExit(f"Generation failed: {error.message}") from error

        print("Generated content:", response.content)
        print("Provider used:", response.provider)
        print(f"Cost: ${response.cost:.8f}")
        print("Tokens used:", response.tokens_used)

        # Every `status: error` answer raises its typed error.
        try:
            await manager.generate_content({"model": "gpt-17", "prompt": "Hello"})
        except ModelNotFoundError as error:
            print("Model not available:", error.message)


if __name__ == "__main__":
    asyncio.run(main())
