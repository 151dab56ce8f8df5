"""The official ``openai`` SDK against aipipe's OpenAI-compatible endpoint.

    AIPIPE_EMULATE=1 .venv/bin/python examples/openai_sdk.py

Usually the endpoint runs on its own (``aipipe serve --port 8000``) and the
application only needs the SDK part with ``base_url="http://127.0.0.1:8000/v1"``.
To stay self-contained, this script starts the endpoint in-process first.
"""

import asyncio

import openai

from pipeline import create_ai_provider_manager
from pipeline.serve.openai_server import OpenAIServer


async def main() -> None:
    async with create_ai_provider_manager("development") as manager, OpenAIServer(manager) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused-on-an-open-endpoint")

        print("Models:", ", ".join([model.id async for model in client.models.list()][:5]), "...")

        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "Write a haiku about Kafka."}],
            max_tokens=60,
            user="alice",
        )
        completion = raw.parse()
        print("Answer:", completion.choices[0].message.content)
        print("Provider (x-aipipe-provider):", raw.headers["x-aipipe-provider"])
        print("Cost USD (x-aipipe-cost-usd):", raw.headers["x-aipipe-cost-usd"])
        print("Tokens:", completion.usage.total_tokens if completion.usage else 0)

        try:
            await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "Hi"}])
        except openai.NotFoundError as error:
            print("Unknown model:", error.status_code, error.code)


if __name__ == "__main__":
    asyncio.run(main())
