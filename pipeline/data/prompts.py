"""Real prompts for the demo, tests and benchmarks: MT-Bench and Vicuna questions.

The files in ``pipeline/data/`` are unchanged copies from the lm-sys/FastChat
repository (Apache License 2.0; see ``pipeline/data/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import msgspec


class _Question(msgspec.Struct):
    question_id: int
    category: str
    turns: list[str]


@dataclass(frozen=True, slots=True)
class Prompt:
    """One benchmark question: its source, id, category and turns (user messages)."""

    source: str
    question_id: int
    category: str
    turns: tuple[str, ...]


def load_prompts(source: str = "mt_bench") -> list[Prompt]:
    """The questions of ``mt_bench`` (80, two turns) or ``vicuna_bench`` (80, one turn).

    Raises:
        ValueError: for an unknown source.
    """
    if source not in ("mt_bench", "vicuna_bench"):
        raise ValueError(f"unknown prompt source {source!r}")
    text = resources.files("pipeline.data").joinpath(f"{source}_questions.jsonl").read_bytes()
    decoder = msgspec.json.Decoder(_Question)
    out = []
    for line in text.splitlines():
        if line.strip():
            q = decoder.decode(line)
            out.append(Prompt(source, q.question_id, q.category, tuple(q.turns)))
    return out


def spread_by_category(prompts: list[Prompt], count: int) -> list[Prompt]:
    """Up to ``count`` prompts taken round-robin over categories, so every kind of length appears."""
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    picked: list[Prompt] = []
    depth = 0
    while len(picked) < count and any(depth < len(v) for v in by_cat.values()):
        for items in by_cat.values():
            if depth < len(items) and len(picked) < count:
                picked.append(items[depth])
        depth += 1
    return picked
