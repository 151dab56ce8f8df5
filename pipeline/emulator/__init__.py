"""The provider emulator: one loopback HTTP server speaking the OpenAI, Anthropic and Workers AI APIs.

It answers like the real APIs (bodies, headers, error shapes) so the official
``openai`` and ``anthropic`` SDKs and the pipeline's adapters work against it
unchanged, with deterministic answers and token usage (rule in
``pipeline.emulator.wire``), and injects faults on demand: scheduled
responses, status probabilities, latency, hangs, connection resets, malformed
or empty 200s, and a hold gate for truly concurrent calls
(``pipeline.emulator.spec``). Control it in Python (``EmulatorServer``) or over
HTTP (``/_emulator/...``, see ``pipeline.emulator.app``).

Typical use::

    async with EmulatorServer() as emu:
        env = emulator_env(emu.url)          # OPENAI_BASE_URL, ANTHROPIC_BASE_URL, CLOUDFLARE_BASE_URL
        emu.faults.schedule("openai", {"status": 429, "retry_after_s": 1})
        emu.hold(3, provider="anthropic")    # the 3rd call releases all three
        ...
        await emu.wait_for_calls(3, "anthropic", timeout_s=5)
"""

from __future__ import annotations

from pipeline.emulator.app import create_app
from pipeline.emulator.server import DEFAULT_PORT, EmulatorServer, emulator_env, serve_forever
from pipeline.emulator.spec import (
    DEFAULT_HANG_S,
    PROVIDERS,
    Action,
    ErrorKind,
    FaultProfile,
    FaultRule,
    FaultStep,
    FixedLatency,
    Latency,
    NormalLatency,
    ProviderFaults,
    UniformLatency,
    decode_profile_json,
    load_profile,
    parse_profile,
)
from pipeline.emulator.state import CallRecord, EmulatorState, FaultController
from pipeline.emulator.wire import prompt_tokens, reply_text, text_tokens

__all__ = [
    "DEFAULT_HANG_S",
    "DEFAULT_PORT",
    "PROVIDERS",
    "Action",
    "CallRecord",
    "EmulatorServer",
    "EmulatorState",
    "ErrorKind",
    "FaultController",
    "FaultProfile",
    "FaultRule",
    "FaultStep",
    "FixedLatency",
    "Latency",
    "NormalLatency",
    "ProviderFaults",
    "UniformLatency",
    "create_app",
    "decode_profile_json",
    "emulator_env",
    "load_profile",
    "parse_profile",
    "prompt_tokens",
    "reply_text",
    "serve_forever",
    "text_tokens",
]
