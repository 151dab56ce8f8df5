"""The demo's streaming moment: one answer streamed to the terminal, then one cut mid-answer and resumed.

``stream_moment`` makes the emulator's answers 30 words long, one word every
25 ms, streams one question (its text appears as the chunks arrive), then has
the emulator cut the first provider's stream after 8 words and streams another
question with ``stream_resume``: the next provider continues the partial text,
and the terminal shows one whole answer from two providers with no repeated
words. The emulator's profile is cleared afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import msgspec

from pipeline.client.pipeline_client import PipelineClient
from pipeline.emulator import EmulatorServer
from pipeline.errors import AIProviderError
from schemas.request import AIRequest, CacheOptions
from schemas.response import AIResponse

#: Words per answer and the gap between them (ms) while the moment runs.
REPLY_WORDS = 30
CHUNK_INTERVAL_MS = 25
#: Content deltas the first provider sends before the emulator cuts its stream.
CUT_AFTER = 8


class FoldedWriter:
    """Writes streamed text with ``out``, breaking lines at spaces so that none passes ``width`` columns."""

    def __init__(self, out: Callable[[str], None], width: int) -> None:
        self.out = out
        self.width = max(20, width)
        self.column = 0

    def __call__(self, text: str) -> None:
        """Write ``text`` (it may hold newlines); a word that would pass the width starts a new line."""
        for piece in re.split(r"(\s+)", text):
            if not piece:
                continue
            if "\n" in piece:
                self.out("\n")
                self.column = 0
                continue
            if piece.isspace():
                if self.column + len(piece) < self.width:
                    self.out(piece)
                    self.column += len(piece)
                continue
            if self.column and self.column + len(piece) > self.width:
                self.out("\n")
                self.column = 0
            self.out(piece)
            self.column += len(piece)


@dataclass
class StreamMoment:
    """What the streaming moment showed: the two final responses and the text each stream printed."""

    responses: list[AIResponse] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def shown(self) -> bool:
        """Both streams ended ok, the second across two providers, each text equal to its answer, none repeated."""
        if len(self.responses) != 2 or not all(r.status == "ok" for r in self.responses):
            return False
        resumed = self.responses[1]
        providers = {a.provider for a in resumed.attempts}
        return (
            len(providers) >= 2
            and any(a.resumed for a in resumed.attempts)
            and all(t == r.content for t, r in zip(self.texts, self.responses, strict=True))
            and all(t.count("emulator reply from") == 1 for t in self.texts)
        )

    def line(self) -> str:
        """One summary line for the end of the demo."""
        if len(self.responses) < 2:
            return "[bold]streaming[/]: (not shown)"
        first, resumed = self.responses
        chain = " → ".join(
            f"{a.provider} ({a.chunks or 0} chunks{', resumed' if a.resumed else ''})"
            for a in resumed.attempts
            if a.outcome != "skipped"
        )
        return (
            f"[bold]streaming[/]: one answer in {first.stream_chunks} chunks from {first.provider}; "
            f"a stream cut after {CUT_AFTER} words and resumed: {chain}"
        )


async def stream_moment(
    client: PipelineClient,
    emulator: EmulatorServer,
    pool: list[AIRequest],
    write: Callable[[str], None],
) -> StreamMoment:
    """Stream two questions of ``pool`` (the second cut and resumed), writing their text with ``write`` as it comes."""
    moment = StreamMoment()
    paced = {"default": {"chunk_interval_ms": CHUNK_INTERVAL_MS}}
    providers = {p: paced for p in ("openai", "anthropic", "cloudflare")}
    emulator.faults.load({"reply_words": REPLY_WORDS, "providers": providers})
    try:
        for i, base in enumerate(pool[:2]):
            resume = i == 1
            if resume:
                emulator.faults.schedule("cloudflare", {"stream_cut_after": CUT_AFTER, "chunk_interval_ms": 25})
            request = msgspec.structs.replace(
                base,
                id=f"{base.id}-stream",
                model="gpt-3.5-turbo",
                stream=True,
                stream_resume=resume or None,
                cache=CacheOptions(bypass=True),
            )
            write(f"\n{'resumed stream' if resume else 'stream'} ({request.id}): ")
            handle = await client.stream(request)
            try:
                with anyio.fail_after(60):
                    async for chunk in handle:
                        write(chunk.delta)
            except AIProviderError as exc:  # shown, and the moment then says it was not shown
                write(f" [{exc.error_type}]")
            write("\n")
            if handle.response is None:
                break
            moment.responses.append(handle.response)
            moment.texts.append(handle.text)
    finally:
        emulator.faults.load(None)
    return moment
