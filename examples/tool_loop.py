"""A two-turn tool loop with the ``openai`` SDK that fails over mid-conversation.

    AIPIPE_EMULATE=1 .venv/bin/python examples/tool_loop.py

Turn 1: OpenAI answers with a ``get_weather`` tool call. The application runs
the tool. Then OpenAI goes down (the emulator answers 503), and turn 2, the
same conversation with the tool result, is answered by Anthropic: the
assistant turn with the tool call and the ``tool`` turn are translated to
Anthropic's ``tool_use`` / ``tool_result`` blocks, and the tool-call id the
application got from OpenAI is sent as is. The application changes nothing.

The script runs its own emulator (to switch OpenAI off) and an in-process
endpoint; against a running ``aipipe serve`` only the SDK part is needed.
"""

import asyncio
import json
import os
import tempfile
from pathlib import Path

import openai

from pipeline import create_ai_provider_manager
from pipeline.emulator import EmulatorServer
from pipeline.serve.openai_server import OpenAIServer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
]


def get_weather(city: str, unit: str) -> dict[str, object]:
    """The application's own tool (a stand-in for a weather API)."""
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "clear"}


async def main() -> None:
    keys = Path(tempfile.mkdtemp()) / "keys.toml"  # production refuses an open endpoint: one client key
    keys.write_text('[keys]\n"sk-aipipe-example" = "weather-app"\n')
    async with EmulatorServer() as emulator:
        env = {**os.environ, "AIPIPE_EMULATE": "1", "AIPIPE_EMULATOR_URL": emulator.url, "AIPIPE_API_KEYS": str(keys)}
        async with create_ai_provider_manager("production", env) as manager, OpenAIServer(manager) as server:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-aipipe-example")
            allow = {"providers": ["openai", "anthropic"]}  # OpenAI first, Anthropic as the fallback
            messages: list[dict[str, object]] = [
                {"role": "user", "content": "What's the weather in Paris? Use get_weather."}
            ]

            raw = await client.chat.completions.with_raw_response.create(
                model="chat-large",
                messages=messages,
                tools=TOOLS,
                extra_body=allow,  # type: ignore[arg-type]
            )
            first = raw.parse().choices[0]
            print("Turn 1 answered by:", raw.headers["x-aipipe-provider"], "| finish_reason:", first.finish_reason)
            messages.append(first.message.model_dump(exclude_none=True))
            for call in first.message.tool_calls or []:
                result = get_weather(**json.loads(call.function.arguments))
                print(f"Tool call {call.id}: {call.function.name}({call.function.arguments}) -> {result}")
                messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})

            emulator.faults.set("openai", {"default": {"status": 503}})  # OpenAI goes down between the turns
            raw = await client.chat.completions.with_raw_response.create(
                model="chat-large",
                messages=messages,
                tools=TOOLS,
                extra_body=allow,  # type: ignore[arg-type]
            )
            second = raw.parse().choices[0]
            print("Turn 2 answered by:", raw.headers["x-aipipe-provider"], "| finish_reason:", second.finish_reason)
            print("Answer:", second.message.content)


if __name__ == "__main__":
    asyncio.run(main())
